"""The quality callback: embedded scores as before, 1 process == DDP == FSDP2, clear misses at fit start,
checkpoints kept by score and the best one exported."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from instaflow.evaluation.quality import ImageFeatures, PromptSet, gathered_order, rank_share
from tests.lightning_modules.test_chain import BASE, cli
from tests.lightning_modules.test_distributed import FSDP2, reflow_yaml, run_2proc, write_step_shards

STEPS, EVERY, N = 4, 2, 7  # 7 prompts: 2 ranks get 4 each, one padded


class TinyFeatures(ImageFeatures):
    """A small fixed random network standing in for Inception (4-D features: 7 images give a full-rank covariance)."""

    name = "tiny_features"

    def prepare(self, device, download=True) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveMaxPool2d(1),
                                       torch.nn.Flatten()).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        from instaflow.evaluation.fid import to_uint8

        return 10 * self.net(to_uint8(images).float() / 255).numpy()  # (N, 4)


def test_rank_share_covers_every_prompt_once_with_equal_blocks():
    for n in (1, 6, 7, 256):
        for world in (1, 2, 3, 8):
            shares = [rank_share(n, r, world) for r in range(world)]
            assert len({len(idx) for idx, _ in shares}) == 1  # equal batches on every rank (FSDP2 collectives)
            rows = [i for idx, _ in shares for i in idx]
            assert [rows[p] for p in gathered_order(n, world)] == list(range(n))
            assert sum(real for _, real in shares) == n


def test_embedded_scores_equal_the_results_protocol(tiny_world, tmp_path):
    """With the embedded extractor the callback logs what ``protocol.score_images`` gives for the same images
    (the scores SampleQuality logged: its metric names, FID and alignment per number of objects)."""
    from callbacks.quality import Quality
    from instaflow.evaluation.fid import image_features
    from instaflow.evaluation.protocol import real_test_set, score_images
    from instaflow.evaluation.quality import EmbeddedAlignment, EmbeddedFeatures, Setting, ShardPrompts
    from instaflow.evaluation.shapes_evaluator import ShapesEvaluator, save_evaluator

    torch.manual_seed(0)
    evaluator = save_evaluator(ShapesEvaluator(width=8, feature_dim=4), tmp_path / "evaluator")
    made: dict = {}

    class Module:  # contracts.SamplesImages: the real images of the prompts, blurred by the step count
        solver_tag, device = "euler", torch.device("cpu")

        def sample_images(self, prompts, steps, guidance, seeds, batch_size=256):
            images = real_test_set(tiny_world.val, len(prompts), resolution=16)[0].float() / 255
            made[steps] = images.roll(steps, dims=-1)
            return made[steps]

        def print(self, *a):
            pass

    logged = []
    trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=7, callback_metrics={}, log_dir=str(tmp_path),
                              default_root_dir=str(tmp_path), loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m)))],
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj, root_device=torch.device("cpu"),
                                                       is_global_zero=True),
                              callbacks=[])
    cb = Quality(ShardPrompts(tiny_world.val, n=8, resolution=16), EmbeddedFeatures(str(evaluator)),
                 [EmbeddedAlignment(str(evaluator))], settings=[Setting(1, 1.0), Setting(3, 1.5)])
    cb._set = cb.prompts.load()
    cb.features.prepare(torch.device("cpu"))
    cb.scores[0].prepare(torch.device("cpu"))
    cb._score(trainer, Module())

    ev = EmbeddedFeatures(str(evaluator))
    ev.prepare(torch.device("cpu"))
    images, scenes, _ = real_test_set(tiny_world.val, 16, resolution=16)  # what eval_protocol reads (at 16 px)
    ref = image_features(images[8:], ev._model)
    (step, metrics), = logged
    assert step == 7 and json.loads((tmp_path / "quality.jsonl").read_text())["metrics"] == metrics
    for steps, w in ((1, 1), (3, 1.5)):
        want = score_images(made[steps], scenes[:8], ref, ev._model, n_bootstrap=0)
        tag = f"euler{steps}_w{w:g}"
        assert metrics[f"quality/fid_{tag}"] == pytest.approx(want["fid"], rel=1e-9, abs=1e-9)
        assert metrics[f"quality/alignment_{tag}"] == want["alignment"]
        for k, v in want["by_objects"].items():
            assert metrics[f"quality/alignment_{tag}_{k}obj"] == pytest.approx(v["alignment"], abs=1e-4)
    assert trainer.callback_metrics["quality/fid_euler1_w1"].item() == pytest.approx(metrics["quality/fid_euler1_w1"])
    assert (tmp_path / "quality_reference").is_dir() and len(list((tmp_path / "quality_reference").glob("*.npz"))) == 1


# -- real fits on the tiny SD: 1 process, DDP and FSDP2 on 2 processes --------------------------------

def quality_yaml(root: Path, tiny_sd_folder: Path, pairs: Path, name: str, tiny_world, clip: Path,
                 features: dict | None = None, scores: list | None = None, **extra) -> str:
    """reflow_yaml (data split so every global batch is the one-process batch) + Quality every 2 steps +
    two checkpoints kept by the CLIP score (best-1 by max, best-1 by min) + Export of the best."""
    src = reflow_yaml(root, tiny_sd_folder, pairs, name, max_steps=STEPS)
    cfg = yaml.safe_load(Path(src).read_text())
    quality = {"class_path": "callbacks.quality.Quality", "init_args": {
        "prompts": {"class_path": "instaflow.evaluation.quality.ShardPrompts",
                    "init_args": {"shards": tiny_world.val, "n": N, "resolution": 16}},
        "features": features or {"class_path": "tests.callbacks.test_quality.TinyFeatures"},
        "scores": scores if scores is not None else [
            {"class_path": "instaflow.evaluation.quality.ClipScore", "init_args": {"model": str(clip)}}],
        "settings": [{"steps": 1, "guidance": 1.0}, {"steps": 2, "guidance": 1.5}],
        "every_n_train_steps": EVERY, "batch_size": 3, "straightness_n": 5, "straightness_steps": 3, **extra}}
    best = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(root / name / f"best_{mode}"), "monitor": "quality/clip_score_euler1_w1", "mode": mode,
        "save_top_k": 1, "every_n_train_steps": EVERY, "filename": "{step}"}} for mode in ("max", "min")]
    callbacks = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("Export")]
    cfg["trainer"]["callbacks"] = callbacks + [quality] + best + [
        {"class_path": "callbacks.export.Export", "init_args": {"weights": "best"}}]
    Path(src).write_text(yaml.safe_dump(cfg))
    return src


@pytest.fixture(scope="module")
def quality_runs(tiny_sd_folder, tiny_world, tiny_clip_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    pairs = write_step_shards(root / "pairs", STEPS, 8)
    args = lambda name: ["fit", "-c", BASE, "-c", quality_yaml(root, tiny_sd_folder, pairs, name, tiny_world,  # noqa: E731
                                                                tiny_clip_folder)]
    cli(args("one"))
    run_2proc(args("ddp") + ["--trainer.strategy", "ddp"])
    run_2proc(args("fsdp") + ["-c", FSDP2, "--trainer.strategy.init_args.data_parallel_size", "2",
                              "--model.init_args.fsdp_mixed_precision", "null"])
    return root


def curve(root: Path, name: str) -> list[dict]:
    logdir = next((root / name / "runs" / name).glob("version_*"))
    return [json.loads(line) for line in (logdir / "quality.jsonl").read_text().splitlines()]


def test_two_processes_log_the_scores_of_one(quality_runs):
    """DDP and FSDP2 on 2 processes (each samples 4 of the 7 prompts, one padded) log one process's FID,
    CLIP score and straightness, at step 0 and every 2 steps, in TensorBoard and quality.jsonl."""
    from tests.lightning_modules.test_chain import scalars

    one = curve(quality_runs, "one")
    assert [r["step"] for r in one] == [0, 2, 4]
    names = {k for k in one[0]["metrics"] if "seconds" not in k}
    assert names == {f"quality/{m}_{tag}" for m in ("fid", "clip_score", "clip_score_100")
                     for tag in ("euler1_w1", "euler2_w1.5")} | {"quality/straightness_euler3_w1.5"}
    assert all(np.isfinite(v) for r in one for v in r["metrics"].values())
    assert one[0]["metrics"]["quality/fid_euler1_w1"] != one[-1]["metrics"]["quality/fid_euler1_w1"]  # it trained
    for name in ("ddp", "fsdp"):
        other = curve(quality_runs, name)
        assert [r["step"] for r in other] == [0, 2, 4]
        for a, b in zip(one, other):
            for k in names:
                assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-4, abs=1e-6), (name, a["step"], k)
        logdir = next((quality_runs / name / "runs" / name).glob("version_*"))
        assert scalars(logdir, "quality/fid_euler1_w1") == pytest.approx([r["metrics"]["quality/fid_euler1_w1"]
                                                                           for r in other], rel=1e-6)


@pytest.mark.parametrize("name", ["one", "fsdp"])
def test_best_checkpoints_follow_the_score_and_the_best_is_exported(quality_runs, name):
    """ModelCheckpoint(monitor=quality/clip_score_euler1_w1) keeps the step with the max (or min) score, and
    Export(weights=best) writes the EMA weights of the first monitored checkpoint (a file, or FSDP2 shards)."""
    from safetensors.torch import load_file

    from instaflow.resume.checkpoints import checkpoint_weights

    scores = {r["step"]: r["metrics"]["quality/clip_score_euler1_w1"] for r in curve(quality_runs, name)[1:]}
    assert scores[2] != scores[4]
    for mode, pick in (("max", max), ("min", min)):
        kept = list((quality_runs / name / f"best_{mode}").iterdir())
        assert [p.name for p in kept] == [f"step={pick(scores, key=scores.get)}.ckpt"], (mode, scores)
    best = quality_runs / name / "best_max" / f"step={max(scores, key=scores.get)}.ckpt"
    meta = best / "meta.pt" if best.is_dir() else best
    ema_key = next(k for k in torch.load(meta, weights_only=False)["callbacks"] if k.startswith("EMA"))
    from instaflow.models import loading

    names = [n for n, p in loading.load_unet(str(quality_runs / name / "export")).named_parameters()]
    want = checkpoint_weights(best, ema_key=ema_key, names=names)
    got = load_file(str(next((quality_runs / name / "export" / "unet").glob("*.safetensors"))))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k].to(got[k].dtype)), k
    raw = checkpoint_weights(best)  # the raw weights differ from the EMA's: the export took the EMA
    assert any(not torch.equal(raw[k], want[k]) for k in want)


def test_missing_inception_or_clip_weights_fail_at_fit_start(tiny_sd_folder, tiny_world, tiny_clip_folder,
                                                             tmp_path, monkeypatch):
    """Offline and missing, the Inception file or CLIP model stops the fit before its first step, naming it."""
    from instaflow.evaluation import fid
    from instaflow.models.loading import ModelNotFoundError

    pairs = write_step_shards(tmp_path / "pairs", 2, 8)
    target = tmp_path / "cache" / fid.INCEPTION_FILE
    monkeypatch.setattr(fid, "inception_weights_path", lambda: target)
    inception = quality_yaml(tmp_path, tiny_sd_folder, pairs, "inception", tiny_world, tiny_clip_folder,
                             features={"class_path": "instaflow.evaluation.quality.CleanFidInception"}, download=False)
    with pytest.raises(fid.InceptionWeightsMissing, match=f"{fid.INCEPTION_FILE} at {target}"):
        cli(["fit", "-c", BASE, "-c", inception])
    missing_clip = tmp_path / "no-such-clip"
    clip = quality_yaml(tmp_path, tiny_sd_folder, pairs, "clip", tiny_world, tiny_clip_folder,
                        scores=[{"class_path": "instaflow.evaluation.quality.ClipScore",
                                 "init_args": {"model": str(missing_clip)}}])
    with pytest.raises(ModelNotFoundError, match=str(missing_clip)):
        cli(["fit", "-c", BASE, "-c", clip])
    for name in ("inception", "clip"):  # nothing trained: no checkpoint, no export
        assert not list((tmp_path / name).rglob("*.ckpt")) and not (tmp_path / name / "export").exists()


def test_prompt_set_take_keeps_meta():
    s = PromptSet(["a", "b", "c"], [0, 1, 2], [{"i": 0}, {"i": 1}, {"i": 2}])
    assert s.take([2, 2]).captions == ["c", "c"] and s.take([1]).meta == [{"i": 1}]


def test_a_resumed_run_forgets_the_curve_points_after_its_checkpoint(tmp_path):
    """Points scored after the checkpoint belong to weights the resumed run discarded: dropped from quality.jsonl."""
    import json
    from types import SimpleNamespace

    from callbacks.quality import Quality

    path = tmp_path / "quality.jsonl"
    path.write_text("".join(json.dumps({"step": s, "metrics": {"quality/fid_euler1_w1": 1.0}}) + "\n"
                            for s in (0, 160, 320)))
    one = SimpleNamespace(is_global_zero=True, broadcast=lambda obj, src=0: obj)
    Quality._forget_after(SimpleNamespace(log_dir=str(tmp_path), strategy=one), 160)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 160]


def test_straightness_asks_for_the_samples_paths_contract():
    """Callbacks ask, not probe: a module without ``sampler()`` is refused at setup, naming contracts.SamplesPaths."""
    from callbacks.quality import Quality
    from instaflow.contracts import SamplesImages, SamplesPaths
    from instaflow.evaluation.quality import EmbeddedFeatures, ShardPrompts
    from lightning_modules.reflow import ReflowTraining

    class ImagesOnly:  # contracts.SamplesImages, no sampler()
        solver_tag = "euler"

        def sample_images(self, prompts, steps, guidance, seeds, batch_size=256):
            return torch.zeros(len(prompts), 3, 8, 8)

    assert isinstance(ImagesOnly(), SamplesImages) and not isinstance(ImagesOnly(), SamplesPaths)
    assert isinstance(ReflowTraining("folder"), SamplesPaths)  # the flow students record their paths
    cb = Quality(ShardPrompts("none.tar"), EmbeddedFeatures(), straightness_n=4)
    with pytest.raises(TypeError, match=r"contracts\.SamplesPaths.*ImagesOnly"):
        cb.setup(None, ImagesOnly(), "validate")
    Quality(ShardPrompts("none.tar"), EmbeddedFeatures()).setup(None, ImagesOnly(), "validate")  # no straightness: fine
