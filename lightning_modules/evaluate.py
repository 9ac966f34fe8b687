"""Evaluate teacher, 2-RF and one-step students on one protocol and write the results table.

    python -m lightning_modules.evaluate --out runs/embedded/results   # after make train-reflow's stages

Every model is sampled from the same noises (seeds 0..n-1) and the same test prompts; FID uses
the embedded evaluator's features against real test images [n, 2n) with a bootstrap interval;
alignment is the evaluator's exact-match rate; straightness is measured along each model's own
path in rectified-flow time (finite differences of its solver's states), with and without its
first step, beside the path-length ratio (1.0 = straight); latency is end to end per image
(text encoding, UNet evaluations, VAE decoding), the median of repeated rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_modules import flows, models, sampling
from lightning_modules.pipeline import TextToImage


@dataclass
class Row:
    name: str
    label: str
    model: str
    steps: int
    guidance: float


DEFAULT_ROWS = [
    Row("teacher_25", "teacher (DPM-Solver++)", "assets/embedded-sd", 25, 3.0),
    Row("rf2_25", "2-RF (Euler)", "runs/embedded/models/rf2", 25, 1.5),
    Row("rf2_1", "2-RF (one step)", "runs/embedded/models/rf2", 1, 1.0),
    Row("instaflow_1", "InstaFlow (2-RF + distillation)", "runs/embedded/models/instaflow", 1, 1.0),
    Row("direct_1", "direct distillation (teacher init)", "runs/embedded/models/direct", 1, 1.0),
    Row("direct_rfinit_1", "direct distillation, 2-RF init (control)", "runs/embedded/models/direct_rfinit", 1, 1.0),
]


def path_metrics(path: list) -> dict:
    """Straightness S (with and without the first step) and path-length ratio from a solver's states
    [(t, x_t), ...] in flow time, x0 first (finite differences: for Euler, exactly the velocities it used)."""
    x0, x1 = path[0][1], path[-1][1]
    segs = [(t0, t1 - t0, (xb - xa) / (t1 - t0)) for (t0, xa), (t1, xb) in zip(path[:-1], path[1:]) if t1 > t0]
    return _summary(x0, x1, segs)


@torch.no_grad()
def sample_row(model: TextToImage, prompts: list[str], steps: int, guidance: float, batch_size: int,
               path_n: int) -> tuple[torch.Tensor, dict]:
    """Images of prompt i from noise seed i, and path metrics of the first ``path_n`` prompts, read off
    the same solve (the first chunk keeps its solver states) instead of solving those prompts twice."""
    no_path = {"straightness": None, "straightness_wo_first": None, "path_length_ratio": None}
    path_n = min(path_n, len(prompts)) if steps > 1 else 0
    if not path_n:
        return model.sample(prompts, steps, guidance, seed=0, batch_size=batch_size), no_path
    path: list = []
    head = model.decode(model.sample_latents(prompts[:path_n], steps, guidance, list(range(path_n)), path=path))
    rest = model.sample_images(prompts[path_n:], steps, guidance, list(range(path_n, len(prompts))), batch_size)
    return torch.cat([head, rest]), path_metrics(path)


def _summary(x0: torch.Tensor, x1: torch.Tensor, segs: list) -> dict:
    s = flows.straightness(x0, x1, segs).mean().item()
    s_wo = flows.straightness(x0, x1, segs[1:]).mean().item() if len(segs) > 1 else None
    ratio = flows.path_length_ratio(x0, x1, segs).mean().item()
    return {"straightness": s, "straightness_wo_first": s_wo, "path_length_ratio": ratio}


@torch.no_grad()
def faster_unet_bf16(model: TextToImage, prompt: str, steps: int, guidance: float, batch_size: int,
                     calls: int = 3) -> bool:
    """Whether this model's sampling at ``batch_size`` is faster with its UNet under bf16 autocast than
    in fp32 on this machine (median of ``calls`` after a warm-up): small batches on a CPU can be
    slower in bf16 (conversion overhead), large batches and GPUs faster."""
    prompts = [prompt] * batch_size
    x0 = sampling.seeded_noise(list(range(batch_size)), model.latent_shape)
    states = model.encode(prompts, guidance)
    times = {}
    for bf16 in (False, True):
        model.unet_bf16 = bf16
        model.sample_latents(prompts, steps, guidance, x0=x0, states=states)
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            model.sample_latents(prompts, steps, guidance, x0=x0, states=states)
            ts.append(time.perf_counter() - t0)
        times[bf16] = statistics.median(ts)
    model.unet_bf16 = None
    return times[True] < times[False]


@torch.no_grad()
def latency(models_: dict, prompt: str, batch_size: int, rounds: int, warmup: int = 3,
            min_round_s: float = 0.25, choose_precision: bool = True) -> dict:
    """Median seconds per image of several models, end to end and UNet evaluations only.

    ``models_``: name -> (model, steps, guidance). Rounds are interleaved (each round times every
    model), so load changes on a shared machine hit all models alike and their ratios stay
    meaningful. Within a round a cheap model is timed repeatedly, for about ``min_round_s``, so a
    one-step model's ~40 ms calls get as many samples as its noise needs. ``choose_precision``:
    each model's UNet runs in whichever of fp32 and bf16 autocast is faster for it at this batch
    size (``faster_unet_bf16``), the same rule for every row; text encoding and decoding keep the
    model's ``bf16`` setting.
    """
    prompts = [prompt] * batch_size
    seeds = list(range(batch_size))
    repeats, unet_bf16 = {}, {}
    for name, (model, steps, w) in models_.items():
        unet_bf16[name] = faster_unet_bf16(model, prompt, steps, w, batch_size) if choose_precision else model.bf16
        model.unet_bf16 = unet_bf16[name]
        for _ in range(warmup):
            t0 = time.perf_counter()
            model.sample(prompts, steps, w, seed=0, batch_size=batch_size)
        repeats[name] = max(1, math.ceil(min_round_s / (time.perf_counter() - t0)))
    e2e: dict = {k: [] for k in models_}
    unet: dict = {k: [] for k in models_}
    for _ in range(rounds):
        for name, (model, steps, w) in models_.items():
            for _ in range(repeats[name]):
                t0 = time.perf_counter()
                model.sample(prompts, steps, w, seed=0, batch_size=batch_size)
                e2e[name].append((time.perf_counter() - t0) / batch_size)
                x0 = sampling.seeded_noise(seeds, model.latent_shape)
                states = model.encode(prompts, w)
                t0 = time.perf_counter()
                model.sample_latents(prompts, steps, w, x0=x0, states=states)
                unet[name].append((time.perf_counter() - t0) / batch_size)
    for model, _, _ in models_.values():
        model.unet_bf16 = None
    return {k: {"latency_s": statistics.median(e2e[k]), "latency_unet_s": statistics.median(unet[k]),
                "latency_rounds": len(e2e[k]), "latency_unet_precision": "bf16" if unet_bf16[k] else "fp32"}
            for k in models_}


def nfe(row: Row) -> int:
    """UNet evaluations per image: one per step (DPM-Solver++(2M) and Euler), doubled under guidance."""
    return row.steps * (2 if row.guidance > 1.0 else 1)


def to_markdown(results: dict) -> str:
    lines = ["| model | steps | w | FID (95% CI) | alignment | straightness (w/o 1st) | path ratio | NFE | latency/img (UNet) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        if r.get("missing"):
            lines.append(f"| {r['label']} | | | not run ({r['missing']}) | | | | | |")
            continue
        st = "n/a" if r["straightness"] is None else f"{r['straightness']:.4f} ({r['straightness_wo_first'] or 0:.4f})"
        pr = "n/a" if r["path_length_ratio"] is None else f"{r['path_length_ratio']:.3f}"
        lat = "n/a" if r["latency_s"] is None else f"{1000 * r['latency_s']:.1f} ms ({1000 * r['latency_unet_s']:.1f} ms)"
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['guidance']:g} | {r['fid']:.2f} ({r['fid_low']:.2f}-{r['fid_high']:.2f}) "
            f"| {100 * r['alignment']:.1f}% | {st} | {pr} | {r['nfe']} | {lat} |")
    return "\n".join(lines)


def targets(rows: dict, total_wall_s: float | None) -> dict:
    """The issue's targets, each as {value, target, met}; ``None`` where a row is missing."""
    def get(name: str, key: str):
        r = rows.get(name) or {}
        return None if r.get("missing") else r.get(key)

    def ratio(a, b):
        return None if a is None or b is None or not b else a / b

    checks = {
        "instaflow_fid_over_teacher": (ratio(get("instaflow_1", "fid"), get("teacher_25", "fid")), "<=", 1.25),
        "rf2_25_fid_over_teacher": (ratio(get("rf2_25", "fid"), get("teacher_25", "fid")), "<=", 1.15),
        "rf2_straightness_over_teacher": (ratio(get("rf2_25", "straightness"), get("teacher_25", "straightness")), "<=", 0.5),
        "direct_fid_over_instaflow": (ratio(get("direct_1", "fid"), get("instaflow_1", "fid")), ">=", 1.2),
        "one_step_speedup_vs_teacher": (ratio(get("teacher_25", "latency_s"), get("instaflow_1", "latency_s")), ">=", 15.0),
        "train_reflow_minutes": (None if total_wall_s is None else total_wall_s / 60, "<=", 20.0),
    }
    out = {}
    for k, (v, op, t) in checks.items():
        met = None if v is None else (v <= t if op == "<=" else v >= t)
        out[k] = {"value": None if v is None else round(v, 3), "target": f"{op} {t:g}", "met": met}
    return out


def targets_markdown(t: dict) -> str:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for k, v in t.items():
        met = "n/a" if v["met"] is None else ("yes" if v["met"] else "**no**")
        lines.append(f"| {k} | {v['value']} | {v['target']} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from lightning_modules.evaluate_floors import eval_protocol, score_images
    from lightning_modules.evaluator import load_evaluator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evaluator", default="assets/embedded-evaluator")
    p.add_argument("--test", default="runs/data/shapes/test/{00000..00003}.tar")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--rows", default=None, help="JSON list of {name,label,model,steps,guidance}; default: the six rows")
    p.add_argument("--straightness-n", type=int, default=256)
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--latency-rounds", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="runs/embedded/results")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for every UNet evaluation (all rows alike)")
    p.add_argument("--timings", default=None, help="folder of lightning_modules.timed records (stage wall times)")
    a = p.parse_args(argv)
    t_eval = time.time()

    rows = [Row(**r) for r in json.loads(Path(a.rows).read_text())] if a.rows else DEFAULT_ROWS
    evaluator = load_evaluator(a.evaluator)
    proto = eval_protocol(a.test, a.n, evaluator)
    captions, scenes = proto["captions"], proto["scenes"]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"protocol": {
        "prompts": f"first {a.n} test captions (sorted by key) of {a.test}", "noise_seeds": f"0..{a.n - 1}, same for every row",
        "fid": f"clean-fid Frechet distance on embedded-evaluator features ({a.evaluator}) vs real test images [{a.n}, {2 * a.n}); 95% bootstrap CI",
        "alignment": "share of images whose predicted scene (cells, shapes, colours, background) matches the prompt",
        "straightness": f"S = sum dt ||(x1 - x0) - v||^2 (mean over elements) along the model's own solver path in flow time, {a.straightness_n} prompts",
        "precision": "bf16 autocast for text encoding, UNet evaluations and VAE decoding; fp32 ODE state" if a.bf16 else "fp32",
        "latency": f"median over {a.latency_rounds} rounds interleaving all models (each model timed for >= 0.25 s per round; 3 warm-up calls), batch {a.latency_batch}, end to end on this machine ({torch.get_num_threads()} threads); UNet-only beside it; each model's UNet in whichever of fp32 and bf16 autocast is faster for it at this batch size (measured first, latency_unet_precision), text encoding and decoding as under precision",
    }, "rows": {}}
    encoders: dict = {}
    loaded: dict = {}  # name -> (model, steps, guidance), for the interleaved latency rounds
    for row in rows:
        if not Path(row.model).exists() and not row.model.count("/") == 1:
            results["rows"][row.name] = {"label": row.label, "missing": f"{row.model} not found"}
            continue
        model = TextToImage.from_pretrained(row.model)
        model.bf16 = a.bf16
        # rows sharing a text encoder share its cached states of the n prompts (encoding is not
        # what is compared); latency below switches the cache off, so it still pays for encoding
        te_key = json.dumps(models.component_sources(row.model), sort_keys=True, default=str)
        if te_key not in encoders:
            encoders[te_key] = model.text_encoder
            model.text_encoder.cache_size = a.n + 1
        model.text_encoder = encoders[te_key]
        t0 = time.time()
        images, pm = sample_row(model, captions, row.steps, row.guidance, a.batch_size, a.straightness_n)
        score = score_images(images, scenes, proto["ref_features"], evaluator)
        results["rows"][row.name] = {"label": row.label, "model": row.model, "steps": row.steps,
                                     "guidance": row.guidance, "nfe": nfe(row), **score, **pm,
                                     "eval_wall_s": round(time.time() - t0, 1)}
        loaded[row.name] = (model, row.steps, row.guidance)
        print(f"{row.name}: FID {score['fid']:.2f} alignment {score['alignment']:.3f} {pm}", flush=True)
    # latency of all rows in interleaved rounds, text cache off (every call pays for its encoding)
    for enc in encoders.values():
        enc.cache_size = 0
        enc._cache.clear()
    t0 = time.time()
    lat = latency(loaded, captions[0], a.latency_batch, a.latency_rounds) if a.latency_rounds and loaded else {}
    for name in loaded:
        results["rows"][name].update(lat.get(name, {"latency_s": None, "latency_unet_s": None, "latency_rounds": 0}))
    if lat:
        print(f"latency ({time.time() - t0:.0f} s): " + ", ".join(
            f"{k} {v['latency_s'] * 1e3:.1f} ms ({v['latency_unet_s'] * 1e3:.1f})" for k, v in lat.items()), flush=True)
    from lightning_modules.timed import read_timings

    records = sorted(read_timings(a.timings).values(), key=lambda r: r["start"]) if a.timings else []
    stage = {r["stage"]: r["wall_s"] for r in records}  # in the order the stages ran
    stage["eval"] = round(time.time() - t_eval, 1)
    results["stage_wall_s"] = stage
    # the sum of the stages' own wall times (make's sub-second bookkeeping between them excluded)
    results["total_wall_s"] = round(sum(stage.values()), 1) if len(stage) > 1 else None
    results["targets"] = targets(results["rows"], results["total_wall_s"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = to_markdown(results)
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in stage.items())
    total = "" if results["total_wall_s"] is None else f"; total {results['total_wall_s'] / 60:.1f} min"
    md = f"{table}\n\nStage wall times: {walls}{total}.\n\n{targets_markdown(results['targets'])}\n"
    (out_dir / "results.md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
