"""A/B of two revisions on one machine: the roofline of each, run alternately (A B A B ...), side by side.

    python -m benchmarks.ab --base main~3 -- --stages reflow,couplings --seconds 5
    python -m benchmarks.ab --base v1 --head v2 --rounds 5 --b-set reflow.activation_checkpointing=true

A is ``--base`` (a git worktree of it in a temporary folder); B is ``--head`` (another worktree) or, by default,
this working tree as it is (uncommitted changes included). Both run THIS tree's ``benchmarks/roofline.py`` (copied
into A's tree as ``benchmarks/roofline_ab.py``), from their own tree's folder, so ``lightning_modules``,
``instaflow`` and the assets resolve there and the measurement code is the same. Arguments after ``--`` go to
both; ``--a-set`` / ``--b-set`` become ``--set`` of one side only.

Alternating rounds spread a drifting load (other jobs) over both sides; the ratio B/A of seconds per call is
taken per round (neighbouring runs), then its median. The compile cache matters where a setting compiles
(torch.compile): each tree gets its own TORCHINDUCTOR_CACHE_DIR, reused between rounds (warm) unless
``--cold-cache`` empties it before every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOFLINE = ROOT / "benchmarks" / "roofline.py"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="git ref of A (a worktree of it is made)")
    p.add_argument("--head", default=None, help="git ref of B (default: this working tree as it is)")
    p.add_argument("--rounds", type=int, default=3, help="A B pairs, run alternately")
    p.add_argument("--a-set", action="append", default=[], metavar="STAGE.KEY=VALUE", help="--set for A only")
    p.add_argument("--b-set", action="append", default=[], metavar="STAGE.KEY=VALUE", help="--set for B only")
    p.add_argument("--cold-cache", action="store_true", help="empty each tree's TORCHINDUCTOR_CACHE_DIR before a run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results_ab.json"))
    p.add_argument("roofline_args", nargs="*", help="after --: arguments of benchmarks.roofline for both sides")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if "--json" in args.roofline_args:
        raise SystemExit("--json is set by ab.py per run; leave it out of the roofline arguments")
    return args


def side_args(common: list[str], sets: list[str], json_path: Path) -> list[str]:
    """The roofline arguments of one side: the common ones, its own ``--set`` options, its JSON path."""
    out = list(common)
    for s in sets:
        out += ["--set", s]
    return out + ["--json", str(json_path)]


def row_key(row: dict) -> str:
    return row["part"]


def aggregate(rounds: list[dict]) -> dict:
    """Per row (stage part): the seconds per call of A and B in each round, the ratio B/A per round and the
    medians. ``rounds``: [{"A": roofline result, "B": roofline result}, ...]. Ratio < 1: B is faster."""
    out: dict[str, dict] = {}
    for r in rounds:
        a_rows = {row_key(x): x for x in r["A"]["rows"]}
        b_rows = {row_key(x): x for x in r["B"]["rows"]}
        for key in [k for k in a_rows if k in b_rows]:
            e = out.setdefault(key, {"stage": a_rows[key]["stage"], "a_seconds": [], "b_seconds": [], "ratios": [],
                                     "a_fraction": [], "b_fraction": []})
            a, b = a_rows[key]["seconds_per_call"], b_rows[key]["seconds_per_call"]
            e["a_seconds"].append(a)
            e["b_seconds"].append(b)
            e["ratios"].append(b / a)
            e["a_fraction"].append(a_rows[key]["fraction_of_peak"])
            e["b_fraction"].append(b_rows[key]["fraction_of_peak"])
    for e in out.values():
        e["a_median"] = statistics.median(e["a_seconds"])
        e["b_median"] = statistics.median(e["b_seconds"])
        e["ratio_median"] = statistics.median(e["ratios"])
    return out


def to_markdown(agg: dict) -> str:
    lines = ["| row | A s/call (median) | B s/call (median) | B/A per round | B/A median |", "|---|---|---|---|---|"]
    for key, e in agg.items():
        lines.append(f"| {key} | {e['a_median']:.4f} | {e['b_median']:.4f} | "
                     f"{', '.join(f'{x:.3f}' for x in e['ratios'])} | **{e['ratio_median']:.3f}** |")
    return "\n".join(lines)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_tree(ref: str, folder: Path) -> Path:
    """A detached worktree of ``ref`` with this tree's roofline.py in it as benchmarks/roofline_ab.py."""
    git("worktree", "add", "--detach", str(folder), ref)
    (folder / "benchmarks").mkdir(exist_ok=True)
    shutil.copyfile(ROOFLINE, folder / "benchmarks" / "roofline_ab.py")
    return folder


def run_side(tree: Path, module: str, args: list[str], cache: Path, cold: bool) -> dict:
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-m", module, *args], cwd=tree, env=env, check=True)
    return json.loads(Path(args[args.index("--json") + 1]).read_text())


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="instaflow-ab-") as tmp:
        tmp = Path(tmp)
        trees = {"A": (make_tree(args.base, tmp / "A"), "benchmarks.roofline_ab")}
        trees["B"] = (make_tree(args.head, tmp / "B"), "benchmarks.roofline_ab") if args.head else \
            (ROOT, "benchmarks.roofline")
        sets = {"A": args.a_set, "B": args.b_set}
        revisions = {"A": git("rev-parse", "HEAD", cwd=trees["A"][0]),
                     "B": git("rev-parse", "HEAD", cwd=trees["B"][0]) + ("" if args.head else " + working tree")}
        rounds = []
        try:
            for i in range(args.rounds):
                result = {}
                for side in ("A", "B"):
                    tree, module = trees[side]
                    print(f"round {i + 1}/{args.rounds}: {side} ({revisions[side]})", flush=True)
                    result[side] = run_side(tree, module, side_args(args.roofline_args, sets[side],
                                                                    tmp / f"{side}{i}.json"),
                                            tmp / f"inductor-{side}", args.cold_cache)
                rounds.append(result)
        finally:
            for side in ("A", "B"):
                if trees[side][0] != ROOT:
                    git("worktree", "remove", "--force", str(trees[side][0]))
    agg = aggregate(rounds)
    out = {"revisions": revisions, "sets": sets, "roofline_args": args.roofline_args,
           "compile_cache": "cold (emptied before each run)" if args.cold_cache else "warm (reused per tree)",
           "aggregate": agg, "rounds": rounds}
    path = Path(args.out)
    tmp_path = path.with_suffix(path.suffix + ".tmp")
    tmp_path.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp_path, path)
    print(f"A = {revisions['A']}, B = {revisions['B']}; compile cache: {out['compile_cache']}")
    print(to_markdown(agg))
    return out


if __name__ == "__main__":
    main()
