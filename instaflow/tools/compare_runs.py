"""Do two `make train-reflow` runs agree exactly? Scores, coupling shards and exported UNet weights.

    python -m instaflow.tools.compare_runs /tmp/before/runs/embedded /tmp/after/runs/embedded

For checking that a change altered no behaviour: run the chain from fresh clones of both commits
on one machine (it repeats exactly there, not across machines) and compare. Timings (latency,
wall times) are left out: they move with the machine's load. Exit status 0 when everything
compared is identical, 1 otherwise.

Where a change reorders floating-point operations on purpose (a stage whose arithmetic changed), its
rows cannot be identical; for each differing row it says whether run B's FID lies inside run A's
bootstrap interval (``fid_low``..``fid_high``) and its alignment within A's 1.96 standard errors
("within A's interval" / "OUTSIDE A's interval"). That reading is printed; the exit status still
says only whether the runs are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

TIMING_KEYS = ("latency", "eval_wall_s")
COUPLINGS = ("pairs/teacher", "pairs/rf2")
MODELS = ("rf2", "instaflow", "direct", "direct_rfinit")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def score_differences(a: dict, b: dict) -> dict[str, dict]:
    """Row -> {key: (a, b)} for every non-timing value of ``results.json`` that differs (missing rows too)."""
    out = {}
    for name in sorted(set(a["rows"]) | set(b["rows"])):
        ra, rb = a["rows"].get(name), b["rows"].get(name)
        if ra is None or rb is None:
            out[name] = {"row": (ra is not None, rb is not None)}
            continue
        diff = {k: (ra.get(k), rb.get(k)) for k in sorted(set(ra) | set(rb))
                if not k.startswith(TIMING_KEYS) and ra.get(k) != rb.get(k)}
        if diff:
            out[name] = diff
    return out


def within_interval(ra: dict, rb: dict) -> dict[str, bool]:
    """Per score that has an interval in run A's row: whether run B's value lies inside it (FID: A's bootstrap
    interval; alignment: A's value +- 1.96 of its standard error)."""
    out = {}
    if all(isinstance(ra.get(k), (int, float)) for k in ("fid_low", "fid_high")) and rb.get("fid") is not None:
        out["fid"] = ra["fid_low"] <= rb["fid"] <= ra["fid_high"]
    if isinstance(ra.get("alignment_stderr"), (int, float)) and rb.get("alignment") is not None:
        out["alignment"] = abs(rb["alignment"] - ra["alignment"]) <= 1.96 * ra["alignment_stderr"]
    return out


def files_identical(a: Path, b: Path, pattern: str) -> bool | None:
    """Whether the ``pattern`` files of two folders have the same names and bytes (None: neither has any)."""
    fa, fb = sorted(a.glob(pattern)), sorted(b.glob(pattern))
    if not fa and not fb:
        return None
    return [p.name for p in fa] == [p.name for p in fb] and all(_sha256(x) == _sha256(y) for x, y in zip(fa, fb))


def compare(run_a: str | Path, run_b: str | Path) -> dict:
    a, b = Path(run_a), Path(run_b)
    res_a, res_b = (json.loads((r / "results" / "results.json").read_text()) for r in (a, b))
    scores = score_differences(res_a, res_b)
    report = {"scores": scores,
              "within_interval": {name: within_interval(res_a["rows"][name], res_b["rows"][name])
                                  for name in scores if name in res_a["rows"] and name in res_b["rows"]},
              "couplings": {c: files_identical(a / c, b / c, "*.tar") for c in COUPLINGS},
              "unet_weights": {m: files_identical(a / "models" / m / "unet", b / "models" / m / "unet", "*.safetensors")
                               for m in MODELS},
              "total_wall_s": (res_a.get("total_wall_s"), res_b.get("total_wall_s"))}
    report["identical"] = not report["scores"] and all(
        v is not False for v in [*report["couplings"].values(), *report["unet_weights"].values()])
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", help="a run folder (runs/embedded) with results/, pairs/ and models/")
    p.add_argument("run_b")
    a = p.parse_args(argv)
    report = compare(a.run_a, a.run_b)
    for name, diff in report["scores"].items():
        print(f"scores differ: {name}: {diff}")
        for key, inside in report["within_interval"].get(name, {}).items():
            print(f"  {name} {key}: {'within' if inside else 'OUTSIDE'} A's interval")
    for kind in ("couplings", "unet_weights"):
        for name, same in report[kind].items():
            print(f"{kind} {name}: {'identical' if same else 'absent in both' if same is None else 'DIFFER'}")
    print(f"total stage time (s): {report['total_wall_s'][0]} vs {report['total_wall_s'][1]} (not compared)")
    print("IDENTICAL" if report["identical"] else "DIFFERENT")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
