"""The embedded evaluator and its metrics: scenes, alignment, clean-fid features, FID, export/load."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instaflow.evaluation import fid
from instaflow.evaluation.shapes_evaluator import (
    ShapesEvaluator, accuracies_by_objects, alignment_score, attribute_accuracies, batch_targets,
    load_evaluator,
    logits_to_scenes, predict_scenes, scene_matches, scene_targets,
)
from lightning_modules.embedded.evaluator import EvaluatorTraining

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "assets" / "embedded-evaluator"
TEST_SHARDS = ROOT / "runs" / "data" / "shapes" / "test"

SCENE = {
    "background": "gray",
    "objects": [
        {"shape": "circle", "color": "red", "size": "large", "cell": 0, "cx": 5.1, "cy": 5.3},
        {"shape": "cross", "color": "blue", "size": "small", "cell": 4, "cx": 16.0, "cy": 15.7},
    ],
    "caption": "a big red circle in the top left and a tiny blue cross in the middle on a gray background",
}


def _edit(scene: dict, **changes) -> dict:
    out = {"background": scene["background"], "objects": [dict(o) for o in scene["objects"]]}
    for k, v in changes.items():
        if k == "background":
            out["background"] = v
        else:  # e.g. color0="green" changes objects[0]["color"]
            out["objects"][int(k[-1])][k[:-1]] = v
    return out


class _Oracle(torch.nn.Module):
    """Returns one-hot logits of fixed targets, whatever the image: a stand-in for a perfect model."""

    def __init__(self, scenes: list[dict]) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        t = batch_targets(scenes)
        sizes = {"occupancy": 2, "shape": 4, "color": 6, "size": 2, "background": 3}
        self.logits = {k: torch.nn.functional.one_hot(t[k].clamp_min(0), sizes[k]).float() * 10 for k in sizes}

    def forward(self, x: torch.Tensor) -> dict:
        return {k: v[: len(x)] for k, v in self.logits.items()}


def test_scene_targets_and_predict_round_trip():
    t = scene_targets(SCENE)
    assert t["occupancy"].tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 0]
    assert t["shape"][0] == 0 and t["shape"][4] == 3 and t["shape"][1] == -100
    assert t["color"][4] == 2 and t["size"][0] == 1 and int(t["background"]) == 2
    preds = predict_scenes(_Oracle([SCENE]), torch.zeros(1, 3, 32, 32))
    assert preds == [{"background": "gray", "objects": [
        {"cell": 0, "shape": "circle", "color": "red", "size": "large"},
        {"cell": 4, "shape": "cross", "color": "blue", "size": "small"}]}]
    assert scene_matches(preds[0], SCENE, ("cell", "shape", "color", "size"))


def test_scene_matches_cases():
    assert scene_matches(SCENE, SCENE)
    assert not scene_matches(_edit(SCENE, color0="green"), SCENE)              # wrong colour
    assert not scene_matches(_edit(SCENE, shape1="square"), SCENE)             # wrong shape
    assert not scene_matches({"background": "gray", "objects": SCENE["objects"][:1]}, SCENE)  # missing
    extra = _edit(SCENE)
    extra["objects"].append({"shape": "square", "color": "red", "size": "small", "cell": 8})
    assert not scene_matches(extra, SCENE)                                     # extra object
    assert not scene_matches(_edit(SCENE, background="white"), SCENE)          # wrong background
    assert scene_matches(_edit(SCENE, background="white"), SCENE, background=False)
    assert not scene_matches(_edit(SCENE, cell1=5), SCENE)                     # moved object
    assert scene_matches(_edit(SCENE, cell1=5), SCENE, ("shape", "color"))     # ... position-free match
    assert scene_matches(_edit(SCENE, size0="small"), SCENE)                   # size is not in alignment
    assert not scene_matches(_edit(SCENE, size0="small"), SCENE, ("cell", "shape", "color", "size"))


def test_alignment_score_and_accuracies():
    preds = [SCENE, _edit(SCENE, color0="green"), _edit(SCENE, size1="large")]
    assert alignment_score(preds, [SCENE] * 3) == pytest.approx(2 / 3)
    acc = attribute_accuracies(preds, [SCENE] * 3)
    assert acc["alignment"] == pytest.approx(2 / 3) and acc["alignment_with_size"] == pytest.approx(1 / 3)
    assert acc["color"] == pytest.approx(5 / 6) and acc["size"] == pytest.approx(5 / 6)
    assert acc["shape"] == acc["cells"] == acc["background"] == acc["count"] == 1.0
    missing = {"background": "gray", "objects": SCENE["objects"][1:]}
    acc = attribute_accuracies([missing], [SCENE])
    assert acc["shape"] == acc["color"] == acc["size"] == 0.5 and acc["cells"] == 0.0
    with pytest.raises(ValueError):
        alignment_score(preds, [SCENE])


def test_evaluator_shapes_and_loss_ignores_empty_cells():
    torch.manual_seed(0)
    module = EvaluatorTraining(width=8, feature_dim=16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert module.model.features(x).shape == (2, 16)
    logits = module.model(x)
    assert logits["occupancy"].shape == (2, 9, 2) and logits["color"].shape == (2, 9, 6)
    assert logits["background"].shape == (2, 3)
    parts = module._losses(logits, batch_targets([SCENE, SCENE]))
    assert torch.isfinite(parts["loss"]) and len(logits_to_scenes(logits)) == 2


def _png_folder(folder: Path, n: int = 5) -> torch.Tensor:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def test_cleanfid_features_equal_image_features(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ShapesEvaluator(width=8, feature_dim=16)
    images = _png_folder(tmp_path / "imgs")
    seen = []
    forward = fid.EvaluatorFeatures.forward

    def spy(self, x):
        seen.append(x.clone())
        return forward(self, x)

    monkeypatch.setattr(fid.EvaluatorFeatures, "forward", spy)
    f_folder = fid.folder_features(tmp_path / "imgs", model, batch_size=3)
    # clean-fid feeds float32 (B, 3, 32, 32) in 0..255: integers, since keep_resize leaves 32x32 alone
    assert seen[0].dtype == torch.float32 and seen[0].shape == (3, 3, 32, 32)
    assert torch.equal(torch.cat(seen[:2]), images.float())
    f_mem = fid.image_features(images, model)
    assert f_folder.shape == (5, 16)
    np.testing.assert_allclose(f_folder, f_mem, rtol=0, atol=1e-5)
    # float images in [0, 1] are quantised as saving the PNG did
    np.testing.assert_allclose(fid.image_features(images.float() / 255, model), f_mem, rtol=0, atol=1e-6)
    # other sizes get clean-fid's bicubic resize to 32x32, not 299
    assert fid.keep_resize(np.zeros((64, 64, 3), np.uint8)).shape == (32, 32, 3)


def test_fid_from_features_and_bootstrap():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 8))
    assert fid.fid_from_features(f, f) == pytest.approx(0, abs=1e-6)
    g = rng.normal(size=(400, 8))
    fids = [fid.fid_from_features(g + s, f) for s in (0.0, 0.5, 1.0)]
    assert fids[0] < fids[1] < fids[2] and fids[2] == pytest.approx(8.0, rel=0.15)  # ||shift||^2 = 8
    point, low, high = fid.fid_bootstrap(g + 0.5, f, n=50, seed=0)
    assert point == pytest.approx(fids[1]) and low <= point <= high and high - low > 0
    assert fid.fid_bootstrap(g + 0.5, f, n=50, seed=0) == (point, low, high)  # seeded


def test_inception_fid_missing_weights_message(tmp_path, monkeypatch):
    from cleanfid import downloads_helper

    target = tmp_path / fid.INCEPTION_FILE
    monkeypatch.setattr(fid, "inception_weights_path", lambda: target)

    def offline(fpath):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(downloads_helper, "check_download_inception", offline)
    with pytest.raises(fid.InceptionWeightsMissing) as e:
        fid.inception_fid(tmp_path, tmp_path)
    msg = str(e.value)
    assert fid.INCEPTION_FILE in msg and str(target) in msg and downloads_helper.inception_url in msg
    with pytest.raises(fid.InceptionWeightsMissing):
        fid.inception_fid(tmp_path, tmp_path, download=False)


def test_load_evaluator_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        load_evaluator(missing)
    assert str(missing) in str(e.value) and "make train-evaluator" in str(e.value)


def test_export_load_round_trip(tmp_path):
    torch.manual_seed(0)
    module = EvaluatorTraining(width=8, feature_dim=16)
    path = module.export(tmp_path / "ev")
    loaded = load_evaluator(path)
    assert not loaded.training
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    module.model.eval()
    with torch.no_grad():
        a, b = module.model(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(module.model.features(x), loaded.features(x))


def test_accuracies_by_number_of_objects():
    one = {"background": "gray", "objects": SCENE["objects"][:1]}
    swapped = _edit(SCENE, color0="blue", color1="red")  # both colours present, bound to the wrong objects
    by = accuracies_by_objects([one, SCENE, swapped], [one, SCENE, SCENE])
    assert set(by) == {"1", "2"}
    assert by["1"] == {"prompts": 1, "alignment": 1.0, "shape": 1.0, "color": 1.0, "cells": 1.0}
    assert by["2"]["prompts"] == 2 and by["2"]["alignment"] == 0.5
    assert by["2"]["color"] == 0.5 and by["2"]["shape"] == by["2"]["cells"] == 1.0


def test_vae_reconstructions_are_images_in_unit_range(tiny_sd_folder):
    from instaflow.evaluation.protocol import vae_reconstructions
    from instaflow.models.loading import load_vae

    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    rec = vae_reconstructions(load_vae(str(tiny_sd_folder)), images, batch_size=2)
    assert rec.shape == (5, 3, 16, 16) and rec.dtype == torch.float32 and 0 <= rec.min() and rec.max() <= 1
    assert torch.equal(rec[2:4], vae_reconstructions(load_vae(str(tiny_sd_folder)), images[2:4]))  # mode: deterministic


def test_real_test_set_and_score_images(tmp_path):
    from data.shapes import write_shard
    from instaflow.evaluation.protocol import real_test_set, score_images

    write_shard(tmp_path / "00000.tar", 0, split_seed=2, start=0, count=6, resolution=32)
    images, scenes, captions = real_test_set(str(tmp_path / "00000.tar"), n=4, offset=2)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and len(scenes) == len(captions) == 4
    first, first_scenes, _ = real_test_set(str(tmp_path / "00000.tar"), n=6)
    assert torch.equal(first[2:], images)
    torch.manual_seed(0)
    model = ShapesEvaluator(width=8, feature_dim=2).eval()
    ref = fid.image_features(first, model)
    out = score_images(images.float() / 255, scenes, ref, model, n_bootstrap=10)
    assert out["fid_low"] <= out["fid"] <= out["fid_high"] and out["n"] == 4 and out["n_ref"] == 6
    # the alignment is the evaluator's exact-match rate on the same uint8 pixels, computed independently here
    want = attribute_accuracies(predict_scenes(model, images.float() / 127.5 - 1.0), scenes)
    assert out["alignment"] == want["alignment"] and out["size_accuracy"] == want["size"]
    assert out["shape_accuracy"] == want["shape"] and out["background_accuracy"] == want["background"]
    assert sum(v["prompts"] for v in out["by_objects"].values()) == 4
    # FID of the reference set against itself is 0; uint8 and [0, 1] float inputs score alike
    same = score_images(first, first_scenes, ref, model, n_bootstrap=0)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert score_images(first.float() / 255, first_scenes, ref, model, n_bootstrap=0)["fid"] == pytest.approx(same["fid"], abs=1e-9)
    with pytest.raises(ValueError):
        real_test_set(str(tmp_path / "00000.tar"), n=6, offset=1)


@pytest.mark.slow
@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file() or not (TEST_SHARDS / "00000.tar").is_file(),
                    reason="needs assets/embedded-evaluator (make train-evaluator) and the test shards (make data)")
def test_trained_evaluator_aligns_real_test_images():
    from instaflow.evaluation.protocol import real_test_set

    images, scenes, _ = real_test_set(str(TEST_SHARDS / "00000.tar"), n=256)
    preds = predict_scenes(load_evaluator(ASSET), images.float() / 127.5 - 1)
    assert alignment_score(preds, scenes) >= 0.95


def test_frechet_to_reference_matches_clean_fid():
    from cleanfid.fid import frechet_distance

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    to_ref = fid.FrechetToReference(*fid.feature_stats(ref))
    for shift in (0.0, 0.3, 2.0):
        gen = rng.normal(size=(300, 16)) * 1.3 + shift
        expected = frechet_distance(*fid.feature_stats(gen), *fid.feature_stats(ref))
        assert to_ref(*fid.feature_stats(gen)) == pytest.approx(expected, rel=1e-7, abs=1e-9)



def test_latency_interleaves_models_and_repeats_cheap_ones(monkeypatch):
    import time as _time

    from instaflow.evaluation import results

    calls = []

    class Fake:
        latent_shape = (4, 2, 2)
        bf16 = True

        def __init__(self, name, seconds, bf16_factor):
            self.name, self.seconds, self.bf16_factor, self.unet_bf16 = name, seconds, bf16_factor, None

        def encode(self, prompts, w):
            return torch.zeros(len(prompts), 2, 3), (torch.zeros(len(prompts), 2, 3) if w > 1.0 else None)

        def _unet_s(self):  # the UNet half of a call, slower or faster under bf16 autocast
            return self.seconds / 2 * (self.bf16_factor if self.unet_bf16 else 1.0)

        def sample(self, prompts, steps, w, seed=0, batch_size=1):
            calls.append(self.name)
            _time.sleep(self.seconds / 2 + self._unet_s())

        def sample_latents(self, prompts, steps, w, x0=None, states=None):
            assert (states[1] is not None) == (w > 1.0)  # guidance gets the empty caption's states
            _time.sleep(self._unet_s())

    # the slow model's UNet is slower in bf16 (fp32 is chosen), the fast one's faster (bf16 is chosen)
    models_ = {"slow": (Fake("slow", 0.04, 2.0), 25, 3.0), "fast": (Fake("fast", 0.004, 0.25), 1, 1.0)}
    out = results.latency(models_, "a prompt", batch_size=1, rounds=3, warmup=1, min_round_s=0.02)
    timed = calls[2:]  # after one warm-up call each
    assert timed[:1] == ["slow"] and timed.count("slow") == 3  # one slow call per round ...
    assert timed.index("fast") == 1 and timed[-1] == "fast"  # ... then the fast model, round after round
    assert out["fast"]["latency_rounds"] == timed.count("fast") > 3  # cheap model repeated within rounds
    assert out["slow"]["latency_s"] > out["fast"]["latency_s"] > 0
    assert out["slow"]["latency_unet_s"] < out["slow"]["latency_s"]
    assert out["slow"]["latency_unet_precision"] == "fp32" and out["fast"]["latency_unet_precision"] == "bf16"
    assert all(m.unet_bf16 is None for m, _, _ in models_.values())  # restored afterwards
