"""The ablation's three figures (PNG, matplotlib's Agg backend: no display needed).

(a) straightness and val FID against reflow steps; (b) one-step val FID and alignment against
distillation steps, a band over training seeds; (c) test FID against NFE and against latency, the
paper's speed/quality figure made on the embedded world.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, axes, out: str | Path, machine: str | None, grid_which: str = "major") -> Path:
    """Grid and legend on each panel, the machine named under the figure, saved as PNG."""
    for ax in axes:
        ax.grid(alpha=0.3, which=grid_which)
        ax.legend(fontsize=7)
    if machine:
        fig.text(0.5, 0.005, f"machine: {machine}", ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03 if machine else 0, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def read_curve(log_dir: str | Path) -> list[dict]:
    """``[{step, metrics}]`` of a run's quality curve (``callbacks.quality.Quality``'s quality.jsonl), the latest
    version folder that has one; [] when none."""
    runs = sorted(Path(log_dir).glob("version_*/quality.jsonl"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not runs:
        return []
    return [json.loads(line) for line in runs[-1].read_text().splitlines() if line.strip()]


def series(curve: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric along a curve (points where it was not logged left out)."""
    pts = [(c["step"], c["metrics"][metric]) for c in curve if metric in c["metrics"]]
    return [p[0] for p in pts], [p[1] for p in pts]


def reflow_figure(curves: dict[str, list[dict]], out: str | Path, machine: str | None = None) -> Path:
    """(a): straightness (Euler 25, w = 1.5) and val FID (1 step, 8 steps) against training steps."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (name, curve), style in zip(curves.items(), ("-", "--", ":")):
        ax1.plot(*series(curve, "quality/straightness_euler25_w1.5"), style, marker="o", label=name)
        ax2.plot(*series(curve, "quality/fid_euler1_w1"), style, marker="o", color="C0", label=f"{name}, 1 step")
        ax2.plot(*series(curve, "quality/fid_euler8_w1.5"), style, marker="s", color="C1", label=f"{name}, 8 steps (w = 1.5)")
    ax1.set(xlabel="reflow steps", ylabel="straightness S (Euler 25, w = 1.5)", title="straightness (val prompts)")
    ax2.set(xlabel="reflow steps", ylabel="FID (val, n = 256)", title="val FID")
    return _finish(plt, fig, (ax1, ax2), out, machine)


def distill_figure(curves: dict[str, list[list[dict]]], out: str | Path, machine: str | None = None) -> Path:
    """(b): one-step val FID and alignment against distillation steps; line = mean over seeds, band = min..max."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (group, runs) in enumerate(curves.items()):
        for ax, metric in ((ax1, "quality/fid_euler1_w1"), (ax2, "quality/alignment_euler1_w1")):
            per_seed = [dict(zip(*series(c, metric))) for c in runs if c]
            steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
            if not steps:
                continue
            v = np.array([[s[k] for k in steps] for s in per_seed])  # (seeds, points)
            ax.plot(steps, v.mean(0), marker="o", color=f"C{i}", label=f"{group} ({len(per_seed)} seeds)")
            ax.fill_between(steps, v.min(0), v.max(0), color=f"C{i}", alpha=0.2)
    ax1.set(xlabel="distillation steps", ylabel="one-step FID (val, n = 256)", title="one-step val FID")
    ax2.set(xlabel="distillation steps", ylabel="one-step alignment (val)", title="one-step val alignment")
    return _finish(plt, fig, (ax1, ax2), out, machine)


def speed_figure(rows: list[dict], out: str | Path, n: int = 1000, machine: str | None = None) -> Path:
    """(c): test FID against NFE and against latency per image, one line per ``curve``; rows of one
    curve at the same NFE (training seeds) are averaged."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    by_curve: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        if r.get("curve"):
            by_curve.setdefault(r["curve"], {}).setdefault(r["nfe"], []).append(r)
    for i, (curve, pts) in enumerate(by_curve.items()):
        nfes = sorted(pts)
        fid = [np.mean([r["fid"] for r in pts[k]]) for k in nfes]
        lat = [np.mean([r["latency_s"] for r in pts[k]]) * 1e3 if all(r.get("latency_s") for r in pts[k]) else np.nan
               for k in nfes]
        marker = "*" if len(nfes) == 1 else "o"
        ax1.plot(nfes, fid, marker=marker, markersize=12 if marker == "*" else 5, color=f"C{i}", label=curve)
        ax2.plot(lat, fid, marker=marker, markersize=12 if marker == "*" else 5, color=f"C{i}", label=curve)
    ax1.set(xscale="log", xlabel="NFE (UNet evaluations per image)", ylabel=f"FID (test, n = {n})", title="FID vs NFE")
    ax2.set(xscale="log", xlabel="latency per image, batch 1 (ms, this machine)", ylabel=f"FID (test, n = {n})",
            title="FID vs latency")
    return _finish(plt, fig, (ax1, ax2), out, machine, grid_which="both")
