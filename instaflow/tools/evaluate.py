"""Evaluate teacher, 2-RF and one-step students on one protocol and write the results table.

    python -m instaflow.tools.evaluate --out runs/embedded/results   # after make train-reflow's stages

What each column means: ``instaflow.evaluation.results`` (rows, path metrics, latency, targets)
and ``instaflow.evaluation.protocol`` (prompts, reference, scoring).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from instaflow.evaluation.protocol import eval_protocol, score_images
from instaflow.evaluation.results import DEFAULT_ROWS, Row, latency, nfe, sample_row, targets, targets_markdown, to_markdown
from instaflow.evaluation.shapes_evaluator import load_evaluator
from instaflow.models.loading import component_sources
from instaflow.models.families import load_family
from instaflow.tools.timed import read_timings


def main(argv: list[str] | None = None) -> dict:
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
    p.add_argument("--timings", default=None, help="folder of instaflow.tools.timed records (stage wall times)")
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
        model = load_family(row.model)
        model.bf16 = a.bf16
        # rows sharing a text encoder share its cached states of the n prompts (encoding is not
        # what is compared); latency below switches the cache off, so it still pays for encoding
        te_key = json.dumps(component_sources(row.model), sort_keys=True, default=str)
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
