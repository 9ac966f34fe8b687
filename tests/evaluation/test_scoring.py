"""One scoring path: the same images and extractor give the same FID, alignment and CLIP score through every
entry point (the results table's ``protocol.score_images``, the quality callback, ``coco.evaluate``), and the
results table's arithmetic is the one it had before (``fid_bootstrap`` of ``image_features``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instaflow.evaluation import scoring
from instaflow.evaluation.quality import ImageFeatures, PromptSet
from tests.evaluation.test_coco import fake_coco, tiny_clip  # noqa: F401  (a fixture and a builder)


class SmallFeatures(ImageFeatures):
    """A fixed random network standing in for Inception: (N, 3, H, W) -> (N, 4)."""

    name = "small_features"

    def prepare(self, device, download=True) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten()).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        from instaflow.evaluation.fid import to_uint8

        return 10 * self.net(to_uint8(images).float() / 255).numpy()


def callback_metrics(cb, images: torch.Tensor, tmp_path, tag: str = "euler1_w1") -> dict:
    """What ``callbacks.quality.Quality`` logs for ``images`` (one process, the module returning them)."""
    class Module:  # contracts.SamplesImages
        solver_tag, device = "euler", torch.device("cpu")

        def sample_images(self, prompts, steps, guidance, seeds, batch_size=256):
            return images

    logged = []
    trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=3, callback_metrics={}, log_dir=str(tmp_path),
                              default_root_dir=str(tmp_path), callbacks=[],
                              loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append(m))],
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj, root_device=torch.device("cpu"),
                                                       is_global_zero=True))
    cb._set = cb.prompts.load()
    cb.features.prepare(torch.device("cpu"))
    for s in cb.scores:
        s.prepare(torch.device("cpu"))
    cb._score(trainer, Module())
    (metrics,) = logged
    return {k.removeprefix("quality/").removesuffix(f"_{tag}"): v for k, v in metrics.items() if tag in k}


def test_embedded_fid_and_alignment_are_equal_through_every_entry_point(tiny_world, tmp_path):
    from callbacks.quality import Quality, Setting
    from instaflow.evaluation.fid import fid_bootstrap, image_features
    from instaflow.evaluation.protocol import real_test_set, scene_prompts, score_images, score_images_per_image
    from instaflow.evaluation.quality import EmbeddedAlignment, EmbeddedFeatures, ShardPrompts
    from instaflow.evaluation.shapes_evaluator import (ShapesEvaluator, alignment_score, predict_scenes,
                                                       save_evaluator)

    torch.manual_seed(0)
    folder = save_evaluator(ShapesEvaluator(width=8, feature_dim=4), tmp_path / "evaluator")
    real, scenes, _ = real_test_set(tiny_world.val, 16, resolution=16)
    images = real[:8].float().roll(2, dims=-1) / 255  # (8, 3, 16, 16): "generated" for prompts [0, 8)
    ev = EmbeddedFeatures(str(folder))
    ev.prepare(torch.device("cpu"))
    ref = image_features(real[8:], ev._model)  # the reference: images [8, 16), as eval_protocol reads them

    table = score_images(images, scenes[:8], ref, ev._model, n_bootstrap=0)  # results table, ablation, floors
    curve = callback_metrics(Quality(ShardPrompts(tiny_world.val, n=8, resolution=16), EmbeddedFeatures(str(folder)),
                                     [EmbeddedAlignment(str(folder))], settings=[Setting(1, 1.0)]), images, tmp_path)
    direct = scoring.score(images, scene_prompts(scenes[:8]), EmbeddedFeatures.loaded(ev._model),
                           [EmbeddedAlignment.loaded(ev._model)], scoring.reference_of(ref))
    assert table["fid"] == curve["fid"] == direct.fid > 0
    assert table["alignment"] == curve["alignment"] == direct.means["alignment"]
    # the arithmetic of the results table (results/embedded.md) is the one before the single path: same ops, same order
    u8 = (images * 255).round().to(torch.uint8)
    for n_boot in (0, 30):
        before = fid_bootstrap(image_features(u8, ev._model), ref, n=n_boot, seed=0)
        now = score_images(images, scenes[:8], ref, ev._model, n_bootstrap=n_boot)
        np.testing.assert_array_equal([now["fid"], now["fid_low"], now["fid_high"]], before)
    assert table["alignment"] == alignment_score(predict_scenes(ev._model, u8.float() / 127.5 - 1.0), scenes[:8])
    # the ablation's rows keep the per-image values the record was computed from
    rec, values = score_images_per_image(images, scenes[:8], ref, ev._model, n_bootstrap=0)
    assert rec["fid"] == table["fid"] and values[scoring.FEATURES].shape == (8, 4)
    assert values["alignment"].mean() == table["alignment"]


def test_coco_fid_and_clip_are_equal_through_every_entry_point(fake_coco, tmp_path):  # noqa: F811
    from callbacks.quality import Quality, Setting
    from instaflow.evaluation import coco
    from instaflow.evaluation.quality import ClipScore, CocoPrompts

    ann, folder, _ = fake_coco
    scorer = coco.ClipScorer(*tiny_clip(tmp_path))
    n, res = 6, 16
    images = torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(1))

    class Sampler:  # contracts.SamplesImages: prompt i's image from its noise seed i
        solver_tag = "euler"

        def sample_images(self, prompts, steps, guidance, seeds, batch_size=256):
            return images[seeds]

    res_coco = coco.evaluate(Sampler(), tmp_path / "eval", ann, folder, "coco2017_5k", n=n, fid_resolution=res,
                             batch_size=4, device="cpu", clip=scorer, features=SmallFeatures())
    curve = callback_metrics(Quality(CocoPrompts(str(ann), str(folder), n=n, resolution=res), SmallFeatures(),
                                     [ClipScore.loaded(scorer)], settings=[Setting(1, 1.0)]), images, tmp_path)
    prompts = coco.coco_prompts("coco2017_5k", ann, n)
    feats = SmallFeatures()
    feats.prepare("cpu")
    ref = feats(CocoPrompts(str(ann), str(folder), n=n, resolution=res).reference_images())
    direct = scoring.score(images, PromptSet([p["caption"] for p in prompts], list(range(n))), feats,
                           [ClipScore.loaded(scorer)], scoring.reference_of(ref))
    assert res_coco["fid"] == pytest.approx(curve["fid"], rel=1e-12) == pytest.approx(direct.fid, rel=1e-12)
    assert res_coco["fid"] > 0
    for k in ("clip_score", "clip_score_100"):
        assert res_coco[k] == pytest.approx(curve[k], rel=1e-12) == pytest.approx(direct.means[k], rel=1e-12)
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["fid"] == res_coco["fid"]


def test_aggregate_skips_nan_and_bootstraps_only_when_asked():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 3))
    values = {scoring.FEATURES: rng.normal(size=(40, 3)) + 0.5, "hit": np.r_[np.ones(10), np.zeros(10), np.full(20, np.nan)],
              "never": np.full(40, np.nan)}
    s = scoring.aggregate(values, scoring.reference_of(ref))
    assert s.n == 40 and s.means == {"hit": 0.5} and np.isnan(s.fid_low) and np.isnan(s.fid_high)
    b = scoring.aggregate(values, scoring.reference_of(ref), n_bootstrap=50)
    assert b.fid == s.fid and b.fid_low <= b.fid <= b.fid_high
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        scoring.per_image(torch.zeros(3, 3, 8, 8), PromptSet(["a", "b"], [0, 1]), SmallFeatures())
