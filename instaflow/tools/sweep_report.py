"""What a sweep's study looks like: a ranked table and Optuna's plots (make sweep-report SWEEP=...).

Writes into SAVE_DIR/NAME: ``summary.md`` and ``summary.json`` (every trial ranked by the metric: its number,
values, objective, state, steps reached, run folder) and, with ``plots``, ``history.png`` (objective per trial,
best so far), ``importances.png`` (fANOVA parameter importances; needs 2 finished trials with different values,
otherwise the table says why there is none) and ``intermediate.png`` (the reported curves, pruned ones
included), drawn by ``optuna.visualization.matplotlib`` on the Agg backend.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from instaflow.state import atomic_write_json, atomic_write_text

PLOTS = ("history", "importances", "intermediate")


def ranked(sweep, study) -> list[dict]:
    """Every trial, best first: finished ones (COMPLETE, then PRUNED) by value, then the rest by number."""
    from optuna.trial import TrialState

    sign = 1.0 if sweep.mode == "min" else -1.0
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}

    def key(t):
        known = t.value is not None and t.state in order
        return (not known, order.get(t.state, 2), sign * t.value if known else 0.0, t.number)

    rows = []
    for i, t in enumerate(sorted(study.get_trials(deepcopy=False), key=key)):
        ranked_row = t.state in order and t.value is not None
        rows.append({"rank": i + 1 if ranked_row else None, "trial": t.number, "params": dict(t.params),
                     "value": t.value, "state": t.state.name, "steps": t.last_step,
                     "version": t.user_attrs.get("version"), "reason": t.user_attrs.get("reason")})
    return rows


def _plots(sweep, study, out: Path) -> dict[str, str]:
    """The PNGs written, by name; a plot that cannot be drawn is named with why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    written = {}
    for name in PLOTS:
        path = out / f"{name}.png"
        if name == "importances" and (len(done) < 2 or len({repr(t.params) for t in done}) < 2):
            written[name] = "not drawn: importances need 2 finished trials with different values"
            path.unlink(missing_ok=True)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                fn = {"history": ovm.plot_optimization_history, "importances": ovm.plot_param_importances,
                      "intermediate": ovm.plot_intermediate_values}[name]
                ax = fn(study, target_name=sweep.metric) if name != "intermediate" else fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            tmp = path.with_suffix(".tmp.png")
            fig.savefig(tmp, dpi=100)
            tmp.replace(path)  # atomic: a reader never sees half a PNG
            plt.close(fig)
            written[name] = str(path)
        except (ValueError, RuntimeError) as e:  # e.g. no trial has intermediate values yet
            written[name] = f"not drawn: {e}"
            path.unlink(missing_ok=True)
    return written


def report(sweep, url: str, plots: bool = True) -> dict:
    """Rank the study's trials, write summary.{md,json} (and the plots); the summary."""
    from instaflow.tools.sweep import open_study

    study = open_study(sweep, url, create=False)
    rows = ranked(sweep, study)
    out = sweep.root
    out.mkdir(parents=True, exist_ok=True)
    drawn = _plots(sweep, study, out) if plots else {}
    keys = list(sweep.grid if sweep.grid is not None else sweep.space)
    counts = {s: sum(r["state"] == s for r in rows) for s in sorted({r["state"] for r in rows})}
    md = [f"# Sweep {sweep.name}: {sweep.metric} ({sweep.mode}), study {sweep.study_name}, "
          f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})", "",
          "| rank | trial | " + " | ".join(keys) + f" | {sweep.metric} | state | steps | run |",
          "|---" * (len(keys) + 6) + "|"]
    for r in rows:
        val = "n/a" if r["value"] is None else f"{r['value']:.6g}"
        state = r["state"] + (f" ({r['reason']})" if r["reason"] and r["state"] == "FAIL" else "")
        md.append(f"| {r['rank'] or '-'} | {r['trial']} | " + " | ".join(str(r["params"].get(k, "-")) for k in keys)
                  + f" | {val} | {state} | {r['steps'] if r['steps'] is not None else '-'} | {r['version'] or '-'} |")
    if drawn:
        md += [""] + [f"![{n}]({Path(p).name})" if p.endswith(".png") else f"- {n}: {p}" for n, p in drawn.items()]
    summary = {"sweep": sweep.name, "study": sweep.study_name, "metric": sweep.metric, "mode": sweep.mode,
               "configs": sweep.configs, "trials": rows, "plots": drawn,
               "failed": [r["trial"] for r in rows if r["state"] == "FAIL"
                          and not any(o["state"] in ("COMPLETE", "PRUNED") and o["params"] == r["params"]
                                      for o in rows)]}
    text = "\n".join(md) + "\n"
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", text)
    summary["markdown"] = text
    print(text, end="")
    print(f"[sweep] summary: {out / 'summary.md'}, {out / 'summary.json'}"
          + (f"; plots: {', '.join(p for p in drawn.values() if p.endswith('.png'))}" if drawn else ""))
    print(f"[sweep] live view of the study: pip install optuna-dashboard && optuna-dashboard {_shown(url)}")
    return summary


def _shown(url: str) -> str:
    """The storage URL to print: a password replaced by ***."""
    import re

    if url.startswith("journal://"):
        return url[len("journal://"):]  # optuna-dashboard opens a journal file by its path
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)
