"""Run stage commands on a cluster: one SLURM job (sbatch + srun), torchrun on each node, or locally.

    # print the job script for two stages on 2 nodes x 8 GPUs, submit nothing
    python -m instaflow.tools.launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --dry-run \\
        --stage pairs runs/embedded/pairs/teacher/.done ".venv/bin/python -m lightning_modules.cli predict -c ..." \\
        --stage reflow runs/embedded/models/rf2/model_index.json ".venv/bin/python -m lightning_modules.cli fit -c ..."
    # the same without SLURM: run this on every node (same --rdzv-endpoint, NODE_RANK set on each)
    python -m instaflow.tools.launch torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29500 --stage ...
    # or here, one after the other
    python -m instaflow.tools.launch local --stage ...

A stage is NAME GUARD COMMAND. The stage is skipped when GUARD exists ("-": never skipped); a GUARD
named ``*.done`` is a marker written after the command succeeds (the Makefile's ``&& touch $@``).
COMMAND may be wrapped (``python -m instaflow.tools.timed DIR NAME -- python -m lightning_modules.cli ...``):
the launcher finds the ``python -m lightning_modules.cli`` call inside it.

What the launcher adds, all of it visible in the printed script:
- A LightningCLI call runs on every task (``srun`` with one task per GPU, or ``torchrun``) and gets
  ``--trainer.num_nodes N --trainer.devices G`` appended after its config files, so the Trainer's world
  equals the allocation. Nothing else is scaled: learning rates and batch sizes stay as in the YAML
  (the global batch is batch_size x N x G). Lightning's ``SLURMEnvironment.validate_settings`` fails at
  start if they disagree with srun's ``--nodes``/``--ntasks-per-node``.
- Under SLURM every LightningCLI call also gets ``--trainer.default_root_dir runs/slurm/<job id>/<stage>``:
  Lightning saves its requeue checkpoint (``hpc_ckpt_<n>.ckpt``) there and, on SLURM, resumes any
  ``fit``/``predict`` from the newest one found there, so each stage needs its own folder.
- Any other command (data generation, evaluation) runs once: on the job's first node under SLURM,
  on node rank 0 under torchrun.

Requeue on preemption or time limit is Lightning's: under ``srun`` the Trainer detects
``SLURMEnvironment`` (auto_requeue=True, requeue_signal=SIGUSR1 by default). The script asks SLURM for
SIGUSR1 90 s before the end (``#SBATCH --signal=SIGUSR1@90``, sent to the job steps, not the ``B:``
batch-shell form) and allows ``--requeue``; on the signal Lightning saves the hpc checkpoint and calls
``scontrol requeue <job id>``. The requeued job reruns the script: finished stages are skipped by their
guards, the interrupted one resumes from its checkpoint (the newer of the hpc checkpoint and its own
``last.ckpt``; a job submitted again after a kill finds ``last.ckpt`` too: ``instaflow.resume.find``
ignores the job-keyed ``default_root_dir`` when it matches configs). ``--no-requeue`` drops both lines and passes
``SLURMEnvironment(auto_requeue=False)`` as a trainer plugin, so nothing owns the signal.
Under torchrun the Trainer detects ``TorchElasticEnvironment`` from the variables torchrun sets
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and does not start processes itself.

No shell text is built from a value: every argument of a stage command is quoted (``shlex.quote``),
so ``$(...)``, backticks or ``${...}`` in it reach the program literally. The one expansion the
script needs, the job-keyed run folder, is the script's own fixed line ``RUN_ROOT=<dir>/"$RUN_ID"``,
referenced as ``"$RUN_ROOT"/<stage>``. Stage and job names (they name folders and appear in the
script) must match ``[A-Za-z0-9_.-]+``; ``#SBATCH`` values (partition, time, log path) must be one
word without quotes, backslashes or control characters.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from instaflow.state import atomic_write_text

CLI_MODULE = "lightning_modules.cli"
NO_REQUEUE_PLUGIN = ('{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment", '
                     '"init_args": {"auto_requeue": false}}')
# Lightning's requeue checkpoint folder is keyed by the job (and array task), so a new submission starts afresh.
SLURM_RUN_ID = "${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"
NAME = re.compile(r"[A-Za-z0-9_.-]+")
# an #SBATCH value is read by sbatch, word by word; a newline would start a line that bash runs
SBATCH_VALUE = re.compile(r"[^\s'\"\\]+")


class ShellToken(str):
    """Shell text the launcher wrote itself from constants and checked names; emitted unquoted."""


def check_name(name: str, what: str = "stage name") -> str:
    """``name`` if it matches [A-Za-z0-9_.-]+ (it names a folder and appears in the script), else ValueError."""
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_', '.' and '-' only "
                         "(it names a folder and appears in the job script)")
    return name


def check_sbatch_value(value: str, what: str) -> str:
    """``value`` if it is safe as one ``#SBATCH`` word (no whitespace, quotes, backslashes), else ValueError."""
    if not SBATCH_VALUE.fullmatch(value):
        raise ValueError(f"{what} {value!r}: give one word without spaces, quotes, backslashes or control "
                         "characters (it is written into an #SBATCH line)")
    return value


def _comment(text: str) -> str:
    """``text`` for a ``#`` comment line: control characters (a newline would end the comment) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass
class Stage:
    """One command of a job; skipped when ``guard`` exists."""

    name: str
    command: list[str]
    guard: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name)

    @classmethod
    def parse(cls, name: str, guard: str, command: str) -> "Stage":
        return cls(name, shlex.split(command), None if guard == "-" else guard)

    @property
    def marker(self) -> bool:
        return self.guard is not None and self.guard.endswith(".done")

    def split(self) -> tuple[list[str], list[str]] | None:
        """(wrapper prefix, ``python -m lightning_modules.cli ...``) or None when the command is not a CLI call."""
        for i in range(len(self.command) - 2):
            if self.command[i + 1:i + 3] == ["-m", CLI_MODULE]:
                return self.command[:i], self.command[i:]
        return None


@dataclass
class World:
    """The allocation: nodes x devices per node, one process per device."""

    nodes: int = 1
    devices: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices < 1:
            raise ValueError(f"nodes and devices per node must be >= 1, got {self.nodes} x {self.devices}")

    def overrides(self) -> list[str]:
        return ["--trainer.num_nodes", str(self.nodes), "--trainer.devices", str(self.devices)]


def _join(args: list[str]) -> str:
    """One shell line: every argument quoted, except the launcher's own ``ShellToken``s."""
    return " ".join(a if isinstance(a, ShellToken) else shlex.quote(a) for a in args)


def _stage_root(stage: Stage) -> ShellToken:
    """``"$RUN_ROOT"/<stage>``: the job-keyed folder, from the script's fixed RUN_ROOT line and a checked name."""
    return ShellToken(f'"$RUN_ROOT"/{check_name(stage.name)}')


def _guarded(stage: Stage, line: str, indent: str = "") -> list[str]:
    if stage.marker:
        line += f" && touch {shlex.quote(stage.guard)}"
    if stage.guard is None:
        return [indent + line]
    return [f"{indent}if [ ! -e {shlex.quote(stage.guard)} ]; then", f"{indent}  {line}", f"{indent}fi"]


def srun_line(stage: Stage, world: World, requeue: bool = True) -> str:
    """The stage's command as the job script runs it (srun over every task for a CLI call)."""
    parts = stage.split()
    if parts is None:
        return _join(stage.command)  # once, on the first node (the batch step)
    prefix, call = parts
    # --kill-on-bad-exit: a task that stops before the process group exists (a refused resume, a bad config on
    # one rank) ends the step instead of leaving the other tasks waiting at the rendezvous until the time limit
    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={world.nodes}", f"--ntasks-per-node={world.devices}"]
    extra = world.overrides() + ["--trainer.default_root_dir", _stage_root(stage)]
    if not requeue:
        extra += ["--trainer.plugins", NO_REQUEUE_PLUGIN]
    return _join(prefix + srun + call + extra)


def sbatch_options(world: World, *, job_name: str, partition: str | None, time: str | None, output: str,
                   cpus_per_task: int | None, requeue: bool, signal_s: int, n_array: int | None,
                   extra_sbatch: list[str] | None) -> list[str]:
    """The ``#SBATCH`` options, each value checked to be one safe word."""
    sb = [f"--job-name={check_name(job_name, 'job name')}"]
    if partition:
        sb.append(f"--partition={check_sbatch_value(partition, 'partition')}")
    sb += [f"--nodes={world.nodes}", f"--ntasks-per-node={world.devices}", f"--gpus-per-node={world.devices}"]
    if cpus_per_task:
        sb.append(f"--cpus-per-task={int(cpus_per_task)}")
    if time:
        sb.append(f"--time={check_sbatch_value(time, 'time limit')}")
    # a requeued job appends to the same log
    sb += [f"--output={check_sbatch_value(output, 'log path')}", "--open-mode=append"]
    if n_array is not None:
        sb.append(f"--array=0-{n_array - 1}")
    if requeue:
        sb += [f"--signal=SIGUSR1@{int(signal_s)}", "--requeue"]
    return sb + [check_sbatch_value(x, "extra #SBATCH option") for x in extra_sbatch or []]


def _stage_lines(stages: list[Stage], world: World, requeue: bool) -> list[str]:
    """Each stage with its comment and guard, in order."""
    lines = []
    for i, st in enumerate(stages, 1):
        where = "every task" if st.split() else "once"
        skip = f", skipped when {_comment(st.guard)} exists" if st.guard else ""
        lines.append(f"# stage {i}/{len(stages)}: {st.name} ({where}{skip})")
        lines += _guarded(st, srun_line(st, world, requeue))
    return lines


def _array_lines(array: list[list[Stage]], world: World, requeue: bool) -> list[str]:
    """``case "$SLURM_ARRAY_TASK_ID"``: task i runs ``array[i]``."""
    lines = ['case "$SLURM_ARRAY_TASK_ID" in']
    for i, task in enumerate(array):
        lines.append(f"  {i})")
        for st in task:
            lines += _guarded(st, srun_line(st, world, requeue), indent="    ")
        lines.append("    ;;")
    return lines + ["esac"]


def slurm_script(stages: list[Stage], world: World, *, job_name: str = "instaflow", partition: str | None = None,
                 time: str | None = None, output: str = "runs/slurm/%x-%j.out", cpus_per_task: int | None = None,
                 requeue: bool = True, signal_s: int = 90, workdir: str | None = None, run_dir: str = "runs/slurm",
                 array: list[list[Stage]] | None = None, extra_sbatch: list[str] | None = None) -> str:
    """A bash job script for sbatch that runs ``stages`` in order (or, with ``array``, task i runs ``array[i]``)."""
    if array is not None and stages:
        raise ValueError("give either stages or array, not both")
    sb = sbatch_options(world, job_name=job_name, partition=partition, time=time, output=output,
                        cpus_per_task=cpus_per_task, requeue=requeue, signal_s=signal_s,
                        n_array=None if array is None else len(array), extra_sbatch=extra_sbatch)
    names = [s.name for s in stages] if array is None else [f"{len(array)} array tasks"]
    lines = ["#!/bin/bash", f"# Generated by instaflow/tools/launch.py: {world.nodes} node(s) x {world.devices} GPU(s), "
             f"{', '.join(names)}."]
    if requeue:
        lines.append(f"# SIGUSR1 {signal_s} s before the end: Lightning's SLURMEnvironment (auto_requeue=True) saves "
                     "an hpc checkpoint and runs scontrol requeue.")
    lines += [f"#SBATCH {s}" for s in sb]
    # the only expansion: the job-keyed run folder, from these fixed lines (stages reference "$RUN_ROOT")
    lines += ["set -euo pipefail", f"cd {shlex.quote(workdir or os.getcwd())}",
              f'RUN_ID="{SLURM_RUN_ID}"', 'RUN_ID="${RUN_ID:-$SLURM_JOB_ID}"',
              f'RUN_ROOT={shlex.quote(run_dir)}/"$RUN_ID"', ""]
    lines += _stage_lines(stages, world, requeue) if array is None else _array_lines(array, world, requeue)
    return "\n".join(lines) + "\n"


def submit(script: str, script_path: str | Path, sbatch: str = "sbatch") -> str:
    """Write the script, submit it with sbatch, return the job id."""
    path = Path(script_path)
    atomic_write_text(path, script)
    try:
        out = subprocess.run([sbatch, str(path)], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SystemExit(f"{sbatch!r} not found: run on a SLURM login node, or leave NODES/PARTITION unset "
                         "to run locally (DRY_RUN=1 prints the script)") from None
    m = re.search(r"(\d+)", out)
    if m is None:
        raise RuntimeError(f"could not read a job id from sbatch's output: {out!r}")
    return m.group(1)


def torchrun_line(stage: Stage, world: World, rdzv_endpoint: str, rdzv_id: str = "instaflow") -> str | None:
    """``torchrun ... -m lightning_modules.cli ...`` for a CLI stage, None for a run-once stage."""
    parts = stage.split()
    if parts is None:
        return None
    prefix, call = parts
    torchrun = str(Path(call[0]).parent / "torchrun") if os.sep in call[0] else "torchrun"
    run = [torchrun, f"--nnodes={world.nodes}", f"--nproc-per-node={world.devices}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={check_name(rdzv_id, 'rendezvous id')}-{stage.name}"]
    return _join(prefix + run + call[1:] + world.overrides())


def torchrun_script(stages: list[Stage], world: World, rdzv_endpoint: str, node_rank: int) -> str:
    """Shell lines for this node: CLI stages through torchrun, run-once stages on node rank 0 only."""
    lines = []
    for st in stages:
        line = torchrun_line(st, world, rdzv_endpoint)
        if line is None:
            if node_rank != 0:
                lines.append(f"# {st.name}: runs on node rank 0")
                continue
            line = _join(st.command)
        lines += _guarded(st, line)
    return "\n".join(lines) + "\n"


def run_local(stages: list[Stage]) -> int:
    """Run the stages here in order, as the Makefile does; stops at the first failure."""
    for st in stages:
        if st.guard and Path(st.guard).exists():
            print(f"[launch] {st.name}: skipped ({st.guard} exists)", flush=True)
            continue
        rc = subprocess.call(st.command)
        if rc != 0:
            return rc
        if st.marker:
            Path(st.guard).touch()
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("slurm", "torchrun", "local"))
    p.add_argument("--stage", nargs=3, action="append", default=[], metavar=("NAME", "GUARD", "COMMAND"),
                   help="a stage; GUARD '-' never skips, *.done is a marker written on success")
    p.add_argument("--nodes", "--nnodes", type=int, default=1)
    p.add_argument("--gpus-per-node", "--nproc-per-node", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="print the script or commands, run or submit nothing")
    g = p.add_argument_group("slurm")
    g.add_argument("--partition")
    g.add_argument("--time", help="wall-time limit, e.g. 24:00:00")
    g.add_argument("--job-name", default="instaflow")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--dir", default="runs/slurm", help="job scripts, logs and requeue checkpoints")
    g.add_argument("--output", help="log path (default DIR/%%x-%%j.out)")
    g.add_argument("--no-requeue", action="store_true", help="no SIGUSR1/requeue; Lightning's auto-requeue off")
    g.add_argument("--sbatch", default="sbatch", help="the sbatch command")
    t = p.add_argument_group("torchrun")
    t.add_argument("--rdzv-endpoint", default="localhost:29500", help="HOST:PORT of the rendezvous (node rank 0)")
    t.add_argument("--node-rank", type=int, default=int(os.environ.get("NODE_RANK", 0)),
                   help="this node's rank (run-once stages run on rank 0); default $NODE_RANK or 0")
    return p


def _slurm(a: argparse.Namespace, stages: list[Stage], world: World) -> str | None:
    """Print (--dry-run) or submit the job script; returns the job id."""
    script = slurm_script(stages, world, job_name=a.job_name, partition=a.partition, time=a.time,
                          output=a.output or f"{a.dir}/%x-%j.out", cpus_per_task=a.cpus_per_task,
                          requeue=not a.no_requeue, run_dir=a.dir)
    if a.dry_run:
        print(script, end="")
        return None
    Path(a.dir).mkdir(parents=True, exist_ok=True)  # sbatch needs the log folder to exist
    job = submit(script, Path(a.dir) / f"{a.job_name}.sbatch", a.sbatch)
    print(f"submitted {a.job_name} as SLURM job {job} ({world.nodes} x {world.devices}); "
          f"script {a.dir}/{a.job_name}.sbatch, log {a.output or a.dir + '/%x-%j.out'}")
    return job


def _launch(a: argparse.Namespace) -> str | int | None:
    """Run, print or submit the parsed command line's stages."""
    stages = [Stage.parse(*s) for s in a.stage]
    if not stages:
        raise SystemExit("no stages: give at least one --stage NAME GUARD COMMAND")
    world = World(a.nodes, a.gpus_per_node)
    if a.mode == "local":
        if a.dry_run:
            print("\n".join(_join(s.command) for s in stages))
            return None
        return run_local(stages)
    if a.mode == "torchrun":
        script = torchrun_script(stages, world, a.rdzv_endpoint, a.node_rank)
        if a.dry_run:
            print(script, end="")
            return None
        return subprocess.call(["bash", "-euo", "pipefail", "-c", script])
    return _slurm(a, stages, world)


def main(argv: list[str] | None = None) -> str | int | None:
    a = _parser().parse_args(argv)
    try:
        return _launch(a)
    except ValueError as e:  # a refused name or #SBATCH value: say which, no traceback
        raise SystemExit(f"launch: {e}") from None


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
