"""Roofline: each stage's achieved FLOP/s as a fraction of this machine's own measured peak, in one run.

    python -m benchmarks.roofline                                  # every stage, default sizes (make bench)
    python -m benchmarks.roofline --stages onestep,reflow --seconds 2
    python -m benchmarks.roofline --set reflow.activation_checkpointing=true --precision bf16-mixed

1. The limit: GEMM (``torch.mm`` over a few square sizes, the best) and a 3x3 ``conv2d`` of the embedded UNet's
   shape, in fp32 and, where the hardware has native bf16 (CUDA; a CPU flagging avx512_bf16 or amx_bf16), bf16.
   The limit of a dtype is the best of its GEMM and conv rates, measured before and after the stages (the better
   of the two: on a shared machine the load drifts during a run; both are recorded).
2. The stages, through the project's own code: FLOPs of one call counted by ``torch.utils.flop_counter.
   FlopCounterMode`` (matrix products, convolutions and attention; elementwise work, norms and the optimizer's
   updates count 0, so a stage dominated by them reads low), after a warm-up; then the median seconds per call
   over ``--seconds`` (at least ``--min-calls`` calls). A stage that runs in bf16 is read against the bf16 limit
   (against fp32 where bf16 is not native, and the row says so).

``--set stage.key=value`` (repeatable; value parsed as YAML) is passed to that stage's builder only when given,
so the same script measures a checkout whose modules lack a newer setting. The builders: reflow, distill and
couplings take it as a constructor kwarg of their LightningModule; evaluator as a kwarg of ``load_evaluator``;
onestep as a loading option of ``load_family``, except the family attributes ``bf16`` / ``unet_bf16``, set on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded-sd"
EVALUATOR = ROOT / "assets" / "embedded-evaluator"
STAGES = ("reflow", "distill", "couplings", "evaluator", "onestep")
CAPTIONS = ["a large red circle in the center on a white background", "a small blue square in the top left",
            "a big green triangle at the bottom on a gray background", "a yellow cross on the right, black background",
            "a purple square on the left and an orange circle on the right", "a blue triangle at the top"]
GEMM_SIZES = (256, 512, 1024, 2048)
CONV_SHAPE = (64, 128, 8, 8)  # (N, C, H, W): the embedded UNet's widest blocks at 8x8 latents, batch 64
ONESTEP_ATTRIBUTES = ("bf16", "unet_bf16")  # family attributes, not loading options


# -- FLOP rules and counting -------------------------------------------------------------------------------

def gemm_flops(m: int, n: int, k: int) -> int:
    """(m x k) @ (k x n): one multiply and one add per term, 2 m n k."""
    return 2 * m * n * k


def conv_flops(n: int, c_in: int, c_out: int, h_out: int, w_out: int, kh: int, kw: int) -> int:
    """A dense conv2d as a GEMM: 2 x (N H_out W_out) x C_out x (C_in kh kw)."""
    return gemm_flops(n * h_out * w_out, c_out, c_in * kh * kw)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and any backward it runs), as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# -- timing --------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], seconds: float, min_calls: int, device: torch.device) -> list[float]:
    """Seconds of each call of ``fn``, calls until ``seconds`` have passed and at least ``min_calls``."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def best_rate(fn: Callable[[], object], flops: int, seconds: float, device: torch.device) -> float:
    """Best FLOP/s of ``fn`` over ``seconds`` (after one warm-up call): the peak is what the machine can do."""
    fn()
    sync(device)
    return flops / min(time_calls(fn, seconds, 3, device))


# -- the limit -----------------------------------------------------------------------------------------------

def native_bf16(device: torch.device) -> bool:
    """bf16 matrix units: every CUDA device this project targets; on CPU, avx512_bf16 or amx_bf16 in the flags."""
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure_peak(device: torch.device, seconds: float = 0.25, sizes: tuple[int, ...] = GEMM_SIZES,
                 conv_shape: tuple[int, int, int, int] = CONV_SHAPE) -> dict:
    """{dtype: {gemm, gemm_size, conv, limit}} in FLOP/s; bf16 only where native. ``seconds`` per shape."""
    g = torch.Generator().manual_seed(0)
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if native_bf16(device) else {})}
    out = {}
    with torch.no_grad():
        for name, dtype in dtypes.items():
            rates = {}
            for n in sizes:
                a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
                rates[n] = best_rate(lambda: torch.mm(a, b), gemm_flops(n, n, n), seconds, device)
            size = max(rates, key=rates.get)
            nb, c, h, w = conv_shape
            x = torch.randn(nb, c, h, w, generator=g).to(device, dtype)
            weight = torch.randn(c, c, 3, 3, generator=g).to(device, dtype)
            conv = best_rate(lambda: torch.nn.functional.conv2d(x, weight, padding=1),
                             conv_flops(nb, c, c, h, w, 3, 3), seconds, device)
            out[name] = {"gemm": rates[size], "gemm_size": size, "conv": conv, "limit": max(rates[size], conv)}
    return out


# -- settings ------------------------------------------------------------------------------------------------

def parse_sets(items: list[str]) -> dict[str, dict]:
    """``["reflow.lr=1e-4", ...]`` -> {"reflow": {"lr": 0.0001}}; values are YAML (true, 3, null, [1, 2]), and
    a string that reads as a number is that number."""
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set takes stage.key=value, got {item!r}")
        if stage not in STAGES:
            raise ValueError(f"--set {item!r}: stage must be one of {', '.join(STAGES)}")
        out.setdefault(stage, {})[name] = yaml.safe_load(value)
        if isinstance(out[stage][name], str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                out[stage][name] = float(out[stage][name])
            except ValueError:
                pass
    return out


# -- stages: each builder returns its Stage (what one call does, and how its rows read) -----------------------

@dataclass
class Part:
    """One timed row: ``call`` runs it once; ``items`` per call (samples, steps, images) for the throughput."""
    name: str
    call: Callable[[], object]
    items: int
    unit: str
    bf16: bool


@dataclass
class Stage:
    name: str
    batch: int
    parts: list[Part]
    settings: dict = field(default_factory=dict)


def _coupling_batch(n: int, start: int) -> dict:
    keys = [f"{start + i:09d}" for i in range(n)]
    return {"key": keys, "caption": [CAPTIONS[int(k) % len(CAPTIONS)] + f" #{k}" for k in keys],
            "url": ["bench"] * n, "worker": [0] * n, "skipped": 0}


def _training_part(module, batch: int, precision: str, device: torch.device, label: str) -> Part:
    """loss + backward + gradient clipping + optimizer step of a FlowStudent, as Lightning runs it."""
    from instaflow.flow.noise import latent_shape

    module.configure_model()
    module.to(device)
    opt = module.configure_optimizers()["optimizer"]
    shape = (batch, *latent_shape(module.unet.config))
    g = torch.Generator().manual_seed(0)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    with torch.no_grad():  # the couplings store their text states (pairs_teacher.yaml): no encoding per step
        states = module.family.text_encoder(captions).to(torch.float16)
    data = {"x0": torch.randn(shape, generator=g).to(device), "x1": torch.randn(shape, generator=g).to(device),
            "caption": captions, "text_states": states.to(device), "skipped": 0}
    bf16 = precision == "bf16-mixed"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.loss(data, module._gen, module.hparams.caption_dropout)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.unet.parameters(), 1.0)
        opt.step()

    return Part(label, step, 1, "steps/s", bf16)


def build_reflow(model: str, batch: int, precision: str, device: torch.device, sets: dict) -> Stage:
    from lightning_modules.reflow import ReflowTraining

    m = ReflowTraining(model, parameterization="velocity_wrapper", time_distribution="u_shaped",
                       caption_dropout=0.1, lr=3e-4, warmup_steps=1, **sets)
    return Stage("reflow", batch, [_training_part(m, batch, precision, device, f"reflow step ({precision})")], sets)


def build_distill(model: str, batch: int, precision: str, device: torch.device, sets: dict) -> Stage:
    from instaflow.losses import L2
    from lightning_modules.distill import DistillTraining

    kw = {"loss": L2(), **sets}
    m = DistillTraining(model, parameterization="velocity_wrapper", lr=1e-4, warmup_steps=1, **kw)
    return Stage("distill", batch, [_training_part(m, batch, precision, device, f"distill step ({precision})")],
                 sets)


def build_couplings(model: str, batch: int, precision: str, device: torch.device, sets: dict) -> Stage:
    from lightning_modules.couplings import CouplingGeneration

    kw = {"kind": "ddpm", "solver": "dpm_solver++", "steps": 25, "guidance": 3.0, "bf16": True,
          "store_text_states": True, **sets}
    gen = CouplingGeneration(model, **kw)
    gen.to(device)
    gen.configure_model()
    counter = iter(range(0, 10**9, batch))

    def call():  # fresh keys (seeds) and captions each call, as in the stage
        gen.predict_step(_coupling_batch(batch, next(counter)), 0)

    label = f"couplings ({kw['steps']}-step {kw['solver']}, w={kw['guidance']:g}, {'bf16' if kw['bf16'] else 'fp32'})"
    return Stage("couplings", batch, [Part(label, call, batch, "couplings/s", bool(kw["bf16"]))], sets)


def build_evaluator(model: str, batch: int, precision: str, device: torch.device, sets: dict) -> Stage:
    from instaflow.evaluation.fid import image_features
    from instaflow.evaluation.shapes_evaluator import load_evaluator, predict_scenes

    net = load_evaluator(EVALUATOR, device=device, **sets)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8)
    signed = images.float() / 127.5 - 1.0  # predict_scenes reads [-1, 1]
    return Stage("evaluator", batch, [
        Part("evaluator features (FID)", lambda: image_features(images, net, batch_size=batch), batch, "images/s",
             False),
        Part("evaluator predictions (alignment)", lambda: predict_scenes(net, signed, batch_size=batch), batch,
             "images/s", False)], sets)


def build_onestep(model: str, batch: int, precision: str, device: torch.device, sets: dict) -> Stage:
    """Batch 1, the teacher's folder read as a flow (raw weights fed 1000 (1 - t)): one Euler step, the cost of a
    one-step student of the same architecture; text encoder, UNet, VAE decoder, and all three."""
    from instaflow.models.families import load_family

    options = {k: v for k, v in sets.items() if k not in ONESTEP_ATTRIBUTES}
    family = load_family(model, kind="flow", **options)
    for key in ONESTEP_ATTRIBUTES:
        if key in sets:
            setattr(family, key, sets[key])
    family.to(device)
    prompt = [CAPTIONS[0]]
    states = family.encode(prompt, 1.0)
    latents = family.sample_latents(prompt, 1, 1.0, [0], states=states)
    unet_bf16 = family.bf16 if family.unet_bf16 is None else family.unet_bf16
    return Stage("onestep", 1, [
        Part("one-step: text encoder", lambda: family.encode(prompt, 1.0), 1, "ms", family.bf16),
        Part("one-step: UNet (1 Euler step)", lambda: family.sample_latents(prompt, 1, 1.0, [0], states=states), 1,
             "ms", unet_bf16),
        Part("one-step: VAE decoder", lambda: family.decode(latents), 1, "ms", family.bf16),
        Part("one-step: end to end", lambda: family.sample_images(prompt, 1, 1.0, [0]), 1, "ms", family.bf16)],
        sets)


BUILDERS = {"reflow": build_reflow, "distill": build_distill, "couplings": build_couplings,
            "evaluator": build_evaluator, "onestep": build_onestep}


# -- measuring -----------------------------------------------------------------------------------------------

def peak_for(bf16: bool, peak: dict) -> tuple[str, float]:
    """The limit a part is read against: bf16's where it runs in bf16 and bf16 is native, else fp32's."""
    if bf16 and "bf16" in peak:
        return "bf16", peak["bf16"]["limit"]
    return ("fp32 (bf16 not native)" if bf16 else "fp32"), peak["fp32"]["limit"]


def combine_peaks(before: dict, after: dict) -> dict:
    """The limit of each dtype: the better of the measurements before and after the stages (both kept). On a
    shared machine the load drifts during a run; the better one is nearer what the machine can do."""
    out = {}
    for dtype, b in before.items():
        best = max(b, after[dtype], key=lambda p: p["limit"])
        out[dtype] = {**best, "limit_before": b["limit"], "limit_after": after[dtype]["limit"]}
    return out


def read_against(row: dict, bf16: bool, peak: dict) -> dict:
    """``row`` with the limit it is read against and its fraction of it."""
    dtype, limit = peak_for(bf16, peak)
    return {**row, "peak_dtype": dtype, "peak_gflops_per_s": limit / 1e9,
            "fraction_of_peak": row["gflops_per_s"] * 1e9 / limit}


def measure_part(part: Part, stage: Stage, seconds: float, min_calls: int, warmup: int,
                 device: torch.device) -> dict:
    for _ in range(warmup):  # first-call costs: allocations, caches, lazy initialisation
        part.call()
    sync(device)
    flops = count_flops(part.call)
    times = time_calls(part.call, seconds, min_calls, device)
    s = statistics.median(times)
    row = {"stage": stage.name, "part": part.name, "batch": stage.batch, "flops_per_call": flops,
           "seconds_per_call": s, "calls": len(times), "gflops_per_s": flops / s / 1e9, "bf16": part.bf16,
           "settings": stage.settings}
    if part.unit == "ms":
        row.update(throughput=1e3 * s, throughput_unit="ms latency")
    else:
        row.update(throughput=part.items / s, throughput_unit=part.unit)
    return row


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    import importlib.util

    project = Path(importlib.util.find_spec("lightning_modules").origin).parents[1]  # the tree measured (ab.py)
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "project": str(project), "load_average_before": list(os.getloadavg())}


def to_markdown(result: dict) -> str:
    m, peak = result["machine"], result["peak"]
    lines = [f"CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads), torch "
             f"{m['torch']}, device {result['device']}; load average before "
             f"{' / '.join(f'{x:.2f}' for x in m['load_average_before'])}, after "
             f"{' / '.join(f'{x:.2f}' for x in m['load_average_after'])}", "",
             "| limit | GEMM GFLOP/s (best n) | conv 3x3 GFLOP/s | limit GFLOP/s (before / after the stages) |",
             "|---|---|---|---|"]
    for dtype, p in peak.items():
        lines.append(f"| {dtype} | {p['gemm'] / 1e9:.1f} (n={p['gemm_size']}) | {p['conv'] / 1e9:.1f} | "
                     f"**{p['limit'] / 1e9:.1f}** ({p['limit_before'] / 1e9:.1f} / {p['limit_after'] / 1e9:.1f}) |")
    lines += ["", "| stage | batch | GFLOP/call | s/call (median, calls) | GFLOP/s | of peak | throughput |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['part']} | {r['batch']} | {r['flops_per_call'] / 1e9:.3f} | "
                     f"{r['seconds_per_call']:.4f} ({r['calls']}) | {r['gflops_per_s']:.1f} | "
                     f"{100 * r['fraction_of_peak']:.1f}% of {r['peak_dtype']} | "
                     f"{r['throughput']:.2f} {r['throughput_unit']} |")
    return "\n".join(lines)


def stage_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"stages must be among {', '.join(STAGES)}, got {text!r}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=stage_list, default=list(STAGES), help="comma-separated: " + ",".join(STAGES))
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per row (after warm-up and counting)")
    p.add_argument("--min-calls", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before counting")
    p.add_argument("--peak-seconds", type=float, default=0.25, help="seconds per shape of the peak measurement")
    p.add_argument("--batch", type=int, default=64, help="batch of reflow, distill and couplings")
    p.add_argument("--eval-batch", type=int, default=256, help="images per evaluator call")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32", help="reflow and distill steps")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="a setting of one stage's builder, passed only when given (repeatable)")
    p.add_argument("--model", default=str(EMBEDDED), help="pipeline folder of reflow, distill, couplings, onestep")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the process's own)")
    p.add_argument("--json", dest="out", default=str(ROOT / "benchmarks" / "results_roofline.json"),
                   help="where the result JSON goes")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    sets = parse_sets(args.sets)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine()
    before = measure_peak(device, args.peak_seconds)
    print("limit before: " + ", ".join(f"{k} {v['limit'] / 1e9:.1f} GFLOP/s" for k, v in before.items()), flush=True)
    rows = []
    for name in args.stages:
        batch = args.eval_batch if name == "evaluator" else args.batch
        stage = BUILDERS[name](args.model, batch, args.precision, device, sets.get(name, {}))
        for part in stage.parts:
            row = measure_part(part, stage, args.seconds, args.min_calls, args.warmup, device)
            rows.append(row)
            print(f"{row['part']}: {row['gflops_per_s']:.1f} GFLOP/s, {row['throughput']:.2f} "
                  f"{row['throughput_unit']}", flush=True)
        del stage
    info["load_average_after"] = list(os.getloadavg())
    peak = combine_peaks(before, measure_peak(device, args.peak_seconds))
    rows = [read_against(r, r["bf16"], peak) for r in rows]
    result = {"machine": info, "device": str(device), "precision": args.precision, "sets": sets, "peak": peak,
              "rows": rows, "argv": list(argv) if argv is not None else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out)  # a reader never sees half a file
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
