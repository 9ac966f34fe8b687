"""The embedded shapes world: scenes, captions, renders, and the LAION-layout shards it writes."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # the machine is shared with a training job

from data import shapes  # noqa: E402
from data.shapes import (  # noqa: E402
    BG_WORDS, CELL_NAMES, CELL_PHRASES, COLOR_WORDS, GRID, RGB, SHAPE_WORDS, SIZE_WORDS, TEMPLATES,
    brace_pattern, make_sample, write_split,
)


def _alts(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _object_regex(o: dict) -> re.Pattern:
    """``a {size} {colour} {shape} {position}`` with any synonym of the ground-truth attributes."""
    return re.compile(
        f"a {_alts(SIZE_WORDS[o['size']])} {_alts(COLOR_WORDS[o['color']])} "
        f"{_alts(SHAPE_WORDS[o['shape']])} {_alts(CELL_PHRASES[CELL_NAMES[o['cell']]])}"
    )


def _parse_caption(caption: str, background: str) -> list[str]:
    """Match the caption against the templates; return its object phrases (fails if no template fits)."""
    for t in TEMPLATES:
        pat = re.escape(t).replace(re.escape("{objects}"), "(?P<objects>.+)").replace(
            re.escape("{bg}"), f"(?P<bg>{_alts(BG_WORDS[background])})")
        m = re.fullmatch(pat, caption)
        if m:
            return re.split(r", | and ", m.group("objects"))
    raise AssertionError(f"caption fits no template with background {background!r}: {caption!r}")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- make_sample --------------------------------------------------------------------------------

def test_make_sample_is_a_pure_function_of_seed_and_index():
    img_a, scene_a = make_sample(5, 17)
    img_b, scene_b = make_sample(5, 17)
    assert _png(img_a) == _png(img_b)
    assert scene_a.caption == scene_b.caption and scene_a.to_json() == scene_b.to_json()
    # other indices and other seeds give other samples
    others = [make_sample(5, 18), make_sample(5, 16), make_sample(6, 17)]
    for img, scene in others:
        assert _png(img) != _png(img_a)
    assert len({scene_a.caption} | {s.caption for _, s in others}) == 4


def test_captions_describe_the_ground_truth_scene():
    counts = {1: 0, 2: 0, 3: 0}
    for index in range(60):
        img, scene = make_sample(0, index)
        assert img.size == (32, 32) and img.mode == "RGB"
        n = len(scene.objects)
        assert 1 <= n <= 3
        counts[n] += 1
        cells = [o["cell"] for o in scene.objects]
        assert len(set(cells)) == n and all(0 <= c < GRID * GRID for c in cells)
        assert scene.background in BG_WORDS
        # every object phrase matches exactly one object, and every object has its phrase
        phrases = _parse_caption(scene.caption, scene.background)
        assert len(phrases) == n, (scene.caption, scene.objects)
        matched = [[i for i, o in enumerate(scene.objects) if _object_regex(o).fullmatch(p)] for p in phrases]
        assert all(len(m) >= 1 for m in matched), (scene.caption, scene.objects)
        assert sorted(m[0] for m in matched) == list(range(n)), (scene.caption, scene.objects)
        # the JSON ground truth round-trips
        assert json.loads(json.dumps(scene.to_json())) == scene.to_json()
    assert all(c > 0 for c in counts.values()), counts  # 1, 2 and 3 objects all occur


def test_render_puts_each_object_colour_at_its_centre():
    for index in range(40):
        img, scene = make_sample(3, index)
        a = np.asarray(img).astype(int)
        assert a.shape == (32, 32, 3)
        for o in scene.objects:
            row, col = divmod(o["cell"], GRID)
            step = 32 / GRID
            # the centre lies in the object's grid cell (up to the jitter)
            assert abs(o["cx"] - (col + 0.5) * step) <= 0.8 + 1e-6
            assert abs(o["cy"] - (row + 0.5) * step) <= 0.8 + 1e-6
            p = a[int(o["cy"]), int(o["cx"])]
            target = np.array(RGB[o["color"]])
            assert np.abs(p - target).max() <= 32, (index, o, p)
            # and it is nearer its own colour than any other colour of the palette (backgrounds included)
            dist = {k: np.abs(p - np.array(v)).sum() for k, v in RGB.items()}
            assert min(dist, key=dist.get) == o["color"], (index, o, p)
        # the top-left pixel shows the background unless an object sits in that corner cell
        if 0 not in [o["cell"] for o in scene.objects]:
            assert np.abs(a[0, 0] - np.array(RGB[scene.background])).max() <= 16


# -- write_split -------------------------------------------------------------------------------

def _members(path) -> list[str]:
    with tarfile.open(path) as t:
        return t.getnames()


def test_write_split_layout_and_stats(tmp_path):
    paths = write_split(tmp_path, "train", 25, samples_per_shard=10, seed=0, progress=False)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar", "00002_stats.json"]
    keys = []
    for shard, (path, n) in enumerate(zip(paths, (10, 10, 5))):
        names = _members(path)
        shard_keys = [f"{shard:05d}{i:04d}" for i in range(n)]
        assert names == [f"{k}.{ext}" for k in shard_keys for ext in ("jpg", "txt", "json")]
        keys += shard_keys
        stats = json.loads(path.with_name(f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == n and stats["successes"] == n and stats["first_index"] == shard * 10
        assert stats["split_seed"] == 0
        with tarfile.open(path) as t:
            for i, key in enumerate(shard_keys):
                caption = t.extractfile(f"{key}.txt").read().decode("utf-8")
                meta = json.loads(t.extractfile(f"{key}.json").read())
                jpg = Image.open(io.BytesIO(t.extractfile(f"{key}.jpg").read()))
                assert jpg.format == "JPEG" and jpg.size == (32, 32) and jpg.mode == "RGB"
                index = shard * 10 + i
                _, scene = make_sample(0, index)
                assert caption == scene.caption == meta["caption"] == meta["scene"]["caption"]
                assert meta["key"] == key and meta["index"] == index and meta["scene"] == scene.to_json()
                assert meta["status"] == "success" and meta["width"] == meta["height"] == 32
    assert len(set(keys)) == 25
    assert not list(tmp_path.rglob("*.tmp"))
    # the brace pattern names exactly these shards
    from data.laion import expand_shards
    assert expand_shards(brace_pattern(tmp_path / "train", 3)) == [str(p) for p in paths]


def test_write_split_resumes_and_rewrites_identically(tmp_path):
    paths = write_split(tmp_path, "val", 30, samples_per_shard=10, seed=1, progress=False)
    original = [p.read_bytes() for p in paths]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    # a rerun keeps complete shards untouched
    assert write_split(tmp_path, "val", 30, samples_per_shard=10, seed=1, progress=False) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    # a missing shard, and a shard whose stats are missing (it was cut off before), are rewritten
    paths[1].unlink()
    paths[2].with_name("00002_stats.json").unlink()
    write_split(tmp_path, "val", 30, samples_per_shard=10, seed=1, progress=False)
    assert paths[1].exists() and paths[2].with_name("00002_stats.json").exists()
    assert [p.read_bytes() for p in paths] == original  # byte for byte: tar mtimes are 0
    assert paths[0].stat().st_mtime_ns == mtimes[0]
    assert json.loads(paths[1].with_name("00001_stats.json").read_text())["count"] == 10
    with tarfile.open(paths[1]) as t:
        assert {m.mtime for m in t.getmembers()} == {0}
    assert not list(tmp_path.rglob("*.tmp"))


def test_splits_use_different_seeds(tmp_path):
    shards = {s: write_split(tmp_path, s, 5, samples_per_shard=5, seed=0, progress=False)[0]
              for s in ("train", "val", "test")}
    captions, images, seeds = {}, {}, {}
    for split, path in shards.items():
        with tarfile.open(path) as t:
            names = t.getnames()
            captions[split] = [t.extractfile(n).read() for n in names if n.endswith(".txt")]
            images[split] = [t.extractfile(n).read() for n in names if n.endswith(".jpg")]
        seeds[split] = json.loads(path.with_name("00000_stats.json").read_text())["split_seed"]
    assert seeds == {"train": 0, "val": 1, "test": 2}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert captions[a] != captions[b]
        assert all(x != y for x, y in zip(images[a], images[b]))  # not one image in common position
    # and each split is its own seed's make_sample
    assert captions["val"][0].decode() == make_sample(1, 0)[1].caption
    assert captions["test"][4].decode() == make_sample(2, 4)[1].caption


def test_three_object_split_holds_only_three_object_scenes_of_its_own_seed(tmp_path):
    path = write_split(tmp_path, "train3", 40, samples_per_shard=40, seed=0, progress=False)[0]
    with tarfile.open(path) as t:
        metas = [json.load(t.extractfile(n)) for n in t.getnames() if n.endswith(".json")]
    assert len(metas) == 40 and {len(m["scene"]["objects"]) for m in metas} == {3}
    for m in metas:  # every object is said in the caption, and the cells are distinct
        assert len(_parse_caption(m["caption"], m["scene"]["background"])) == 3
        assert len({o["cell"] for o in m["scene"]["objects"]}) == 3
    assert json.loads(path.with_name("00000_stats.json").read_text())["split_seed"] == 3
    train = {make_sample(0, i)[1].caption for i in range(40)}
    test = {make_sample(2, i)[1].caption for i in range(40)}
    assert not train & {m["caption"] for m in metas} and not test & {m["caption"] for m in metas}
    # the default world is unchanged: its object counts still follow COUNT_PROBS
    counts = np.bincount([len(make_sample(0, i)[1].objects) for i in range(600)], minlength=4)[1:] / 600
    assert np.allclose(counts, shapes.COUNT_PROBS, atol=0.06)
    with pytest.raises(ValueError, match="n_objects"):
        shapes.sample_scene(np.random.default_rng(0), n_objects=4)


def test_main_writes_all_splits(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path), "--train", "4", "--val", "2", "--test", "3", "--train3", "2",
                 "--per-shard", "2"])
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert sorted(p.name for p in (tmp_path / "train3").glob("*.tar")) == ["00000.tar"]
    assert sorted(p.name for p in (tmp_path / "val").glob("*.tar")) == ["00000.tar"]
    assert sorted(p.name for p in (tmp_path / "test").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert json.loads((tmp_path / "test" / "00001_stats.json").read_text())["count"] == 1
    out = capsys.readouterr().out
    assert "{00000..00001}.tar" in out
