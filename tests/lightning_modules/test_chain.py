"""The three InstaFlow stages end to end on tiny models, and resumable coupling generation."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT
from instaflow.experiments import resolved

BASE = str(ROOT / "experiments" / "base" / "default.yaml")
EMB = ROOT / "experiments" / "embedded"


def cli(args: list[str]):
    from lightning_modules.cli import main

    return main(args, run=True)


def tiny_yaml(src: str, tmp_path: Path, model: dict, data: dict, trainer: dict | None = None,
              writer_dir: Path | None = None, quality: dict | None = None) -> str:
    """A copy of an embedded experiment (its whole chain, merged) pointed at tiny models, tiny shards and tmp folders."""
    cfg = resolved(f"embedded/{Path(src).stem}")
    if quality is None:  # no evaluator in this test: drop the FID/alignment curves
        cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith(".Quality")]
    if isinstance(cfg["trainer"].get("logger"), dict):
        cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for cb in cfg["trainer"]["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[1]
        if name == "CouplingWriter":
            cb["init_args"]["output_dir"] = str(writer_dir)
        if name == "ModelCheckpoint":
            cb["init_args"]["dirpath"] = str(tmp_path / "ckpt" / src)
        if name == "ImageGrid":
            cb["init_args"]["prompts"] = cb["init_args"]["prompts"][:2]
        if name == "Quality":
            cb["init_args"].update(quality or {})
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "root")
    cfg["trainer"].update(trainer or {})
    cfg["model"]["init_args"].update(model)
    cfg["data"]["init_args"].update(data)
    out = tmp_path / f"tiny_{src}"
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


def read_pairs(folder: Path) -> dict[str, dict]:
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def scalars(logdir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def gen_pairs(tmp_path, tiny_world, model: str, out: Path, src: str = "pairs_teacher.yaml", **model_kw) -> None:
    kw = {"model": model, "steps": 3, **model_kw}
    cli(["predict", "-c", BASE, "-c", tiny_yaml(src, tmp_path, kw, {
        "predict": tiny_world.train, "resolution": 16, "eval_batch_size": 8, "num_workers": 0}, writer_dir=out)])


def test_coupling_generation_writes_every_key_once_and_regenerates_noise(tiny_world, tiny_sd_folder, tmp_path):
    from instaflow.flow.noise import seeded_noise
    from instaflow.flow.noise import sample_seed

    out = tmp_path / "pairs"
    gen_pairs(tmp_path, tiny_world, str(tiny_sd_folder), out, store_noise=True)
    pairs = read_pairs(out)
    assert len(pairs) == 64 and sorted(out.glob("*.tar")) == [out / f"{i:05d}.tar" for i in range(4)]
    assert len(list(out.glob("*_stats.json"))) == 4 and not list(out.glob(".*.tmp-*"))
    meta = json.loads((out / "generation.json").read_text())
    assert meta["steps"] == 3 and meta["guidance"] == 3.0 and "w * (out_c - out_u)" in meta["guidance_formula"]
    for key, files in list(pairs.items())[:5]:
        info = json.loads(files["json"])
        assert info["seed"] == sample_seed(key, 0)
        x0 = np.load(io.BytesIO(files["x0.npy"]))
        assert np.allclose(x0, seeded_noise([info["seed"]], (4, 8, 8))[0].numpy())
        x1 = np.load(io.BytesIO(files["x1.npy"]))
        assert x1.shape == (4, 8, 8) and x1.dtype == np.float16 and np.isfinite(x1).all()
    # TensorBoard: the rate and count curves (x = couplings written) and a grid of the first batch's x1
    logdir = tmp_path / "runs" / "pairs_teacher" / "version_0"
    assert scalars(logdir, "couplings/written") == [8.0 * i for i in range(1, 9)]  # 8 batches of 8
    assert all(r > 0 for r in scalars(logdir, "couplings/per_second"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    assert "couplings/x1" in ea.Tags()["images"]
    grid = (logdir / "grids" / "couplings_x1.png")
    assert grid.exists() and grid.stat().st_size > 0



def dead_writers_temporary(name: str) -> str:
    """The hidden name a writer killed on this machine leaves (``instaflow.state``: host, a pid now dead)."""
    import subprocess
    import sys

    from instaflow import state

    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                         text=True).stdout.strip()
    return f".{name}{state.TMP_MARK}{state._host()}-{pid}-0badc0de"


def test_killed_coupling_generation_resumes_without_loss_or_duplicates(tiny_world, tiny_sd_folder, tmp_path):
    """Simulate a kill: one shard complete, one half-written (.tmp), two missing; rerun fills exactly the gaps."""
    out = tmp_path / "pairs"
    gen_pairs(tmp_path, tiny_world, str(tiny_sd_folder), out)
    full = read_pairs(out)
    keep = (out / "00001.tar").stat().st_mtime_ns
    for i in (0, 2, 3):
        (out / f"{i:05d}_stats.json").unlink()  # the writer dies before marking these complete
    (out / "00002.tar").rename(out / dead_writers_temporary("00002.tar"))  # and mid-way through this one
    (out / "00003.tar").unlink()
    gen_pairs(tmp_path, tiny_world, str(tiny_sd_folder), out)
    again = read_pairs(out)
    assert sorted(again) == sorted(full)  # every key, once (keys are unique per dict; count members too)
    assert sum(1 for _ in out.glob("*.tar")) == 4 and not list(out.glob(".*.tmp-*"))
    assert (out / "00001.tar").stat().st_mtime_ns == keep  # the complete shard was skipped
    for key in full:  # deterministic: regenerated couplings are identical
        assert full[key]["x1.npy"] == again[key]["x1.npy"]


def test_skips_in_a_shard_without_usable_samples_reach_the_stage_totals(tiny_world, tiny_sd_folder, tmp_path, capsys):
    """Two readers: one gets a good shard, the other a shard whose only samples have empty or no captions.
    Its skips reach the writer's total ("input samples skipped") and TensorBoard's couplings/skipped_inputs."""
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, payload in [("e0.txt", b"  "), ("e0.json", b"{}"), ("e1.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "pairs"
    spec = f"{tiny_world.root / 'train' / '00000.tar'}::{bad}"
    cli(["predict", "-c", BASE, "-c", tiny_yaml("pairs_teacher.yaml", tmp_path, {"model": str(tiny_sd_folder), "steps": 2},
                                                {"predict": spec, "resolution": 16, "eval_batch_size": 8,
                                                 "num_workers": 2}, writer_dir=out)])
    assert len(read_pairs(out)) == 16  # the good shard, whole
    assert "; 2 input samples skipped" in capsys.readouterr().out  # the stage's printed total
    assert scalars(tmp_path / "runs" / "pairs_teacher" / "version_0", "couplings/skipped_inputs")[-1] == 2.0


def test_instaflow_chain_on_tiny_models(tiny_world, tiny_sd_folder, tmp_path):
    """teacher couplings -> reflow -> 2-RF couplings -> distillation (+ direct, + control): files and losses."""
    from instaflow.models.sampler import TextToImage

    from instaflow.tools import evaluate as evaluate_tool
    from instaflow.tools import timed
    from instaflow.evaluation.shapes_evaluator import ShapesEvaluator, save_evaluator

    models, runs = tmp_path / "models", tmp_path / "runs"
    torch.manual_seed(0)
    evaluator = save_evaluator(ShapesEvaluator(width=8, feature_dim=4), tmp_path / "evaluator")
    quality = {"prompts": {"class_path": "instaflow.evaluation.quality.ShardPrompts",
                           "init_args": {"shards": tiny_world.val, "n": 8, "resolution": 16}},
               "features": {"class_path": "instaflow.evaluation.quality.EmbeddedFeatures",
                            "init_args": {"evaluator": str(evaluator)}},
               "scores": [{"class_path": "instaflow.evaluation.quality.EmbeddedAlignment",
                           "init_args": {"evaluator": str(evaluator)}}],
               "settings": [{"steps": 1, "guidance": 1.0}, {"steps": 3, "guidance": 1.5}]}
    timings = tmp_path / "timings"
    assert timed.main([str(timings), "pairs_teacher", "--", sys.executable, "-c", "pass"]) == 0
    assert timed.main([str(timings), "failing", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    gen_pairs(tmp_path, tiny_world, str(tiny_sd_folder), tmp_path / "pairs_teacher")
    train = {"max_steps": 40, "val_check_interval": 20, "limit_val_batches": 1, "log_every_n_steps": 2}
    pdata = {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 32}
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        "init": str(tiny_sd_folder), "export_dir": str(models / "rf2"), "lr": 2e-3, "warmup_steps": 1, "grid_steps": [1, 3]},
        {**pdata, "train": str(tmp_path / "pairs_teacher"), "val": str(tmp_path / "pairs_teacher")}, train,
        quality=quality)])
    rf2 = TextToImage.from_pretrained(str(models / "rf2"))
    assert rf2.kind == "ddpm_velocity"  # reflow.yaml starts from the teacher through the velocity conversion
    logdir = next((runs / "reflow").glob("version_*"))
    loss = scalars(logdir, "train/loss")
    assert np.mean(loss[-5:]) < np.mean(loss[:5]), loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    assert "hp_metric" not in ea.Tags()["scalars"]  # base/default.yaml: no placeholder -1 (experiments inherit it)
    for tag in ("quality/fid_euler1_w1", "quality/alignment_euler3_w1.5",  # at start and after each validation
                "quality/straightness_euler25_w1.5"):  # reflow.yaml's straightness_n: the path it straightens
        curve = scalars(logdir, tag)
        assert len(curve) == 3 and np.isfinite(curve).all(), (tag, curve)
    record = [json.loads(line) for line in (logdir / "quality.jsonl").read_text().splitlines()]
    assert [r["step"] for r in record] == [0, 20, 40]  # the same curve as a file, for the ablation's figures
    assert record[-1]["metrics"]["quality/straightness_euler25_w1.5"] == pytest.approx(
        scalars(logdir, "quality/straightness_euler25_w1.5")[-1], rel=1e-6)
    assert list((logdir / "grids").glob("euler1_w1_*.png")) and list((logdir / "grids").glob("euler3_w1.5_*.png"))

    gen_pairs(tmp_path, tiny_world, str(models / "rf2"), tmp_path / "pairs_rf2", src="pairs_rf2.yaml")
    assert len(read_pairs(tmp_path / "pairs_rf2")) == 64
    distill = [("distill.yaml", str(models / "rf2"), "velocity_wrapper", "pairs_rf2", "instaflow"),
               ("distill.yaml", str(tiny_sd_folder), "velocity_wrapper", "pairs_teacher", "direct"),
               ("distill.yaml", str(models / "rf2"), "velocity_wrapper", "pairs_teacher", "direct_rfinit")]
    for src, init, param, pairs, name in distill:
        cfg = tiny_yaml(src, tmp_path, {"init": init, "parameterization": param, "export_dir": str(models / name),
                                        "lr": 2e-3, "warmup_steps": 1},
                        {**pdata, "train": str(tmp_path / pairs), "val": str(tmp_path / pairs)},
                        {**train, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                             "init_args": {"save_dir": str(runs), "name": name}}},
                        quality={**quality, "settings": [{"steps": 1, "guidance": 1.0}]})
        cli(["fit", "-c", BASE, "-c", cfg])
        loss = scalars(next((runs / name).glob("version_*")), "train/loss")
        assert np.mean(loss[-5:]) < np.mean(loss[:5]), (name, loss)
        student = TextToImage.from_pretrained(str(models / name))
        img = student.sample(["a red circle in the center on a white background"], steps=1, guidance=1.0)
        assert img.shape == (1, 3, 16, 16)
    assert list((tmp_path / "ckpt" / "reflow.yaml").glob("*.ckpt"))

    # the results table over all six rows, with the stage timings
    rows = [{"name": "teacher_25", "label": "teacher", "model": str(tiny_sd_folder), "steps": 3, "guidance": 3.0},
            {"name": "rf2_25", "label": "2-RF", "model": str(models / "rf2"), "steps": 3, "guidance": 1.5},
            {"name": "rf2_1", "label": "2-RF 1", "model": str(models / "rf2"), "steps": 1, "guidance": 1.0}] + [
            {"name": f"{n}_1", "label": n, "model": str(models / n), "steps": 1, "guidance": 1.0}
            for n in ("instaflow", "direct", "direct_rfinit")]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    res = evaluate_tool.main(["--evaluator", str(evaluator), "--test", tiny_world.val, "--n", "8", "--rows",
                         str(tmp_path / "rows.json"), "--straightness-n", "4", "--latency-rounds", "2",
                         "--batch-size", "8", "--out", str(tmp_path / "results"), "--timings", str(timings)])
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert saved["rows"].keys() == res["rows"].keys() == {r["name"] for r in rows}
    for r in rows:
        got = saved["rows"][r["name"]]
        assert np.isfinite(got["fid"]) and 0.0 <= got["alignment"] <= 1.0 and got["latency_s"] > 0 and got["latency_unet_s"] > 0
        assert got["nfe"] == r["steps"] * (2 if r["guidance"] > 1 else 1)
        assert (got["straightness"] is None) == (r["steps"] == 1)
    assert set(saved["stage_wall_s"]) == {"pairs_teacher", "eval"}  # the failed stage left no record
    assert saved["total_wall_s"] == pytest.approx(sum(saved["stage_wall_s"].values()), abs=0.2)
    assert set(saved["targets"]) >= {"instaflow_fid_over_teacher", "train_reflow_minutes"}
    md = (tmp_path / "results" / "results.md").read_text()
    assert all(r["label"] in md for r in rows) and "Stage wall times" in md


def test_reflow_raw_start_follows_the_released_convention(tiny_world, tiny_sd_folder, tmp_path):
    """The paper's start (reflow_raw.yaml): raw weights trained as a flow UNet fed 1000 (1 - t), exported as kind "flow"."""
    from instaflow.flow import paths
    from instaflow.models.sampler import TextToImage

    gen_pairs(tmp_path, tiny_world, str(tiny_sd_folder), tmp_path / "pairs")
    raw = yaml.safe_load((EMB / "reflow_raw.yaml").read_text())["model"]["init_args"]
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        "init": str(tiny_sd_folder), "parameterization": raw["parameterization"], "export_dir": str(tmp_path / "rf2_raw"),
        "warmup_steps": 1, "grid_steps": [1]},
        {"train": str(tmp_path / "pairs"), "val": str(tmp_path / "pairs"), "batch_size": 8, "num_workers": 0},
        {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1})])
    model = TextToImage.from_pretrained(str(tmp_path / "rf2_raw"))
    assert model.kind == "flow"
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(float(args[1][0])), with_kwargs=True)
    model.sample(["a red circle"], steps=4, guidance=1.0)
    hook.remove()
    assert seen == pytest.approx([float(paths.rf_unet_timestep(torch.tensor(t))) for t in (0.0, 0.25, 0.5, 0.75)])
    assert seen[0] == pytest.approx(1000.0)


def test_path_metrics_and_results_table(tiny_sd_folder):
    """Straightness along each model's own path (DPM-Solver++ for DDPM teachers, Euler for flows) and the table."""
    from instaflow.evaluation import results
    from instaflow.models.sampler import TextToImage

    prompts = ["a red circle in the center on a white background", "a blue square", "a green cross"] * 2
    for kind in ("ddpm", "flow"):
        model = TextToImage.from_pretrained(str(tiny_sd_folder), kind=kind)
        # paths read off the main solve: the images are exactly the plain sample's, chunking included
        images, m = results.sample_row(model, prompts, steps=4, guidance=2.0, batch_size=4, path_n=4)
        torch.testing.assert_close(images, model.sample(prompts, 4, 2.0, seed=0, batch_size=4), atol=0, rtol=0)
        assert m["straightness"] > 0 and m["path_length_ratio"] >= 1.0 - 1e-6
        assert m["straightness_wo_first"] is not None
        _, none = results.sample_row(model, prompts, steps=1, guidance=1.0, batch_size=4, path_n=3)
        assert none["straightness"] is None
    # a straight path: S = 0 and ratio 1; a detour: S > 0 and ratio > 1
    x0, x1 = torch.zeros(2, 4), torch.ones(2, 4)
    straight = results.path_metrics([(0.0, x0), (0.5, 0.5 * x1), (1.0, x1)])
    assert straight["straightness"] == pytest.approx(0.0) and straight["path_length_ratio"] == pytest.approx(1.0)
    bent = results.path_metrics([(0.0, x0), (0.5, torch.tensor([[1.0, 0.0, 0.5, 0.5]] * 2)), (1.0, x1)])
    assert bent["straightness"] > 0 and bent["path_length_ratio"] > 1.0
    row = {"label": "x", "steps": 1, "guidance": 1.0, "fid": 1.0, "fid_low": 0.9, "fid_high": 1.1, "alignment": 0.5,
           "straightness": None, "straightness_wo_first": None, "path_length_ratio": None, "nfe": 1,
           "latency_s": 0.01, "latency_unet_s": 0.005}
    table = results.to_markdown({"rows": {"a": row, "b": {"label": "y", "missing": "not found"}}})
    assert "| x | 1 | 1 | 1.00 (0.90-1.10) | 50.0% | n/a | n/a | 1 | 10.0 ms (5.0 ms) |" in table
    assert "not run (not found)" in table
    assert results.nfe(results.Row("t", "t", "m", 25, 3.0)) == 50


def test_generate_writes_pngs_grid_and_record_reproducibly(tiny_sd_folder, tmp_path):
    """`generate`: one PNG per prompt x seed, a grid, a JSON record; the same seed gives the same pixels."""
    from PIL import Image

    from instaflow.tools import generate
    from instaflow.models.sampler import TextToImage

    args = ["--model", str(tiny_sd_folder), "--steps", "2", "--guidance", "2.0", "--seed", "5",
            "--num-per-prompt", "2", "--scale", "1", "--prompt", "a red circle", "--prompt", "a blue square"]
    out = generate.main(args + ["--out", str(tmp_path / "a")])
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["000_5.png", "000_6.png", "001_5.png", "001_6.png"]
    grid = Image.open(out / "grid.png")
    cap = 3 * 13 + 4  # three caption lines (prompt, steps, w, seed) under each image
    assert grid.size == (2 * (16 + 2) + 2, 2 * (16 + cap + 2) + 2)  # 2x2 captioned images of 16 px, 2-px gaps
    assert np.array_equal(np.asarray(grid.convert("RGB"))[2:18, 2:18], np.asarray(Image.open(out / "000_5.png")))
    rec = json.loads((out / "generation.json").read_text())
    assert rec["seeds"] == [5, 6] and rec["steps"] == 2 and rec["prompts"] == ["a red circle", "a blue square"]
    again = generate.main(args + ["--out", str(tmp_path / "b")])
    assert (out / "001_6.png").read_bytes() == (again / "001_6.png").read_bytes()
    # and it is the pipeline's own sample for that prompt and seed
    img = TextToImage.from_pretrained(str(tiny_sd_folder)).sample_images(["a blue square"], 2, 2.0, [6])[0]
    expected = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(out / "001_6.png").convert("RGB")), expected)
