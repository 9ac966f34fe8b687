"""The embedded world: captioned scenes of coloured shapes, written as LAION-layout shards.

A scene is one to three shapes on a plain background. Each shape sits in one cell of a 3x3
grid and has a kind, a colour and a size; the caption says all of it in natural language
(several templates and synonyms), and the ground truth is kept in the sample's JSON so that
the evaluator can be trained on it and alignment can be scored against it.

Every sample is a pure function of ``(split_seed, index)``, so shards can be (re)written in
any order, in parallel, and a rerun reproduces them byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.couplings import is_complete, write_mark
from data.shards import write_tar

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
BACKGROUNDS = ("white", "black", "gray")
GRID = 3  # cells per side; a cell index is row * GRID + col
CELL_NAMES = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

RGB = {
    "red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 70, 225),
    "yellow": (235, 205, 25), "purple": (140, 45, 185), "orange": (245, 135, 25),
    "white": (242, 242, 242), "black": (18, 18, 18), "gray": (125, 125, 125),
}

# Synonyms make the text encoder do some work; each maps back to one attribute value.
SHAPE_WORDS = {
    "circle": ("circle", "disk", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
COLOR_WORDS = {
    "red": ("red", "scarlet"), "green": ("green",), "blue": ("blue",),
    "yellow": ("yellow",), "purple": ("purple", "violet"), "orange": ("orange",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
BG_WORDS = {"white": ("white",), "black": ("black", "dark"), "gray": ("gray", "grey")}
CELL_PHRASES = {
    "top left": ("in the top left", "in the upper left corner"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right", "in the upper right corner"),
    "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right", "in the lower right corner"),
}
TEMPLATES = (
    "{objects} on a {bg} background",
    "a picture of {objects}, {bg} background",
    "an image showing {objects} against a {bg} backdrop",
    "{objects}. the background is {bg}",
    "a drawing of {objects} on {bg}",
)
COUNT_PROBS = (0.5, 0.35, 0.15)  # one, two, three shapes

SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2, "train3": 3}
# Splits whose scenes all hold a fixed number of objects. "train3" is extra three-object training
# data for the teacher's last cycle: they are 15% of the world but where its binding fails most.
SPLIT_OBJECTS = {"train3": 3}


@dataclass
class Scene:
    background: str
    objects: list[dict] = field(default_factory=list)  # {shape, color, size, cell, cx, cy}
    caption: str = ""

    def to_json(self) -> dict:
        return {"background": self.background, "objects": self.objects, "caption": self.caption}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, resolution: int = 32, n_objects: int | None = None) -> Scene:
    """Draw the attributes and the caption of one scene (``n_objects``: fixed count, else COUNT_PROBS)."""
    n = int(rng.choice(len(COUNT_PROBS), p=COUNT_PROBS)) + 1
    if n_objects is not None:
        if not 1 <= n_objects <= len(COUNT_PROBS):
            raise ValueError(f"n_objects must be in 1..{len(COUNT_PROBS)}, got {n_objects}")
        n = n_objects
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    scene = Scene(background=_pick(rng, BACKGROUNDS))
    step = resolution / GRID
    for cell in sorted(int(c) for c in cells):
        row, col = divmod(cell, GRID)
        scene.objects.append({
            "shape": _pick(rng, SHAPES),
            "color": _pick(rng, COLORS),
            "size": _pick(rng, SIZES),
            "cell": cell,
            # a little jitter so the model cannot memorise pixel positions
            "cx": round((col + 0.5) * step + float(rng.uniform(-0.8, 0.8)), 2),
            "cy": round((row + 0.5) * step + float(rng.uniform(-0.8, 0.8)), 2),
        })
    order = rng.permutation(n)  # captions list objects in random order
    phrases = []
    for i in order:
        o = scene.objects[int(i)]
        phrases.append(
            f"a {_pick(rng, SIZE_WORDS[o['size']])} {_pick(rng, COLOR_WORDS[o['color']])} "
            f"{_pick(rng, SHAPE_WORDS[o['shape']])} {_pick(rng, CELL_PHRASES[CELL_NAMES[o['cell']]])}"
        )
    objects = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    scene.caption = _pick(rng, TEMPLATES).format(objects=objects, bg=_pick(rng, BG_WORDS[scene.background]))
    return scene


def render(scene: Scene, resolution: int = 32, supersample: int = 4, rng: np.random.Generator | None = None) -> Image.Image:
    """Render a scene with anti-aliased edges (drawn large, then downsampled)."""
    s = resolution * supersample
    bg = np.array(RGB[scene.background])
    if rng is not None:
        bg = np.clip(bg + rng.integers(-8, 9, size=3), 0, 255)
    img = Image.new("RGB", (s, s), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        col = np.array(RGB[o["color"]])
        if rng is not None:
            col = np.clip(col + rng.integers(-12, 13, size=3), 0, 255)
        fill = tuple(int(c) for c in col)
        r = (3.2 if o["size"] == "small" else 5.0) * supersample
        cx, cy = o["cx"] * supersample, o["cy"] * supersample
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            q = r * 0.88
            draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
        else:  # cross
            w = r * 0.36
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img.resize((resolution, resolution), Image.LANCZOS)


def make_sample(split_seed: int, index: int, resolution: int = 32,
                n_objects: int | None = None) -> tuple[Image.Image, Scene]:
    """The sample ``index`` of a split: a pure function of its seed and index."""
    rng = np.random.default_rng([split_seed, index])
    scene = sample_scene(rng, resolution, n_objects)
    return render(scene, resolution, rng=rng), scene


def write_shard(path: Path, shard: int, split_seed: int, start: int, count: int, resolution: int,
                n_objects: int | None = None) -> dict:
    """Write one img2dataset-layout shard atomically: ``{key}.jpg/.txt/.json`` + ``_stats.json``."""
    t0 = time.time()

    def members():
        for i in range(count):
            index = start + i
            img, scene = make_sample(split_seed, index, resolution, n_objects)
            key = f"{shard:05d}{i:04d}"
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            meta = {
                # the fields img2dataset writes for LAION, so filters written for LAION apply
                "key": key, "caption": scene.caption, "url": f"embedded://shapes/{split_seed}/{index}",
                "width": resolution, "height": resolution, "original_width": resolution,
                "original_height": resolution, "status": "success", "error_message": None,
                "similarity": 1.0, "punsafe": 0.0, "pwatermark": 0.0,
                # ground truth of the embedded world
                "index": index, "scene": scene.to_json(),
            }
            yield f"{key}.jpg", buf.getvalue()
            yield f"{key}.txt", scene.caption.encode("utf-8")
            yield f"{key}.json", json.dumps(meta).encode("utf-8")

    write_tar(path, members())
    stats = {
        "count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
        "duration": round(time.time() - t0, 3), "start_time": t0, "end_time": time.time(),
        "status_dict": {"success": count}, "split_seed": split_seed, "first_index": start,
    }
    write_mark(path, stats, indent=1, mark=_stats_path(path, shard))  # written last: it marks the shard complete
    return stats


def _stats_path(path: Path, shard: int) -> Path:
    return path.with_name(f"{shard:05d}_stats.json")


def shard_complete(path: Path, shard: int) -> bool:
    """Whether a shard and its completion mark exist, the mark readable (a cut mark of older code means redo)."""
    return is_complete(path, _stats_path(path, shard))


def write_split(out_dir: str | Path, split: str, num_samples: int, samples_per_shard: int = 1000,
                seed: int = 0, resolution: int = 32, progress: bool = True) -> list[Path]:
    """Write one split as numbered shards; complete shards from an earlier run are kept."""
    from tqdm.auto import tqdm

    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    split_seed = seed * 10 + SPLIT_OFFSETS[split]
    n_shards = (num_samples + samples_per_shard - 1) // samples_per_shard
    paths = []
    for shard in tqdm(range(n_shards), desc=f"shapes/{split}", disable=not progress):
        path = split_dir / f"{shard:05d}.tar"
        paths.append(path)
        if shard_complete(path, shard):
            continue
        start = shard * samples_per_shard
        write_shard(path, shard, split_seed, start, min(samples_per_shard, num_samples - start), resolution,
                    SPLIT_OBJECTS.get(split))
    return paths


def brace_pattern(split_dir: str | Path, n_shards: int) -> str:
    """The shard list of a split as a WebDataset brace pattern (``.../{00000..00039}.tar``)."""
    return str(Path(split_dir) / f"{{00000..{n_shards - 1:05d}}}.tar")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the embedded shapes world as LAION-layout shards.")
    p.add_argument("--out", default=os.path.join(os.environ.get("INSTAFLOW_HOME", "runs"), "data", "shapes"))
    p.add_argument("--train", type=int, default=40_000)
    p.add_argument("--val", type=int, default=2_000)
    p.add_argument("--test", type=int, default=4_000)
    p.add_argument("--train3", type=int, default=10_000, help="extra three-object training scenes")
    p.add_argument("--per-shard", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    a = p.parse_args(argv)
    for split, n in (("train", a.train), ("val", a.val), ("test", a.test), ("train3", a.train3)):
        if n == 0:
            continue
        paths = write_split(a.out, split, n, a.per_shard, a.seed, a.resolution)
        print(f"{split}: {n} samples in {len(paths)} shards -> {brace_pattern(Path(a.out) / split, len(paths))}")


if __name__ == "__main__":
    main()
