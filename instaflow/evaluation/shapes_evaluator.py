"""The embedded evaluator: the shapes world's analogue of Inception (FID features) and CLIP (alignment).

``ShapesEvaluator`` is a small CNN trained on the ground truth kept in every sample's JSON. It
reads a 32x32 image in [-1, 1] and predicts, for each of the 9 grid cells, whether it is occupied
and the shape, colour and size of the object there, plus the background. Its penultimate vector
(``features``) plays Inception's role for FID (``instaflow.evaluation.fid``); its predictions,
compared with the scene a prompt asked for, play CLIP score's role (``alignment_score``).

Alignment is an exact match on what a caption pins down, scored per image:

- the predicted set of occupied cells equals the prompt's (no missing, no extra object),
- in every occupied cell the predicted shape and colour equal the prompt's,
- the predicted background equals the prompt's.

Size is left out of that match on purpose and reported separately as per-object size accuracy:
"small" and "large" differ by under 2 pixels of radius at 32x32, so they are the attribute a
slightly blurry generator (and the evaluator on its images) gets wrong first; folding them into
the exact match would make alignment mostly a size test. ``alignment_with_size`` is reported
beside it for completeness.

Train with ``make train-evaluator`` (experiments/embedded/evaluator.yaml,
``lightning_modules.embedded.evaluator.EvaluatorTraining``); the export lands in
``assets/embedded-evaluator`` and is read back by ``load_evaluator``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.shapes import BACKGROUNDS, COLORS, GRID, SHAPES, SIZES

CELLS = GRID * GRID
IGNORE = -100  # target of shape/colour/size in empty cells (cross_entropy's ignore_index)
# logits per cell: occupancy (empty/occupied), shape, colour, size
HEADS = (("occupancy", 2), ("shape", len(SHAPES)), ("color", len(COLORS)), ("size", len(SIZES)))
VOCAB = {"shape": SHAPES, "color": COLORS, "size": SIZES, "background": BACKGROUNDS, "grid": GRID}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class ShapesEvaluator(nn.Module):
    """Conv-norm-ReLU trunk (32 -> 16 -> 8 px), pooled to the 3x3 grid, one linear embedding, linear heads.

    Args:
        width: channels of the first stage (doubled once, at 16x16).
        feature_dim: size D of the embedding returned by ``features`` (the FID feature).
        norm: "batch" or "group".

    ``features(x)`` is the embedding *before* its ReLU: roughly Gaussian and without dead
    (always-zero) units, which suits the Gaussian fit of FID. The heads read ``relu(features)``.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, norm: str = "group") -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "norm": norm}
        w, w2 = width, 2 * width

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(norm, cout), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(3, w),            # 32x32
            *block(w, w, 2),         # 16x16
            *block(w, w2),
            *block(w2, w2, 2),       # 8x8
            *block(w2, w2),
        )
        self.pool = nn.AdaptiveAvgPool2d(GRID)  # one (overlapping) window per grid cell
        self.embed = nn.Linear(w2 * CELLS, feature_dim)
        self.head = nn.Linear(feature_dim, CELLS * sum(n for _, n in HEADS) + len(BACKGROUNDS))
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, D) embedding (pre-activation)."""
        h = self.pool(self.trunk(x))  # (B, 2w, 3, 3)
        return self.embed(h.flatten(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: occupancy (B,9,2), shape (B,9,4), color (B,9,6), size (B,9,2), background (B,3)."""
        out = self.head(F.relu(self.features(x)))
        logits, start = {}, 0
        for name, n in HEADS:
            logits[name] = out[:, start:start + CELLS * n].view(-1, CELLS, n)
            start += CELLS * n
        logits["background"] = out[:, start:]
        return logits


# -- scenes <-> tensors ----------------------------------------------------------------------

def scene_targets(scene: dict) -> dict[str, torch.Tensor]:
    """A scene dict (``meta["scene"]``) -> targets: occupancy/shape/color/size (9,) and background ().

    Empty cells have occupancy 0 and ``IGNORE`` (-100) as shape, colour and size.
    """
    occ = torch.zeros(CELLS, dtype=torch.long)
    shape, color, size = (torch.full((CELLS,), IGNORE, dtype=torch.long) for _ in range(3))
    for o in scene["objects"]:
        c = int(o["cell"])
        occ[c] = 1
        shape[c] = SHAPES.index(o["shape"])
        color[c] = COLORS.index(o["color"])
        size[c] = SIZES.index(o["size"])
    return {"occupancy": occ, "shape": shape, "color": color, "size": size,
            "background": torch.tensor(BACKGROUNDS.index(scene["background"]))}


def batch_targets(scenes: Sequence[dict], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Stack ``scene_targets`` over a list of scene dicts."""
    ts = [scene_targets(s) for s in scenes]
    return {k: torch.stack([t[k] for t in ts]).to(device) for k in ts[0]}


def logits_to_scenes(logits: dict[str, torch.Tensor]) -> list[dict]:
    """Argmax of every head -> scene-like dicts (objects sorted by cell, no cx/cy/caption)."""
    occ, shape, color, size = (logits[k].argmax(-1).cpu() for k in ("occupancy", "shape", "color", "size"))
    bg = logits["background"].argmax(-1).cpu()
    scenes = []
    for i in range(occ.shape[0]):
        objects = [
            {"cell": c, "shape": SHAPES[shape[i, c]], "color": COLORS[color[i, c]], "size": SIZES[size[i, c]]}
            for c in range(CELLS) if occ[i, c] == 1
        ]
        scenes.append({"background": BACKGROUNDS[bg[i]], "objects": objects})
    return scenes


@torch.no_grad()
def predict_scenes(model: ShapesEvaluator, images: torch.Tensor, batch_size: int = 500) -> list[dict]:
    """Scenes the evaluator sees in ``images`` ((N, 3, 32, 32) float in [-1, 1]), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        scenes = []
        for chunk in images.split(batch_size):
            scenes += logits_to_scenes(model(chunk.to(device, torch.float32)))
        return scenes
    finally:
        model.train(was_training)


# -- alignment ---------------------------------------------------------------------------------

def scene_matches(pred: dict, prompt_scene: dict, attributes: Iterable[str] = ("cell", "shape", "color"),
                  background: bool = True) -> bool:
    """Whether ``pred`` shows what ``prompt_scene`` asks for.

    With "cell" in ``attributes`` (the default), objects are matched by cell: both scenes must
    occupy the same set of cells, and the object in each cell must agree on the other listed
    attributes. Without "cell", the multisets of objects (over the listed attributes) must be
    equal, wherever they are. ``background`` also requires the backgrounds to agree.
    """
    attrs = tuple(attributes)
    if background and pred["background"] != prompt_scene["background"]:
        return False
    if "cell" in attrs:
        a = {int(o["cell"]): o for o in pred["objects"]}
        b = {int(o["cell"]): o for o in prompt_scene["objects"]}
        if a.keys() != b.keys():
            return False
        return all(a[c][k] == b[c][k] for c in b for k in attrs if k != "cell")
    key = lambda o: tuple(str(o[k]) for k in attrs)  # noqa: E731
    return sorted(map(key, pred["objects"])) == sorted(map(key, prompt_scene["objects"]))


def alignment_score(preds: Sequence[dict], prompt_scenes: Sequence[dict]) -> float:
    """Share of images whose predicted scene matches its prompt (cells, shape, colour, background)."""
    if len(preds) != len(prompt_scenes):
        raise ValueError(f"{len(preds)} predictions for {len(prompt_scenes)} prompts")
    if not preds:
        return float("nan")
    return sum(scene_matches(p, s) for p, s in zip(preds, prompt_scenes)) / len(preds)


def attribute_accuracies(preds: Sequence[dict], prompt_scenes: Sequence[dict]) -> dict[str, float]:
    """Diagnostics beside ``alignment_score``.

    - ``cells``: share of images whose set of occupied cells is exactly the prompt's;
    - ``count``: share of images with the prompt's number of objects;
    - ``shape``, ``color``, ``size``: per prompt object, whether the prediction has an object in
      that cell with that attribute (a missing object counts as wrong for all three);
    - ``background``: share of images with the prompt's background;
    - ``alignment`` and ``alignment_with_size`` (the exact match plus size).
    """
    if len(preds) != len(prompt_scenes):
        raise ValueError(f"{len(preds)} predictions for {len(prompt_scenes)} prompts")
    hits = {"shape": 0, "color": 0, "size": 0}
    n_obj = 0
    cells = count = bg = 0
    for p, s in zip(preds, prompt_scenes):
        a = {int(o["cell"]): o for o in p["objects"]}
        cells += a.keys() == {int(o["cell"]) for o in s["objects"]}
        count += len(p["objects"]) == len(s["objects"])
        bg += p["background"] == s["background"]
        for o in s["objects"]:
            n_obj += 1
            q = a.get(int(o["cell"]))
            for k in hits:
                hits[k] += q is not None and q[k] == o[k]
    n = max(len(preds), 1)
    out = {"cells": cells / n, "count": count / n, "background": bg / n}
    out.update({k: v / max(n_obj, 1) for k, v in hits.items()})
    out["alignment"] = alignment_score(preds, prompt_scenes)
    out["alignment_with_size"] = sum(
        scene_matches(p, s, ("cell", "shape", "color", "size")) for p, s in zip(preds, prompt_scenes)) / n
    return out


def accuracies_by_objects(preds: Sequence[dict], prompt_scenes: Sequence[dict]) -> dict[str, dict]:
    """``attribute_accuracies`` per number of prompt objects ("1", "2", "3"): attribute binding fails
    in the many-object scenes first, which the pooled numbers hide."""
    groups: dict[int, list] = {}
    for p, s in zip(preds, prompt_scenes):
        groups.setdefault(len(s["objects"]), []).append((p, s))
    out = {}
    for k, pairs in sorted(groups.items()):
        acc = attribute_accuracies([p for p, _ in pairs], [s for _, s in pairs])
        out[str(k)] = {"prompts": len(pairs), **{a: acc[a] for a in ("alignment", "shape", "color", "cells")}}
    return out


# -- training ----------------------------------------------------------------------------------

def augment(x: torch.Tensor, generator: torch.Generator | None = None, brightness: float = 0.06,
            contrast: float = 0.1, channel_shift: float = 0.03, noise: float = 0.06,
            blur_prob: float = 0.5, blur_sigma: tuple[float, float] = (0.3, 1.2)) -> torch.Tensor:
    """Attribute-preserving jitter of (B, 3, H, W) images in [-1, 1] (no flips or shifts: they move cells).

    Per image: contrast about the image mean, a brightness offset, a small per-channel offset,
    a Gaussian blur (with probability ``blur_prob``) and Gaussian pixel noise. The blur and the
    noise make the evaluator robust to the slightly soft, slightly noisy images generators make.
    """
    b, dev = x.shape[0], x.device
    u = lambda *s: torch.rand(*s, generator=generator, device=dev)  # noqa: E731
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + contrast * (2 * u(b, 1, 1, 1) - 1)) + mean
    x = x + brightness * (2 * u(b, 1, 1, 1) - 1) + channel_shift * (2 * u(b, 3, 1, 1) - 1)
    if blur_prob > 0:
        sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u(b)
        sigma = torch.where(u(b) < blur_prob, sigma, torch.zeros_like(sigma))
        r = torch.arange(-2, 3, device=dev, dtype=x.dtype)
        k1 = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # sigma 0 -> delta
        k1 = k1 / k1.sum(1, keepdim=True)
        k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # (B*3, 1, 5, 5)
        x = F.conv2d(F.pad(x.reshape(1, b * 3, *x.shape[2:]), (2, 2, 2, 2), mode="replicate"), k2,
                     groups=b * 3).view_as(x)
    x = x + noise * u(b, 1, 1, 1) * torch.randn(x.shape, generator=generator, device=dev)
    return x.clamp(-1, 1)


# -- export / load -----------------------------------------------------------------------------

def save_evaluator(model: ShapesEvaluator, dirpath: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME))
    config = {
        "class": "instaflow.evaluation.shapes_evaluator.ShapesEvaluator",
        "config": model.config,
        "input": "(B, 3, 32, 32) float in [-1, 1]",
        "vocab": {k: list(v) if isinstance(v, tuple) else v for k, v in VOCAB.items()},
        **(extra or {}),
    }
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return path


def load_evaluator(dirpath: str | Path, device: torch.device | str = "cpu") -> ShapesEvaluator:
    """The exported evaluator of ``dirpath``, in eval mode."""
    from safetensors.torch import load_file

    path = Path(dirpath)
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no trained embedded evaluator at {path} (missing {', '.join(missing)}); "
            "train it with `make train-evaluator`, which exports to assets/embedded-evaluator"
        )
    config = json.loads((path / CONFIG_NAME).read_text())
    vocab = {k: list(v) if isinstance(v, tuple) else v for k, v in VOCAB.items()}
    if config.get("vocab") != vocab:
        raise ValueError(f"the evaluator at {path} was trained on another vocabulary than data.shapes; "
                         "retrain it with `make train-evaluator`")
    model = ShapesEvaluator(**config["config"])
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    return model.to(device).eval()
