"""What the in-loop quality callback (``callbacks.quality.Quality``) is built from, for both worlds.

- **Prompts** (``QualityPrompts``): a fixed prompt set with one noise seed per prompt and the real
  images FID compares against. ``ShardPrompts`` reads img2dataset/WebDataset shards (a LAION val
  shard, or the embedded world's val split): captions of samples [0, n) in key order, reference
  images [n, 2n). ``CocoPrompts`` follows ``instaflow.evaluation.coco``'s protocol (captions,
  sample rule, noise seed i for prompt i; the prompts' own images are the reference).
- **Image features for FID** (``ImageFeatures``): ``CleanFidInception`` (clean-fid's Inception-v3
  pool3, mode "clean": float PIL-bicubic resize to 299) for real runs, ``EmbeddedFeatures`` (the
  shapes evaluator) for the embedded world. Any other extractor plugs in the same way.
- **Text-image scores** (``TextImageScore``): per-image scores averaged over images:
  ``ClipScore`` (cosine of CLIP embeddings, as ``coco.ClipScorer``) and ``EmbeddedAlignment``
  (the shapes evaluator's exact scene match, also per number of prompt objects).

They are scored through ``instaflow.evaluation.scoring`` (``per_image`` -> ``aggregate``), the one path of
the curves, the tables and COCO (docs/metrics.md: how to add a metric).

Everything that loads weights or reads files does it in ``prepare``/``load`` (called at fit start
by the callback), so a missing Inception file, CLIP model or COCO folder fails before step 1 with
a message naming it. Per-image values let the callback split prompts over ranks and gather the
results: the mean over images and the Frechet distance do not depend on which rank made which image.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from instaflow.evaluation.fid import feature_stats, to_uint8
from instaflow.state import atomic_file


@dataclass
class Setting:
    """One way of sampling the student for scoring: solver steps and guidance scale (1 = conditional only)."""

    steps: int = 1
    guidance: float = 1.0


@dataclass
class PromptSet:
    """Prompts with their noise seeds and per-prompt metadata (``meta[i]``: the sample's JSON, or {})."""

    captions: list[str]
    seeds: list[int]
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def take(self, index: list[int]) -> "PromptSet":
        return PromptSet([self.captions[i] for i in index], [self.seeds[i] for i in index],
                         [self.meta[i] for i in index] if self.meta else [])


def rank_share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Indices rank ``rank`` scores of ``n`` prompts, and how many of them are real.

    Contiguous blocks of ceil(n / world); a short last block is padded by repeating its last index
    (those images are made and dropped), so every rank runs the same number of batches: under
    FSDP2 each forward is a collective, and a rank with fewer batches would leave the others waiting.
    """
    m = math.ceil(n / world)
    own = list(range(rank * m, min((rank + 1) * m, n)))
    real = len(own)
    pad = own[-1] if own else n - 1
    return own + [pad] * (m - real), real


def gathered_order(n: int, world: int) -> list[int]:
    """Positions in the rank-major gathered rows (world x ceil(n / world)) of prompts 0..n-1."""
    m = math.ceil(n / world)
    return [r * m + j for r in range(world) for j in range(m) if r * m + j < n]


# -- prompt sets -------------------------------------------------------------------------------

class QualityPrompts(abc.ABC):
    """A fixed prompt set and its FID reference images."""

    @abc.abstractmethod
    def load(self) -> PromptSet:
        """The prompts, seeds and metadata; fails clearly when the files are missing."""

    @abc.abstractmethod
    def reference_images(self) -> torch.Tensor:
        """The real images FID compares with, uint8 (N, 3, H, W)."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """Everything the reference depends on (the cache key of its statistics)."""


def _stream(shards: str, resolution: int):
    from data.laion import LaionStream, expand_shards

    urls = expand_shards(shards)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    absent = [u for u in local if not Path(u).is_file()]
    if absent:
        raise FileNotFoundError(f"quality prompts: {len(absent)} of {len(urls)} shards of {shards!r} are missing "
                                f"(first: {absent[0]}). Point Quality's prompts.shards at existing WebDataset shards "
                                "(img2dataset layout: .jpg/.txt/.json per sample), e.g. a held-out LAION shard")
    # every rank reads the whole set (the callback splits the prompts itself, after sorting by key)
    return LaionStream(shards, resolution=resolution, resampled=False, shuffle_buffer=0, require_meta=True,
                       split_by_rank=False)


class ShardPrompts(QualityPrompts):
    """Captions of samples [0, n) of WebDataset shards (in key order) as prompts, images [n, 2n) as the reference.

    Only samples that decode (image, caption and JSON) count, so a corrupt sample shifts the split
    instead of breaking it. The pixels are not kept: ``load`` keeps keys, captions and metadata;
    ``reference_images`` decodes the shards again on rank 0 and keeps only the n reference images as
    uint8 (at 512 px about 0.8 GB per 1k images).

    Args:
        shards: brace pattern of held-out shards (a LAION val shard; the embedded world's val split).
        n: number of prompts (and of reference images).
        resolution: images are resized (shorter side) and centre-cropped to this size, as training reads them.
        seed: prompt i starts from noise seed ``seed + i``.
    """

    def __init__(self, shards: str, n: int = 1000, resolution: int = 512, seed: int = 0) -> None:
        self.shards, self.n, self.resolution, self.seed = shards, n, resolution, seed
        self._samples: list[dict] | None = None

    def _read(self) -> list[dict]:
        if self._samples is None:
            samples = sorted(({"key": s["key"], "caption": s["caption"], "meta": s.get("meta") or {}}
                              for s in _stream(self.shards, self.resolution)), key=lambda s: s["key"])
            if len(samples) < 2 * self.n:
                raise ValueError(f"quality prompts: {self.shards!r} holds {len(samples)} usable samples (image, "
                                 f"caption and JSON); {2 * self.n} are needed (n prompts + n reference images): "
                                 "lower n or add shards")
            self._samples = samples[:2 * self.n]
        return self._samples

    def load(self) -> PromptSet:
        samples = self._read()[:self.n]
        return PromptSet([s["caption"] for s in samples], list(range(self.seed, self.seed + self.n)),
                         [s["meta"] for s in samples])

    def reference_images(self) -> torch.Tensor:
        keys = {s["key"] for s in self._read()[self.n:]}
        ref = {s["key"]: ((s["pixel_values"] + 1) * 127.5).round().to(torch.uint8)  # the decoded JPEGs, (3, H, W)
               for s in _stream(self.shards, self.resolution) if s["key"] in keys}
        return torch.stack([ref[k] for k in sorted(ref)])

    def describe(self) -> dict:
        return {"kind": "shards", "shards": self.shards, "n": self.n, "resolution": self.resolution,
                "reference": "samples [n, 2n) in key order"}


class CocoPrompts(QualityPrompts):
    """COCO captions by ``instaflow.evaluation.coco``'s protocol; the reference is the prompts' own images.

    Args:
        annotations: ``captions_val2017.json`` (or val2014's).
        images: the matching image folder (``val2017``).
        n: prompts, chosen by the protocol's sample rule (nested in n, seeded by ``sample_seed``).
        protocol: ``coco2017_5k`` or ``coco2014_30k`` (which file layout and download URL the errors name).
        resolution: reference images centre-cropped and resized to this size (PIL bicubic), as ``coco.py``.
    """

    def __init__(self, annotations: str, images: str, n: int = 1000, protocol: str = "coco2017_5k",
                 resolution: int = 512, sample_seed: int = 0) -> None:
        self.annotations, self.images, self.n = annotations, images, n
        self.protocol, self.resolution, self.sample_seed = protocol, resolution, sample_seed
        self._prompts: list[dict] | None = None

    def _read(self) -> list[dict]:
        if self._prompts is None:
            from instaflow.evaluation.coco import _missing, coco_prompts

            self._prompts = coco_prompts(self.protocol, self.annotations, self.n, self.sample_seed)
            if not Path(self.images).is_dir():  # the images are read later, on rank 0: check now, at fit start
                raise _missing("image folder", Path(self.images), self.protocol, "--images")
        return self._prompts

    def load(self) -> PromptSet:
        prompts = self._read()
        return PromptSet([p["caption"] for p in prompts], [p["seed"] for p in prompts],
                         [{"image_id": p["image_id"]} for p in prompts])

    def reference_images(self) -> torch.Tensor:
        from PIL import Image

        from instaflow.evaluation.coco import _missing, resize_for_fid

        out = []
        for p in self._read():
            path = Path(self.images) / p["file_name"]
            if not path.is_file():
                raise _missing(f"image {p['file_name']}", Path(self.images), self.protocol, "--images")
            with Image.open(path) as img:
                out.append(torch.from_numpy(np.array(resize_for_fid(img, self.resolution))).permute(2, 0, 1))
        return torch.stack(out)

    def describe(self) -> dict:
        return {"kind": "coco", "protocol": self.protocol, "annotations": str(self.annotations),
                "images": str(self.images), "n": self.n, "sample_seed": self.sample_seed,
                "resolution": self.resolution}


# -- FID features ------------------------------------------------------------------------------

class ImageFeatures(abc.ABC):
    """Images -> FID features. ``prepare`` loads the network (at fit start); ``__call__`` maps
    (N, 3, H, W) float in [0, 1] (quantised to uint8 first, as a saved PNG) to (N, D) float32."""

    name: str = "features"

    def prepare(self, device: torch.device, download: bool = True) -> None:
        """Load the network onto ``device``; ``download`` False: only from local files."""

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        ...


class EmbeddedFeatures(ImageFeatures):
    """The shapes evaluator's features (``fid.image_features``): the embedded world's FID."""

    name = "embedded_evaluator"

    def __init__(self, evaluator: str = "assets/embedded-evaluator") -> None:
        self.evaluator = evaluator
        self._model = None

    @classmethod
    def loaded(cls, model: torch.nn.Module) -> "EmbeddedFeatures":
        """Around an evaluator already loaded (the tables load it once for every row)."""
        out = cls()
        out._model = model
        return out

    def prepare(self, device: torch.device, download: bool = True) -> None:
        from instaflow.evaluation.shapes_evaluator import load_evaluator

        if self._model is None:
            self._model = load_evaluator(self.evaluator)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        from instaflow.evaluation.fid import image_features

        return image_features(to_uint8(images), self._model)


class CleanFidInception(ImageFeatures):
    """clean-fid's Inception-v3 pool3 features in mode "clean" (what ``coco.py`` and the paper's FIDs use).

    Each image goes through clean-fid's own steps: uint8 -> float PIL-bicubic resize to 299 ->
    (3, 299, 299) in 0..255 -> the TorchScript Inception. Its weights are clean-fid's file
    (``fid.inception_weights_path()``); offline and absent, ``prepare`` fails naming it and its URL.
    """

    name = "inception_clean"

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._model = None
        self._device = torch.device("cpu")

    def prepare(self, device: torch.device, download: bool = True) -> None:
        from instaflow.evaluation.fid import ensure_inception_weights

        ensure_inception_weights(download)
        if self._model is None:
            from cleanfid.features import build_feature_extractor

            self._model = build_feature_extractor("clean", device=device, use_dataparallel=False)
            self._device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        from cleanfid.resize import build_resizer

        resize = build_resizer("clean")
        hwc = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for i in range(0, len(hwc), self.batch_size):
            batch = np.stack([resize(im) for im in hwc[i:i + self.batch_size]])  # (B, 299, 299, 3) float32 0..255
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self._device)
            out.append(self._model(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


# -- text-image scores -------------------------------------------------------------------------

class TextImageScore(abc.ABC):
    """Per-image scores of images against their prompts: ``{name: (N,) float}``, NaN where a score
    does not apply to an image. A name ``"a@b"`` is logged as ``quality/a_<setting>_b``."""

    def prepare(self, device: torch.device, download: bool = True) -> None:
        """Load the network onto ``device`` (fit start)."""

    def bind(self, prompts: PromptSet) -> None:
        """Fix the score names from the whole prompt set (every rank knows it), before any scoring.

        A score whose names depend on the prompts (``EmbeddedAlignment``'s per-object-count names) must
        return the same names, in the same order, on every rank, whatever block of prompts a rank scores:
        the callback gathers one name at a time, so differing names would pair wrong values or hang.
        """

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor, prompts: PromptSet) -> dict[str, np.ndarray]:
        ...


class ClipScore(TextImageScore):
    """CLIP score of ``coco.ClipScorer`` (77 tokens, truncation keeping the end token): ``clip_score``
    (mean cosine, the paper's scale 0.30 ~ 30) and ``clip_score_100`` (mean 100 max(cos, 0))."""

    def __init__(self, model: str = "openai/clip-vit-large-patch14") -> None:
        self.model = model
        self._scorer = None

    @classmethod
    def loaded(cls, scorer: torch.nn.Module) -> "ClipScore":
        """Around a ``coco.ClipScorer`` already loaded (and placed on its device)."""
        out = cls(getattr(scorer, "name", "custom"))
        out._scorer = scorer
        return out

    def prepare(self, device: torch.device, download: bool = True) -> None:
        from instaflow.evaluation.coco import ClipScorer

        if self._scorer is None:
            self._scorer = ClipScorer.from_pretrained(self.model).to(device)

    def __call__(self, images: torch.Tensor, prompts: PromptSet) -> dict[str, np.ndarray]:
        return clip_per_image(self._scorer(images, prompts.captions).float().cpu().numpy())


def clip_per_image(cos: np.ndarray) -> dict[str, np.ndarray]:
    """Both CLIP-score conventions per image from cosines (N,): ``clip_score`` and ``clip_score_100``."""
    return {"clip_score": cos, "clip_score_100": 100 * np.clip(cos, 0, None)}


class EmbeddedAlignment(TextImageScore):
    """The shapes evaluator's alignment (exact scene match, ``shapes_evaluator.scene_matches``), pooled
    and per number of prompt objects (``alignment@<k>obj``); needs the prompts' ``meta["scene"]``."""

    def __init__(self, evaluator: str = "assets/embedded-evaluator") -> None:
        self.evaluator = evaluator
        self._model = None
        self._counts: list[int] | None = None  # object counts of the whole prompt set (``bind``)

    @classmethod
    def loaded(cls, model: torch.nn.Module) -> "EmbeddedAlignment":
        """Around an evaluator already loaded."""
        out = cls()
        out._model = model
        return out

    def prepare(self, device: torch.device, download: bool = True) -> None:
        from instaflow.evaluation.shapes_evaluator import load_evaluator

        if self._model is None:
            self._model = load_evaluator(self.evaluator)

    def bind(self, prompts: PromptSet) -> None:
        """The per-count names come from every prompt's scene, so each rank returns all of them (NaN where absent)."""
        self._counts = sorted({len(s["objects"]) for s in _scenes(prompts)})

    def __call__(self, images: torch.Tensor, prompts: PromptSet) -> dict[str, np.ndarray]:
        from instaflow.evaluation.shapes_evaluator import predict_scenes, scene_matches

        scenes = _scenes(prompts)
        preds = predict_scenes(self._model, to_uint8(images).float() / 127.5 - 1.0)
        hit = np.array([scene_matches(p, s) for p, s in zip(preds, scenes)], dtype=np.float64)
        out = {"alignment": hit}
        counts = self._counts if self._counts is not None else sorted({len(s["objects"]) for s in scenes})
        for k in counts:
            out[f"alignment@{k}obj"] = np.where([len(s["objects"]) == k for s in scenes], hit, np.nan)
        return out


def _scenes(prompts: PromptSet) -> list[dict]:
    """Each prompt's ground-truth scene (``meta["scene"]``); a clear error where one is missing."""
    scenes = [m.get("scene") for m in prompts.meta] if prompts.meta else [None] * len(prompts)
    if any(s is None for s in scenes):
        raise ValueError("EmbeddedAlignment needs each prompt's ground-truth scene (meta['scene'] in the shards' "
                         ".json, as the embedded world writes); use ClipScore for real prompts")
    return scenes


# -- reference statistics, cached beside the run ------------------------------------------------

def reference_stats(prompts: QualityPrompts, features: ImageFeatures, cache_dir: str | Path | None) -> tuple:
    """(mu, sigma) of the reference images' features, from ``cache_dir`` when computed before.

    The cache file is named by a hash of ``prompts.describe()`` and the extractor's name, and holds
    that description, so a changed prompt set or extractor never reuses stale statistics.
    """
    spec = {"prompts": prompts.describe(), "features": features.name}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"reference_{features.name}_{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as f:  # arrays only: a planted pickle is refused, never run
            return f["mu"], f["sigma"]
    mu, sigma = feature_stats(features(prompts.reference_images()))
    if path is not None:
        with atomic_file(path, "wb") as f:  # a killed run leaves no half-written cache
            np.savez(f, mu=mu, sigma=sigma, spec=np.array(json.dumps(spec)))
    return mu, sigma
