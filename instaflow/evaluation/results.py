"""The results table of the embedded chain: rows sampled on one protocol, path metrics, latency, targets.

Every model is sampled from the same noises (seeds 0..n-1) and the same test prompts; FID uses
the embedded evaluator's features against real test images [n, 2n) with a bootstrap interval;
alignment is the evaluator's exact-match rate; straightness is measured along each model's own
path in rectified-flow time (the solver's states), with and without its first step, beside the
path-length ratio (1.0 = straight); latency is end to end per image (text encoding, UNet
evaluations, VAE decoding), the median of repeated rounds. ``python -m instaflow.tools.evaluate``
runs it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from instaflow.contracts import Family
from instaflow.flow.noise import seeded_noise
from instaflow.flow.straightness import path_length_ratio, straightness


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
    """Straightness S (with and without the first step) and path-length ratio of a solver's states
    [(t, x_t), ...] in flow time, x0 first, averaged over samples."""
    return {"straightness": straightness(path).mean().item(),
            "straightness_wo_first": straightness(path, skip_first=True).mean().item() if len(path) > 2 else None,
            "path_length_ratio": path_length_ratio(path).mean().item()}


@torch.no_grad()
def sample_row(model: Family, prompts: list[str], steps: int, guidance: float, batch_size: int,
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


@torch.no_grad()
def faster_unet_bf16(model: Family, prompt: str, steps: int, guidance: float, batch_size: int,
                     calls: int = 3) -> bool:
    """Whether this model's sampling at ``batch_size`` is faster with its UNet under bf16 autocast than
    in fp32 on this machine (median of ``calls`` after a warm-up): small batches on a CPU can be
    slower in bf16 (conversion overhead), large batches and GPUs faster."""
    prompts = [prompt] * batch_size
    x0 = seeded_noise(list(range(batch_size)), model.latent_shape)
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
                x0 = seeded_noise(seeds, model.latent_shape)
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
    return row.steps * (2 if row.guidance != 1.0 else 1)  # every w != 1 runs the unconditional pass too


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
    """The quick chain's budget checks ({value, target, met}) and its ratios ({value}, no target).

    The chain is a small-budget demonstration: its ratios are shown as measured, without verdicts;
    the paper's claims are tested, with paired intervals and training seeds, by ``make ablation``
    (results/ablation.md). ``None`` where a row is missing.
    """
    def get(name: str, key: str):
        r = rows.get(name) or {}
        return None if r.get("missing") else r.get(key)

    def ratio(a, b):
        return None if a is None or b is None or not b else a / b

    checks = {
        "one_step_speedup_vs_teacher": (ratio(get("teacher_25", "latency_s"), get("instaflow_1", "latency_s")), ">=", 15.0),
        "train_reflow_minutes": (None if total_wall_s is None else total_wall_s / 60, "<=", 20.0),
    }
    out = {}
    for k, (v, op, t) in checks.items():
        met = None if v is None else (v <= t if op == "<=" else v >= t)
        out[k] = {"value": None if v is None else round(v, 3), "target": f"{op} {t:g}", "met": met}
    shown = {
        "instaflow_fid_over_teacher": ratio(get("instaflow_1", "fid"), get("teacher_25", "fid")),
        "rf2_25_fid_over_teacher": ratio(get("rf2_25", "fid"), get("teacher_25", "fid")),
        "direct_fid_over_instaflow": ratio(get("direct_1", "fid"), get("instaflow_1", "fid")),
    }
    for k, v in shown.items():
        out[k] = {"value": None if v is None else round(v, 3), "target": None, "met": None}
    return out


def targets_markdown(t: dict) -> str:
    lines = ["| check | measured | budget |", "|---|---|---|"]
    for k, v in t.items():
        if v["target"] is None:
            continue
        met = "n/a" if v["met"] is None else ("met" if v["met"] else "**not met**")
        lines.append(f"| {k} | {v['value']} | {v['target']} ({met}) |")
    ratios = [f"{k} {v['value']}" for k, v in t.items() if v["target"] is None]
    lines += ["", "Ratios, as measured (a small-budget demonstration: no claim verdicts here; the paper's claims "
              "are tested with intervals and seeds in results/ablation.md): " + ", ".join(ratios) + "."]
    return "\n".join(lines)
