"""COCO text-to-image evaluation with a pinned protocol: prompts, reference images, FID, CLIP score.

The protocol (``protocol()``; written next to every number in ``results.json``):
- ``coco2017_5k``: ``captions_val2017.json``, all 5000 val2017 images, sorted by image id;
  FID against val2017 centre-cropped and resized to 512 px (SD 1.5's output size).
- ``coco2014_30k``: ``captions_val2014.json``, 30000 of the 40504 val2014 images chosen by the
  sample rule below, sorted by image id; generated and reference images resized to 256 px for FID
  (as the paper).
- Caption rule: one caption per image, the one with the lowest annotation id; whitespace runs
  collapsed to one space and the ends stripped.
- Sample rule (30k): the ``n`` image ids with the smallest ``sha256(f"{seed}:{image_id}")`` (hex),
  seed 0; no duplicates by construction, nested in ``n``, reproducible in any language.
- Noise: prompt ``i`` of the sorted list starts from noise seed ``i`` (``instaflow.flow.noise.seeded_noise``).
- FID: clean-fid's Inception-v3 pool3 features, mode "clean" (PIL-bicubic resize to 299 on float
  images; ``quality.CleanFidInception``, injectable), of the generated and the reference images, both
  centre-cropped to a square and resized with PIL bicubic to the protocol's resolution (as their
  PNGs, which are written too); the distance is ``instaflow.evaluation.scoring``'s, as every other
  score of the project (float64 statistics; clean-fid's ``compute_fid`` on the folders keeps float32
  means, which differ from these in the last digits).
- CLIP score: cosine between the CLIP image embedding and the text embedding (77 tokens,
  truncated keeping the end-of-text token), averaged over images: ``clip_score`` on the paper's
  scale (0.30 ~ 30); ``clip_score_100`` = mean of 100 * max(cos, 0) (torchmetrics' convention).
  Default CLIP model: ``openai/clip-vit-large-patch14`` (the paper does not name its CLIP model,
  docs/recipe.md: compare numbers only under the same model).

    python -m instaflow.tools.coco --model runs/sd15/models/instaflow --steps 1 --guidance 1 \
        --protocol coco2017_5k --annotations data/coco/annotations/captions_val2017.json \
        --images data/coco/val2017 --out runs/coco/instaflow_1step
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from instaflow.contracts import SamplesImages
from instaflow.evaluation.fid import feature_stats, to_uint8
from instaflow.evaluation.quality import (CleanFidInception, ClipScore, ImageFeatures, PromptSet, clip_per_image)
from instaflow.evaluation.scoring import aggregate, per_image, summarize

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CAPTION_RULE = "the caption with the lowest annotation id of each image; whitespace collapsed, ends stripped"
SAMPLE_RULE = "the n image ids with the smallest sha256(f'{seed}:{image_id}') hex digest, then sorted by id"
SEED_RULE = "prompt i of the id-sorted list starts from noise seed i (CPU generator)"

PROTOCOLS = {
    "coco2017_5k": {
        "annotations": "captions_val2017.json", "images": "val2017", "n": 5000, "n_images": 5000, "fid_resolution": 512,
        "annotations_url": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "images_url": "http://images.cocodataset.org/zips/val2017.zip",
    },
    "coco2014_30k": {
        "annotations": "captions_val2014.json", "images": "val2014", "n": 30000, "n_images": 40504,
        "fid_resolution": 256,
        "annotations_url": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
        "images_url": "http://images.cocodataset.org/zips/val2014.zip",
    },
}


class CocoFilesMissing(FileNotFoundError):
    """A COCO annotation file or image folder is absent; the message says where to get it."""


def _missing(what: str, path: Path, name: str, flag: str) -> CocoFilesMissing:
    spec = PROTOCOLS[name]
    url = spec["annotations_url"] if flag == "--annotations" else spec["images_url"]
    inside = f"annotations/{spec['annotations']}" if flag == "--annotations" else f"{spec['images']}/*.jpg"
    return CocoFilesMissing(
        f"COCO {what} for protocol {name!r} not found: {path}. Download {url} (cocodataset.org), unzip it "
        f"(it holds {inside}) and point the evaluation at it with {flag} PATH "
        f"(Python: instaflow.evaluation.coco.evaluate({flag[2:]}=PATH)).")


def load_captions(annotations: str | Path, name: str = "coco2017_5k") -> dict[int, dict]:
    """{image_id: {file_name, caption, annotation_id}} by the caption rule, from a COCO captions file."""
    path = Path(annotations)
    if not path.is_file():
        raise _missing("caption annotations", path, name, "--annotations")
    data = json.loads(path.read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    chosen: dict[int, dict] = {}
    for ann in data["annotations"]:
        i = ann["image_id"]
        if i not in chosen or ann["id"] < chosen[i]["annotation_id"]:
            chosen[i] = {"annotation_id": ann["id"], "caption": " ".join(ann["caption"].split())}
    return {i: {"image_id": i, "file_name": files[i], **chosen[i]} for i in sorted(chosen)}


def select_image_ids(image_ids: list[int], n: int | None, seed: int = 0) -> list[int]:
    """All ids sorted (n None or n = all), else the sample rule's n ids, sorted."""
    ids = sorted(set(image_ids))
    if n is None or n == len(ids):
        return ids
    if n > len(ids):
        raise ValueError(f"asked for {n} images, the annotations have {len(ids)}")
    rank = lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()  # noqa: E731
    return sorted(sorted(ids, key=rank)[:n])


def coco_prompts(name: str, annotations: str | Path, n: int | None = None, seed: int = 0) -> list[dict]:
    """The protocol's prompts in order: dicts of image_id, file_name, caption, annotation_id, seed."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown COCO protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    captions = load_captions(annotations, name)
    ids = select_image_ids(list(captions), PROTOCOLS[name]["n"] if n is None else n, seed)
    return [{**captions[i], "seed": k} for k, i in enumerate(ids)]


def resize_for_fid(img: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square, then PIL bicubic resize to ``resolution`` (generated and reference alike)."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return img if s == resolution else img.resize((resolution, resolution), Image.BICUBIC)


def prepare_reference(prompts: list[dict], images: str | Path, out_dir: str | Path, resolution: int,
                      name: str = "coco2017_5k") -> Path:
    """Write the reference images of ``prompts`` as ``{image_id:012d}.png`` at ``resolution`` (kept if present)."""
    images, out_dir = Path(images), Path(out_dir)
    if not images.is_dir():
        raise _missing("image folder", images, name, "--images")
    absent = [p["file_name"] for p in prompts if not (images / p["file_name"]).is_file()]
    if absent:
        raise _missing(f"images ({len(absent)} of {len(prompts)} absent, first {absent[0]})", images, name, "--images")
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in prompts:
        dst = out_dir / f"{p['image_id']:012d}.png"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp.png")
            with Image.open(images / p["file_name"]) as img:
                resize_for_fid(img, resolution).save(tmp)
            tmp.replace(dst)  # a killed run leaves no half-written reference image
    return out_dir


def cosine_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (N, D) image and text embeddings -> (N,)."""
    return torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)


def clip_summary(cos: torch.Tensor) -> dict:
    """Both CLIP-score conventions from per-image cosines (the means ``scoring`` takes of ``ClipScore``)."""
    return summarize(clip_per_image(np.asarray(cos, dtype=np.float32)))


class ClipScorer(torch.nn.Module):
    """CLIP image-text cosine of (images, captions); an injectable module, like the FID extractor."""

    def __init__(self, model: torch.nn.Module, tokenizer, image_processor, name: str = "custom") -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.image_processor, self.name = tokenizer, image_processor, name

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_CLIP) -> "ClipScorer":
        """A CLIP model, tokenizer and image processor by hub id or local folder (offline misses fail clearly)."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from instaflow.models.loading import from_pretrained

        return cls(from_pretrained(CLIPModel, name, what="CLIP model"),
                   from_pretrained(CLIPTokenizer, name, what="CLIP tokenizer"),
                   from_pretrained(CLIPImageProcessor, name, what="CLIP image processor"), name=name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] -> cosines (N,)."""

        arrays = list(to_uint8(images).permute(0, 2, 3, 1).cpu().numpy())  # N x (H, W, 3) uint8
        pixels = self.image_processor(images=arrays, return_tensors="pt").pixel_values.to(self.device)
        # truncation keeps the end-of-text token, where CLIP pools the text
        ids = self.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings).input_ids
        m = self.model
        image_embeds = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)  # (N, D)
        text_embeds = m.text_projection(m.text_model(input_ids=ids.to(self.device)).pooler_output)  # (N, D)
        return cosine_scores(image_embeds, text_embeds)


def protocol(name: str, n: int, seed: int, annotations: str | Path, fid_resolution: int, clip_model: str,
             steps: int | None = None, guidance: float | None = None, model: str | None = None,
             features: str = "Inception-v3 pool3 (clean-fid)") -> dict:
    """Everything a reported number depends on, written beside it."""
    spec = PROTOCOLS[name]
    return {
        "name": name, "annotations": Path(annotations).name, "images": spec["images"], "n": n,
        "caption_rule": CAPTION_RULE,
        "sample_rule": SAMPLE_RULE if n < spec["n_images"] else "all images, sorted by id",
        "sample_seed": seed, "noise_seed_rule": SEED_RULE,
        "fid": {"library": "clean-fid", "mode": "clean", "features": features,
                "resolution": fid_resolution, "distance": "instaflow.evaluation.scoring (float64 statistics)",
                "preprocess": "centre crop to square, PIL bicubic resize, PNG (generated and reference)"},
        "clip": {"model": clip_model, "score": "mean cos(image, text) (clip_score); mean 100*max(cos, 0) "
                 "(clip_score_100)", "max_tokens": 77},
        "model": model, "steps": steps, "guidance": guidance, "safety_checker": "off",
    }


class ResizedForFid(ImageFeatures):
    """``features`` of images centre-cropped and resized to ``resolution`` as their PNGs are (``resize_for_fid``)."""

    def __init__(self, features: ImageFeatures, resolution: int) -> None:
        self.features, self.resolution = features, resolution
        self.name = f"{features.name}_{resolution}px"

    def prepare(self, device: torch.device, download: bool = True) -> None:
        self.features.prepare(device, download)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.features(for_fid(images, self.resolution))


def for_fid(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] or uint8 -> uint8 (N, 3, r, r) as ``resize_for_fid`` writes them (kept when square at r)."""
    u8 = to_uint8(images)
    if u8.shape[-2:] == (resolution, resolution):
        return u8
    hwc = u8.permute(0, 2, 3, 1).cpu().numpy()
    return torch.stack([torch.from_numpy(np.array(resize_for_fid(Image.fromarray(a), resolution))).permute(2, 0, 1)
                        for a in hwc]) if len(hwc) else u8.new_zeros(0, 3, resolution, resolution)


def folder_stats(folder: Path, prompts: list[dict], features: ImageFeatures, batch_size: int = 64) -> tuple:
    """Reference statistics (mu, sigma) of the prompts' reference PNGs in ``folder``, read in batches."""
    feats = []
    for i in range(0, len(prompts), batch_size):
        arrays = [np.asarray(Image.open(folder / f"{p['image_id']:012d}.png").convert("RGB"))
                  for p in prompts[i:i + batch_size]]
        feats.append(features(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)))  # (B, 3, r, r) uint8
    return feature_stats(np.concatenate(feats))


def _load(model: str, device: str, bf16: bool) -> SamplesImages:
    """The model folder as a sampler on ``device``."""
    from instaflow.models.families import load_family

    pipe = load_family(model)  # any family's folder
    pipe.bf16 = bf16
    return pipe.to(device)


def evaluate(model: str | SamplesImages, out: str | Path, annotations: str | Path, images: str | Path,
             name: str = "coco2017_5k", steps: int = 1, guidance: float = 1.0, n: int | None = None, seed: int = 0,
             clip_model: str = DEFAULT_CLIP, fid_resolution: int | None = None, batch_size: int = 16,
             device: str | None = None, bf16: bool = True, clip: ClipScorer | None = None,
             features: ImageFeatures | None = None) -> dict:
    """Generate the protocol's images with ``model`` (a folder, or a loaded ``contracts.SamplesImages``), score
    FID and CLIP through ``scoring`` (``features``: clean-fid's Inception unless injected), write ``out/results.json``."""
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = coco_prompts(name, annotations, n, seed)  # fails first if the annotations are missing
    res = fid_resolution or PROTOCOLS[name]["fid_resolution"]
    ref_dir = prepare_reference(prompts, images, out.parent / f"reference_{name}_{len(prompts)}_{res}px", res, name)
    clip = (clip or ClipScorer.from_pretrained(clip_model)).to(device)
    feats = ResizedForFid(features or CleanFidInception(), res)
    feats.prepare(torch.device(device))
    pipe = _load(model, device, bf16) if isinstance(model, (str, Path)) else model
    gen_dir = out / f"generated_{res}px"
    gen_dir.mkdir(parents=True, exist_ok=True)
    values, t0 = [], time.time()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        captions = [p["caption"] for p in chunk]
        x = pipe.sample_images(captions, steps, guidance, [p["seed"] for p in chunk], batch_size=batch_size)
        values.append(per_image(x, PromptSet(captions, [p["seed"] for p in chunk]), feats, [ClipScore.loaded(clip)]))
        for p, img in zip(chunk, for_fid(x, res).permute(0, 2, 3, 1).cpu().numpy()):
            Image.fromarray(img).save(gen_dir / f"{p['image_id']:012d}.png")
    s = aggregate({k: np.concatenate([v[k] for v in values]) for k in values[0]}, folder_stats(ref_dir, prompts, feats))
    results = {"fid": s.fid, "clip_score": s.means["clip_score"], "clip_score_100": s.means["clip_score_100"],
               "n": len(prompts), "wall_s": round(time.time() - t0, 1),
               "protocol": protocol(name, len(prompts), seed, annotations, res, clip.name, steps, guidance,
                                    str(model) if isinstance(model, (str, Path)) else type(model).__name__,
                                    **({} if features is None else {"features": f"{feats.features.name} (injected)"}))}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    return results
