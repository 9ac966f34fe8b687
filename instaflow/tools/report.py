"""Assemble the committed record of a finished `make train-reflow` run: results/embedded.{md,json}.

    python -m instaflow.tools.report --run runs/embedded --out results/embedded

Adds to the evaluation (``<run>/results/results.json``) what is needed to reproduce and read it:
the command, the seeds (from each coupling folder's ``generation.json`` and each training run's
``hparams.yaml``), the machine, and per training stage the loss at its first and last logged
steps (equal steps for the three distillations: how hard each coupling is to fit) and its
FID/alignment curve (``quality/*``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

STAGES = ("reflow", "distill_instaflow", "distill_direct", "distill_direct_rfinit")


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the newest TensorBoard version under ``logdir``: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(logdir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        return {}
    ea = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, round(e.value, 4)) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def training_seeds(logdir: Path) -> dict | None:
    """The seeds a training run was configured with, read from its saved ``config.yaml`` (newest version)."""
    import yaml

    versions = sorted(logdir.glob("version_*/config.yaml"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        return None
    cfg = yaml.safe_load(versions[-1].read_text()) or {}
    args = lambda section: (cfg.get(section) or {}).get("init_args") or {}  # noqa: E731
    return {"seed_everything": cfg.get("seed_everything"), "model_seed": args("model").get("seed"),
            "data_seed": args("data").get("seed"), "config": str(versions[-1])}


def stage_summary(logdir: Path) -> dict:
    s = scalars(logdir)
    loss = s.get("train/loss", [])
    k = min(5, len(loss))
    mean = lambda xs: round(sum(v for _, v in xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"train_loss_first": mean(loss[:k]), "train_loss_last": mean(loss[-k:]),
            "last_step": loss[-1][0] if loss else None, "val_loss": s.get("val/loss", []),
            "quality": {t.split("/", 1)[1]: v for t, v in s.items() if t.startswith("quality/") and "seconds" not in t}}


def cpu_model() -> str:
    """The CPU's model name (scores differ between CPUs: every committed figure names its machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/embedded")
    p.add_argument("--out", default="results/embedded")
    p.add_argument("--command", default="make train-reflow")
    p.add_argument("--notes", default=None, help="markdown file appended to the .md (discussion)")
    a = p.parse_args(argv)
    run = Path(a.run)
    res = json.loads((run / "results" / "results.json").read_text())
    res["command"] = a.command
    res["machine"] = {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count()}
    res["couplings"] = {d.name: json.loads((d / "generation.json").read_text())
                        for d in sorted((run / "pairs").glob("*")) if (d / "generation.json").exists()}
    res["training"] = {name: stage_summary(run / name) for name in STAGES if (run / name).exists()}
    res["seeds"] = {
        "couplings": {k: v.get("base_seed") for k, v in res["couplings"].items()},
        "seed_rule": next(iter(res["couplings"].values()), {}).get("seed_rule"),
        "evaluation_noise": res["protocol"]["noise_seeds"],
        "training": {name: training_seeds(run / name) for name in STAGES if (run / name).exists()},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = [f"# InstaFlow on the embedded default: `{a.command}`", "",
          f"A small-budget demonstration of the three stages (sized for 20 minutes on 2 CPU cores; this run: "
          f"{res['total_wall_s'] / 60:.1f} min on {res['machine']['processor']}, {res['machine']['cpus']} cores): it shows the "
          "method working end to end and carries no claim verdicts. The paper's claims are tested, at equal "
          "solver and guidance, with paired intervals and three training seeds per distillation, by "
          "`make ablation` (results/ablation.md).", "",
          (run / "results" / "results.md").read_text().strip(), "",
          "## Training losses at equal steps", "",
          "| stage | steps | train loss (first 5 logs → last 5) | val loss (held-out couplings) | val FID / alignment curves (n = 256 val prompts; step: FID / alignment) |",
          "|---|---|---|---|---|"]
    for name, t in res["training"].items():
        curves = []
        for tag in sorted(k[4:] for k in t["quality"] if k.startswith("fid_")):
            q, al = t["quality"][f"fid_{tag}"], t["quality"].get(f"alignment_{tag}", [])
            curves.append(f"{tag}: " + ", ".join(f"{s}: {f:.0f} / {x:.2f}" for (s, f), (_, x) in zip(q, al)))
        curve = "; ".join(curves)
        vals = ", ".join(f"{v:.4f}" for _, v in t["val_loss"])
        md.append(f"| {name} | {t['last_step']} | {t['train_loss_first']} → {t['train_loss_last']} | {vals} | {curve} |")
    md += ["", "## Protocol and seeds", ""] + [f"- **{k}**: {v}" for k, v in res["protocol"].items()]
    md += ["- **couplings**: " + "; ".join(
        f"{k}: {v['model']} ({v['kind']}), {v['solver']} {v['steps']} steps, w = {v['guidance']}, base seed {v['base_seed']}"
        for k, v in res["couplings"].items())]
    md += [f"- **noise seeds**: {res['seeds']['seed_rule']}"]
    md += ["- **training seeds** (each run's saved config): " + "; ".join(
        f"{k}: seed_everything {v['seed_everything']}, model {v['model_seed']}, data {v['data_seed']}"
        for k, v in res["seeds"]["training"].items() if v)]
    md += [f"- **machine**: {res['machine']}"]
    if a.notes:
        md += ["", Path(a.notes).read_text().strip()]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return res


if __name__ == "__main__":
    main()
