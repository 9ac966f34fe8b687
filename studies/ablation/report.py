"""The ablation's rows, claims, verdicts and record (``make ablation``; ``studies.ablation.run`` runs it).

What is compared, once: every test row is sampled from the same test prompts i and noise seeds i,
so two rows are paired and a ratio or difference between them gets a paired bootstrap interval
(``evaluation.paired``); a distillation row is pooled over its training seeds (the mean of the
seeds' scores on the same resampled prompts). A claim's verdict is read off its interval:
"holds", "does not hold" or "cannot tell" (``paired.verdict``), never off the point estimate.

Straightness is compared at equal solver (Euler, 25 steps) and equal guidance, with the 2-RF's
step-0 model (the teacher through the velocity conversion) as the row the 2-RF is measured
against; the teacher's own DPM-Solver++ path at the same guidance stands beside it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from instaflow.evaluation import figures
from instaflow.evaluation.paired import fid_of, judged, mean_of, mean_over, paired_bootstrap
from instaflow.state import atomic_write_text
from instaflow.tools.timed import read_timings
from studies.ablation.rows import DISTILLS, PATH_GUIDANCE, SEEDS, TEACHER, TEST


# --- reading the evaluation folder ---------------------------------------------------------------

def load_rows(eval_dir: str | Path) -> dict[str, dict]:
    """``{name: record}`` of every evaluated test row, with its per-prompt ``features`` and ``hits``."""
    out = {}
    for f in sorted(Path(eval_dir, "rows").glob("*.json")):
        rec = json.loads(f.read_text())
        rec["features"] = np.load(f.with_suffix(".features.npy"))
        rec["hits"] = np.load(f.with_suffix(".hits.npy"))
        out[f.stem] = rec
    return out


def load_paths(eval_dir: str | Path) -> dict[str, dict]:
    """``{name: record}`` of every path row, with its per-prompt values ``per_prompt["straightness"]``
    and ``per_prompt["ratio"]`` (the record's own ``straightness`` and ``path_length_ratio`` are their means)."""
    out = {}
    for f in sorted(Path(eval_dir, "paths").glob("*.json")):
        rec = json.loads(f.read_text())
        rec["per_prompt"] = {"straightness": np.load(f.with_suffix(".straightness.npy")),
                             "ratio": np.load(f.with_suffix(".ratio.npy"))}
        out[f.stem] = rec
    return out


# --- claims --------------------------------------------------------------------------------------

def _fid(rows: dict, names: list[str], ref: np.ndarray):
    return mean_over([fid_of(rows[n]["features"], ref) for n in names])


def _align(rows: dict, names: list[str]):
    return mean_over([mean_of(rows[n]["hits"]) for n in names])


def _seeds(rows: dict, group: str) -> list[str]:
    return [f"{group}_s{s}_1" for s in SEEDS if f"{group}_s{s}_1" in rows]


def _compare(what: str, a: list[str], b: list[str], stat_a, stat_b, n: int, combine: str, target: float,
             holds_if: str, n_boot: int) -> dict:
    return {"statistic": what, "rows_a": a, "rows_b": b,
            **judged(stat_a, stat_b, n, combine, target, holds_if, n=n_boot)}


def claims(rows: dict, paths: dict, ref: np.ndarray, n_boot: int = 500) -> dict:
    """The paper's four claims and the control's reading, each with its paired interval and verdict.

    Targets, fixed before the run: reflow straightens = straightness ratio (2-RF / step 0, Euler 25,
    w = 1.5) below 1; one step nearly matches the teacher = one-step InstaFlow FID / teacher
    (DPM-Solver++ 25, w = 3) at most 1.25 (the paper's 23.4 / 20.1 = 1.16); reflow + distillation
    beats direct distillation = direct / InstaFlow FID above 1 (and InstaFlow's alignment higher);
    a third reflow adds little = 3-RF / 2-RF one-step FID at least 0.9 (it gains less than 10%).
    """
    out: dict = {}
    n = len(next(iter(rows.values()))["hits"]) if rows else 0
    have = lambda *names: all(x in rows for x in names)  # noqa: E731
    if "rf2_w1.5" in paths and "step0_w1.5" in paths:
        pa, pb = paths["rf2_w1.5"]["per_prompt"]["straightness"], paths["step0_w1.5"]["per_prompt"]["straightness"]
        out["reflow_straightens"] = {
            "claim": "reflow straightens the paths (2-RF vs its step-0 model, Euler 25 steps, w = 1.5)",
            **_compare("straightness ratio", ["rf2_w1.5"], ["step0_w1.5"], mean_of(pa), mean_of(pb), len(pa),
                       "ratio", 1.0, "<=", n_boot)}
    inst = _seeds(rows, "instaflow")
    if inst and have("teacher_dpm25"):
        out["one_step_matches_teacher"] = {
            "claim": "one step nearly matches the teacher (InstaFlow 1 step vs teacher DPM-Solver++ 25 steps, w = 3)",
            **_compare("FID ratio", inst, ["teacher_dpm25"], _fid(rows, inst, ref), _fid(rows, ["teacher_dpm25"], ref),
                       n, "ratio", 1.25, "<=", n_boot)}
    direct = _seeds(rows, "direct")
    if inst and direct:
        out["reflow_distill_beats_direct"] = {
            "claim": "reflow + distillation beats direct distillation (one step, FID)",
            **_compare("FID ratio", direct, inst, _fid(rows, direct, ref), _fid(rows, inst, ref), n, "ratio", 1.0,
                       ">=", n_boot)}
        out["reflow_distill_beats_direct_alignment"] = {
            "claim": "reflow + distillation beats direct distillation (one step, alignment)",
            **_compare("alignment difference", inst, direct, _align(rows, inst), _align(rows, direct), n,
                       "difference", 0.0, ">=", n_boot)}
    if have("rf3_1", "rf2_1"):
        out["third_reflow_adds_little"] = {
            "claim": "a third reflow adds little (3-RF vs 2-RF, one step, FID)",
            **_compare("FID ratio", ["rf3_1"], ["rf2_1"], _fid(rows, ["rf3_1"], ref), _fid(rows, ["rf2_1"], ref), n,
                       "ratio", 0.9, ">=", n_boot)}
    return out


def comparisons(rows: dict, paths: dict, ref: np.ndarray, n_boot: int = 500) -> dict:
    """The other ratios and differences the tables report, each with its paired interval (no verdict)."""
    out: dict = {}
    n = len(next(iter(rows.values()))["hits"]) if rows else 0

    def both(name: str, a: list[str], b: list[str], what: str = "FID ratio") -> None:
        if not a or not b or not all(x in rows for x in a + b):
            return
        if what == "FID ratio":
            sa, sb, combine = _fid(rows, a, ref), _fid(rows, b, ref), "ratio"
        else:
            sa, sb, combine = _align(rows, a), _align(rows, b), "difference"
        out[name] = {"statistic": what, "rows_a": a, "rows_b": b,
                     **paired_bootstrap(sa, sb, n, combine=combine, n=n_boot)}

    inst, direct, control = (_seeds(rows, g) for g in DISTILLS)
    both("rf2_25_over_teacher", ["rf2_25"], ["teacher_dpm25"])
    both("rf2_1_over_teacher", ["rf2_1"], ["teacher_dpm25"])
    both("control_over_instaflow", control, inst)
    both("control_over_direct", control, direct)
    both("instaflow_minus_control_alignment", inst, control, "alignment difference")
    both("control_minus_direct_alignment", control, direct, "alignment difference")
    both("rf3_8_over_rf2_8", ["rf3_8"], ["rf2_8"])
    for w in PATH_GUIDANCE:
        for a, b in ((f"rf2_w{w:g}", f"step0_w{w:g}"), (f"rf3_w{w:g}", f"rf2_w{w:g}"),
                     (f"step0_w{w:g}", f"teacher_dpm_w{w:g}")):
            if a in paths and b in paths:
                for key in ("straightness", "ratio"):
                    va, vb = paths[a]["per_prompt"][key], paths[b]["per_prompt"][key]
                    iv = paired_bootstrap(mean_of(va), mean_of(vb), len(va), combine="ratio", n=n_boot)
                    what = "straightness ratio" if key == "straightness" else "path-length-ratio ratio"
                    out[f"{a}_over_{b}_{key}"] = {"statistic": what, "rows_a": [a], "rows_b": [b], **iv}
    return out


def seed_summary(rows: dict) -> dict:
    """Per distillation group: each seed's FID and alignment, their mean and spread (max - min)."""
    out = {}
    for group in DISTILLS:
        names = _seeds(rows, group)
        if not names:
            continue
        fids = [rows[n]["fid"] for n in names]
        aligns = [rows[n]["alignment"] for n in names]
        out[group] = {"seeds": [rows[n]["seed"] for n in names], "fid": fids, "alignment": aligns,
                      "fid_mean": float(np.mean(fids)), "fid_spread": float(np.ptp(fids)),
                      "alignment_mean": float(np.mean(aligns)), "alignment_spread": float(np.ptp(aligns))}
    return out


def control_reading(comp: dict) -> str:
    """Coupling vs initialisation, read from the control's intervals against InstaFlow and direct."""
    ci, cd = comp.get("control_over_instaflow"), comp.get("control_over_direct")
    if not ci or not cd:
        return "not measured"
    near_inst = ci["low"] <= 1.0 <= ci["high"]
    near_direct = cd["low"] <= 1.0 <= cd["high"]
    if near_inst and not near_direct:
        return "the control (teacher couplings, 2-RF init) matches InstaFlow, not direct: the 2-RF's initialisation explains the difference"
    if near_direct and not near_inst:
        return "the control (teacher couplings, 2-RF init) matches direct, not InstaFlow: the 2-RF's couplings explain the difference"
    if near_inst and near_direct:
        return "the control cannot be told apart from either row: coupling and initialisation cannot be separated at this n"
    return "the control differs from both rows: each of coupling and initialisation moves the score"


def rows_table(rows: dict, latency: dict) -> list[dict]:
    """The rows as records people read (no per-prompt arrays)."""
    keep = ("label", "model", "solver", "steps", "guidance", "nfe", "fid", "fid_low", "fid_high", "alignment",
            "alignment_stderr", "group", "seed", "curve")
    return [{"name": k, **{f: v.get(f) for f in keep}, **latency.get(k, {})} for k, v in rows.items()]


# --- the record people read ----------------------------------------------------------------------

def _iv(c: dict, digits: int = 3) -> str:
    return f"{c['value']:.{digits}f} ({c['low']:.{digits}f} to {c['high']:.{digits}f})"


def _walls(stage_wall_s: dict) -> str:
    """Stage times, the many evaluation stages summed per kind (each one's time is in the JSON)."""
    parts, sums = [], {}
    for k, v in stage_wall_s.items():
        kind = next((p for p in ("eval_", "path_") if k.startswith(p)), None)
        if kind is None:
            parts.append(f"{k} {v:.0f} s")
        else:
            if kind not in sums:
                parts.append(kind)
            sums[kind] = sums.get(kind, 0.0) + v
    label = {"eval_": "test rows", "path_": "straightness rows"}
    n = {p: sum(k.startswith(p) for k in stage_wall_s) for p in sums}
    return ", ".join(f"{label[p]} ({n[p]}) {sums[p]:.0f} s" if p in sums else p for p in parts)


def to_markdown(res: dict) -> str:
    """results/ablation.md from the results record."""
    m = res["machine"]
    lines = ["# The embedded ablation: `make ablation`", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, `{m['platform']}`; "
             f"commit `{res.get('commit', '?')}`; total stage time {res['total_wall_s'] / 60:.1f} min. "
             "Scores depend on the machine (float kernels differ between CPUs): read them with this machine "
             "named, and the verdicts from the intervals.", "",
             "## The paper's claims", "",
             "| claim | compared (a vs b) | statistic | a/b or a-b (95% paired CI) | holds if | verdict |",
             "|---|---|---|---|---|---|"]
    for c in res["claims"].values():
        lines.append(f"| {c['claim']} | {', '.join(c['rows_a'])} vs {', '.join(c['rows_b'])} | {c['statistic']} | "
                     f"{_iv(c)} | {c['holds_if']} {c['target']:g} | **{c['verdict']}** |")
    lines += ["", f"Control (coupling vs initialisation): {res['control_reading']}.", "",
              "## Test rows", "",
              "| row | solver | steps | w | NFE | FID (95% CI over images) | alignment | latency/img |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lat = f"{r['latency_s'] * 1e3:.1f} ms" if r.get("latency_s") else ""
        lines.append(f"| {r['label']} | {r['solver']} | {r['steps']} | {r['guidance']:g} | {r['nfe']} | "
                     f"{r['fid']:.2f} ({r['fid_low']:.2f}-{r['fid_high']:.2f}) | {r['alignment']:.1%} | {lat} |")
    if res["seeds"]:
        lines += ["", "## Distillation rows over training seeds", "",
                  "| row | seeds | FID per seed | mean (spread) | alignment per seed | mean (spread) |", "|---|---|---|---|---|---|"]
        for g, s in res["seeds"].items():
            lines.append(f"| {g} | {', '.join(map(str, s['seeds']))} | {', '.join(f'{v:.2f}' for v in s['fid'])} | "
                         f"{s['fid_mean']:.2f} ({s['fid_spread']:.2f}) | {', '.join(f'{v:.1%}' for v in s['alignment'])} | "
                         f"{s['alignment_mean']:.1%} ({s['alignment_spread']:.1%}) |")
    comp = res["comparisons"]
    if comp:
        lines += ["", "## Other paired comparisons (no target: read the interval)", "",
                  "| comparison | statistic | value (95% paired CI) |", "|---|---|---|"]
        for k, c in comp.items():
            lines.append(f"| {k} | {c['statistic']} | {_iv(c, 4)} |")
    if res["paths"]:
        lines += ["", "## Straightness at equal solver and guidance", "",
                  "Each model's own 25-step path on the same prompts and noises; the 2-RF's step-0 model is the "
                  "teacher through the velocity conversion, solved by the same Euler as the 2-RF.", "",
                  "| row | solver | w | straightness S | path-length ratio |", "|---|---|---|---|---|"]
        for k, p in res["paths"].items():
            lines.append(f"| {p['label']} | {p['solver']} | {p['guidance']:g} | {p['straightness']:.4f} | "
                         f"{p['path_length_ratio']:.4f} |")
    cq = res.get("coupling_quality")
    if cq:
        lines += ["", "## What the distillations learn from: coupling quality", "", cq["protocol"] + ".", "",
                  "| couplings | generated by | n | FID (95% CI) | alignment |", "|---|---|---|---|---|"]
        for name in ("teacher", "rf2"):
            if name in cq:
                c, g = cq[name], cq[name]["generation"]
                how = f"{g.get('solver')} {g.get('steps')} steps, w = {g.get('guidance')}"
                lines.append(f"| {name} | {how} | {c['n']} | {c['fid']:.2f} ({c['fid_low']:.2f}-{c['fid_high']:.2f}) | "
                             f"{c['alignment']:.1%} |")
    sel = res.get("rf2_coupling_steps")
    if sel:
        lines += ["", f"2-RF coupling steps, chosen on val ({sel['rule']}): **{sel['chosen']}**. Val scores: " +
                  ", ".join(f"{k} steps FID {v['fid']:.2f} / {v['alignment']:.1%}" for k, v in sel["rf2"].items()) +
                  f"; the teacher's couplings' settings (DPM-Solver++ 25, w = 3): FID "
                  f"{sel['teacher_dpm25_w3']['fid']:.2f} / {sel['teacher_dpm25_w3']['alignment']:.1%}."]
    vb = res.get("velocity_boundary")
    if vb:
        step0 = [r for r in vb["rows"] if r["model"] == TEACHER]
        lines += ["", "Velocity boundary (chosen on val before this run, docs/velocity_boundary.md): the step-0 model's "
                  "val FID / alignment per choice: " + "; ".join(
                      f"{r['boundary']} {r['steps']} step{'s' if r['steps'] > 1 else ''}: {r['fid']:.1f} / {r['alignment']:.1%}"
                      for r in step0) + "."]
    f = res["figures"]
    lines += ["", "## Figures", "",
              f"(a) straightness and val FID against reflow steps: ![reflow]({Path(f['a']).name})", "",
              f"(b) one-step val FID and alignment against distillation steps (band: min..max over seeds): "
              f"![distill]({Path(f['b']).name})", "",
              f"(c) test FID against NFE and latency: ![speed]({Path(f['c']).name})", "",
              "## Stage wall times", "",
              _walls(res["stage_wall_s"]) + f"; total {res['total_wall_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


# --- the record, written when every stage is done ------------------------------------------------

def write(root: Path, results: Path, machine: dict, n_test: int, n_path: int, n_boot: int) -> dict:
    """results/ablation.{md,json} and the three figures, from what the stages left under ``root``."""
    eval_dir = root / "eval"
    m = machine
    rows = load_rows(eval_dir)
    paths = load_paths(eval_dir)
    ref = np.load(eval_dir / "test_ref_features.npy")
    lat_file = eval_dir / "latency.json"
    lat = json.loads(lat_file.read_text())["rows"] if lat_file.exists() else {}
    # the distillation rows share seed 0's latency (same architecture, same call)
    for name in rows:
        base = name.rsplit("_s", 1)[0] + "_s0_1" if "_s" in name else None
        if name not in lat and base in lat:
            lat[name] = lat[base]
    table = rows_table(rows, lat)
    comp = comparisons(rows, paths, ref, n_boot)
    curves = {"reflow (2-RF)": figures.read_curve(root / "reflow"),
              "reflow again (3-RF)": figures.read_curve(root / "rf3")}
    distill_curves = {g: [figures.read_curve(root / f"distill_{g}_s{s}") for s in SEEDS] for g in DISTILLS}
    fig_dir = results.parent
    fig_dir.mkdir(parents=True, exist_ok=True)
    stem = results.name
    named = f"{m['cpu']}, {m['cpus']} CPUs, {m['torch_threads']} threads, {m['platform']}"
    figs = {"a": str(figures.reflow_figure(curves, fig_dir / f"{stem}_a_reflow.png", named)),
            "b": str(figures.distill_figure(distill_curves, fig_dir / f"{stem}_b_distill.png", named)),
            "c": str(figures.speed_figure(table, fig_dir / f"{stem}_c_speed.png", n_test, named))}
    timings = {k: v["wall_s"] for k, v in sorted(read_timings(root / "timings").items(),
                                                 key=lambda kv: kv[1]["start"])}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {
        "machine": m,
        "commit": commit or None,
        "protocol": {"test": f"first {n_test} test captions (sorted by key) of {TEST}, noise seeds "
                             f"0..{n_test - 1} for every row; FID on embedded-evaluator features vs test "
                             f"images [{n_test}, {2 * n_test}); bf16 autocast, fp32 ODE state",
                     "paths": f"straightness and path-length ratio per prompt on the first {n_path} test "
                              "prompts, each model's own 25-step path",
                     "intervals": f"95% paired bootstrap over prompt indices ({n_boot} resamples); "
                                  "distillation rows pooled over their training seeds",
                     "choices": "on val only (2-RF coupling steps, velocity boundary); test read once here"},
        "claims": claims(rows, paths, ref, n_boot),
        "comparisons": comp,
        "control_reading": control_reading(comp),
        "seeds": seed_summary(rows),
        "rows": table,
        "paths": {k: {f: v[f] for f in ("label", "solver", "guidance", "n", "straightness", "path_length_ratio")}
                  for k, v in paths.items()},
        "coupling_quality": _read(eval_dir / "coupling_quality.json"),
        "rf2_coupling_steps": _read(root / "select_rf2_steps.json"),
        "velocity_boundary": _read(Path("docs/velocity_boundary.json")),
        "curves": {"reflow": curves, "distill": distill_curves},
        "figures": figs,
        "stage_wall_s": timings,
        "total_wall_s": round(sum(timings.values()), 1),
    }
    write_json(results.with_suffix(".json"), res)
    atomic_write_text(results.with_suffix(".md"), to_markdown(res))
    print(results.with_suffix(".md").read_text())
    return res


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _plain(o):
    """numpy scalars and arrays as JSON numbers and lists."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON (numpy values as numbers), written atomically: a stage's record marks it done."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_plain))
