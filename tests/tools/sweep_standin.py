"""A stand-in for a trial's training run (``entry:`` of the test sweeps): no model, no Lightning, in a second.

    python -m tests.tools.sweep_standin fit --x 0.3 --steps 4 --sleep 0.1 --log calls.jsonl

It reads its values from ``--key value`` arguments as a worker passes them, appends one line per start to
``--log`` (trial id, values, pid: the tests count starts), then "validates" after each of ``--steps`` steps:
the curve ``(x - 0.3)^2 + 1/step`` reported through the same ``TrialReporter`` as ``callbacks.optuna_trial``,
stopping when told (pruned). ``--fail_at k`` exits with status 3 at step k (with ``--fail_x v``: only the trial whose x is v). Not a test module.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    from callbacks.optuna_study import ENV_TRIAL, TrialReporter

    args = dict(zip(argv[1::2], argv[2::2]))
    opts = {k.lstrip("-"): v for k, v in args.items()}
    x = float(opts.get("x", 0.0))
    steps, sleep = int(opts.get("steps", 4)), float(opts.get("sleep", 0))
    with open(opts["log"], "a") as f:  # one short line per start: appends do not interleave
        f.write(json.dumps({"trial_id": int(os.environ[ENV_TRIAL]), "x": x, "pid": os.getpid()}) + "\n")
    reporter = TrialReporter.from_env()
    for step in range(1, steps + 1):
        time.sleep(sleep)
        if int(opts.get("fail_at", 0)) == step and float(opts.get("fail_x", x)) == x:
            return 3
        if reporter.report((x - 0.3) ** 2 + 1.0 / step, step):
            print(f"pruned at step {step}", flush=True)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
