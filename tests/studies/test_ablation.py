"""The ablation's claims, verdicts, record and resumable stages (studies.ablation: rows, report, run)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from instaflow.evaluation import figures
from studies.ablation import report as ab
from studies.ablation import rows as study

N, D = 400, 8


def _write_row(d: Path, name: str, feats: np.ndarray, hits: np.ndarray, **extra) -> None:
    (d / "rows").mkdir(parents=True, exist_ok=True)
    np.save(d / "rows" / f"{name}.features.npy", feats)
    np.save(d / "rows" / f"{name}.hits.npy", hits)
    rec = {"name": name, "label": name, "model": "m", "solver": "euler", "steps": 1, "guidance": 1.0, "nfe": 1,
           "fid": 0.0, "fid_low": 0.0, "fid_high": 0.0, "alignment": float(hits.mean()), "alignment_stderr": 0.0,
           "group": None, "seed": None, "curve": None, **extra}
    (d / "rows" / f"{name}.json").write_text(json.dumps(rec))


def _write_path(d: Path, name: str, s: np.ndarray) -> None:
    (d / "paths").mkdir(parents=True, exist_ok=True)
    np.save(d / "paths" / f"{name}.straightness.npy", s)
    np.save(d / "paths" / f"{name}.ratio.npy", 1 + s)
    (d / "paths" / f"{name}.json").write_text(json.dumps({"label": name, "solver": "euler", "guidance": 1.5, "n": len(s),
                                                          "straightness": float(s.mean()),
                                                          "path_length_ratio": float((1 + s).mean())}))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Rows with known truths: InstaFlow and the teacher drawn like the reference, direct shifted by
    1.5 in every feature (a large FID), InstaFlow aligned 80% vs direct 50%, the 2-RF's paths half as
    curved as its step-0 model's, the 3-RF like the 2-RF."""
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(N, D))
    like_ref = lambda: rng.normal(size=(N, D))  # noqa: E731
    hits = lambda p: (rng.random(N) < p).astype(np.float64)  # noqa: E731
    _write_row(d, "teacher_dpm25", like_ref(), hits(0.8))
    for s in study.SEEDS:
        _write_row(d, f"instaflow_s{s}_1", like_ref(), hits(0.8), group="instaflow", seed=s)
        _write_row(d, f"direct_s{s}_1", rng.normal(size=(N, D)) + 1.5, hits(0.5), group="direct", seed=s)
        _write_row(d, f"control_s{s}_1", like_ref(), hits(0.8), group="control", seed=s)
    shared = rng.normal(size=(N, D)) + 0.5  # the 2-RF and 3-RF: same samples, a third reflow changes nothing
    _write_row(d, "rf2_1", shared, hits(0.5))
    _write_row(d, "rf3_1", shared.copy(), hits(0.5))
    step0 = rng.uniform(0.05, 0.15, size=256)
    _write_path(d, "step0_w1.5", step0)
    _write_path(d, "rf2_w1.5", step0 * 0.5 + rng.normal(scale=0.002, size=256))
    return d, ref


def test_claims_read_their_verdicts_off_paired_intervals(synthetic):
    d, ref = synthetic
    rows, paths = ab.load_rows(d), ab.load_paths(d)
    c = ab.claims(rows, paths, ref, n_boot=200)
    assert c["reflow_straightens"]["verdict"] == "holds"
    assert c["reflow_straightens"]["value"] == pytest.approx(0.5, abs=0.02)
    assert c["reflow_straightens"]["low"] < 0.5 < c["reflow_straightens"]["high"]
    assert c["one_step_matches_teacher"]["verdict"] in ("holds", "cannot tell")  # both like the reference
    assert c["reflow_distill_beats_direct"]["verdict"] == "holds"
    assert c["reflow_distill_beats_direct"]["low"] > 1.5  # a 1.5-per-feature shift is a large FID
    align = c["reflow_distill_beats_direct_alignment"]
    assert align["verdict"] == "holds" and align["value"] == pytest.approx(0.3, abs=0.06)
    assert align["rows_a"] == [f"instaflow_s{s}_1" for s in study.SEEDS]  # pooled over the three seeds
    third = c["third_reflow_adds_little"]
    assert third["value"] == pytest.approx(1.0) and third["low"] == pytest.approx(1.0)  # identical rows
    assert third["verdict"] == "holds"


def test_the_control_reading_names_the_initialisation_when_the_control_matches_instaflow(synthetic):
    d, ref = synthetic
    rows = ab.load_rows(d)
    comp = ab.comparisons(rows, {}, ref, n_boot=200)
    assert comp["control_over_direct"]["high"] < 1.0
    assert "initialisation explains" in ab.control_reading(comp)
    seeds = ab.seed_summary(rows)
    assert seeds["direct"]["seeds"] == list(study.SEEDS) and len(seeds["direct"]["fid"]) == 3


def test_markdown_and_figures(synthetic, tmp_path):
    d, ref = synthetic
    rows, paths = ab.load_rows(d), ab.load_paths(d)
    curve = [{"step": s, "metrics": {"quality/straightness_euler25_w1.5": 0.1 - s / 1e4, "quality/fid_euler1_w1": 90 - s / 10,
                                     "quality/fid_euler8_w1.5": 60.0, "quality/alignment_euler1_w1": 0.4 + s / 1e3}}
             for s in (0, 100, 200)]
    table = ab.rows_table(rows, {"instaflow_s0_1": {"latency_s": 0.02}})
    for r in table:
        r["curve"] = "InstaFlow (one step)" if r["name"].startswith("instaflow") else None
    figs = {"a": str(figures.reflow_figure({"2-RF": curve}, tmp_path / "a.png")),
            "b": str(figures.distill_figure({"instaflow": [curve, curve]}, tmp_path / "b.png")),
            "c": str(figures.speed_figure(table, tmp_path / "c.png"))}
    for f in figs.values():
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = {"machine": {"cpu": "test cpu", "cpus": 2, "torch_threads": 2, "platform": "p"}, "commit": "abc",
           "total_wall_s": 60.0, "claims": ab.claims(rows, paths, ref, n_boot=50), "control_reading": "x",
           "rows": table, "seeds": ab.seed_summary(rows), "comparisons": {}, "paths": {}, "figures": figs,
           "stage_wall_s": {"reflow": 60.0}}
    md = ab.to_markdown(res)
    assert "**holds**" in md and "test cpu" in md and "reflow 60 s" in md


def test_rows_compare_at_equal_solver_and_guidance():
    paths = study.path_rows("runs/ablation/models")
    for w in study.PATH_GUIDANCE:
        at_w = [p for p in paths if p.guidance == w]
        assert {p.name.rsplit("_w", 1)[0] for p in at_w} == {"step0", "rf2", "rf3", "teacher_dpm"}
        assert all(p.steps == 25 for p in at_w)
        assert [p.kind for p in at_w if p.name.startswith("step0")] == ["ddpm_velocity"]  # Euler, as the 2-RF
    rows = {r.name: r for r in study.test_rows("runs/ablation/models")}
    assert rows["teacher_dpm25"].solver == "dpm_solver++" and rows["step0_euler25"].solver == "euler"
    assert rows["teacher_dpm25"].nfe == 50 and rows["instaflow_s2_1"].nfe == 1
    assert sum(r.group == "direct" for r in rows.values()) == len(study.SEEDS) >= 3


def test_stages_resume_and_never_redo_a_finished_stage(tmp_path, monkeypatch):
    from studies.ablation import run as tool

    calls = []
    out = tmp_path / "pairs"

    class Tiny(tool.Ablation):
        def stages(self):
            return [tool.Stage("first", tmp_path / "first.done", fn=lambda: (calls.append("first"),
                                                                              (tmp_path / "first.done").touch())),
                    tool.Stage("writer", out / ".done", lambda: [sys.executable, "-c",
                                                                 f"import pathlib; pathlib.Path({str(out)!r}).mkdir(exist_ok=True); "
                                                                 f"pathlib.Path({str(out)!r}, 'a.tar').write_text('x')"],
                               partial=out),
                    tool.Stage("boom", tmp_path / "boom.done", fn=lambda: (_ for _ in ()).throw(RuntimeError("killed")))]

    out.mkdir()
    (out / "half_written.tar").write_text("partial")  # an earlier run killed in the middle of this stage
    t = Tiny(str(tmp_path / "root"), str(tmp_path / "res"))
    with pytest.raises(RuntimeError, match="killed"):
        t.run()
    assert calls == ["first"]
    # the unfinished output is kept for the writer to continue (it skips complete shards), not deleted
    assert sorted(p.name for p in out.iterdir()) == [".done", "a.tar", "half_written.tar"]
    timings = sorted(p.stem for p in (tmp_path / "root" / "timings").glob("*.json"))
    assert timings == ["first", "writer"]  # the failed stage left no record
    with pytest.raises(RuntimeError):
        t.run()
    assert calls == ["first"]  # finished stages are not redone
    assert json.loads((tmp_path / "root" / "timings" / "writer.json").read_text())["wall_s"] >= 0


def test_every_ablation_experiment_parses_with_its_overrides():
    from instaflow.experiments import resolved

    for name in ("pairs_teacher", "pairs_teacher_val", "reflow", "pairs_rf2", "pairs_rf2_val", "rf3", "distill",
                 "distill_direct", "distill_control"):
        cfg = resolved(f"ablation/{name}")
        assert "runs/ablation" in json.dumps(cfg), name
    assert resolved("ablation/reflow")["trainer"]["max_steps"] == 1200
    assert resolved("ablation/distill_control")["model"]["init_args"]["init"] == "runs/ablation/models/rf2"
    assert asdict(study.EvalRow("a", "b", "c", 1, 1.0))["kind"] is None


def test_the_record_is_written_from_the_stages_outputs(synthetic, tmp_path):
    """report.write: results/ablation.{json,md} and the three figures from what the stages left under the root."""
    import shutil

    from instaflow.evaluation.paired import fid_of, paired_bootstrap, verdict

    d, ref = synthetic
    root = tmp_path / "abl"
    shutil.copytree(d, root / "eval")
    np.save(root / "eval" / "test_ref_features.npy", ref)
    machine = {"cpu": "test cpu", "cpus": 2, "torch_threads": 2, "platform": "p"}
    res = ab.write(root, tmp_path / "results" / "ablation", machine, n_test=N, n_path=256, n_boot=50)
    saved = json.loads((tmp_path / "results" / "ablation.json").read_text())
    assert saved["claims"] == json.loads(json.dumps(res["claims"])) and saved["machine"] == machine
    assert {"claims", "comparisons", "control_reading", "seeds", "rows", "paths", "figures", "stage_wall_s",
            "total_wall_s", "protocol"} <= set(saved)
    assert "**holds**" in (tmp_path / "results" / "ablation.md").read_text()
    for f in saved["figures"].values():
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a claim's record is the library's paired interval and verdict (paired.judged), rounded
    third = saved["claims"]["third_reflow_adds_little"]
    rows = ab.load_rows(root / "eval")
    iv = paired_bootstrap(fid_of(rows["rf3_1"]["features"], ref), fid_of(rows["rf2_1"]["features"], ref), N, n=50)
    assert third["low"] == round(iv["low"], 4) and third["verdict"] == verdict(iv, 0.9, ">=")
