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
``last.ckpt``; a job submitted again after a kill finds ``last.ckpt`` too: ``lightning_modules.resume``
ignores the job-keyed ``default_root_dir`` when it matches configs). ``--no-requeue`` drops both lines and passes
``SLURMEnvironment(auto_requeue=False)`` as a trainer plugin, so nothing owns the signal.
Under torchrun the Trainer detects ``TorchElasticEnvironment`` from the variables torchrun sets
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and does not start processes itself.
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

CLI_MODULE = "lightning_modules.cli"
NO_REQUEUE_PLUGIN = ('{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment", '
                     '"init_args": {"auto_requeue": false}}')
# Lightning's requeue checkpoint folder is keyed by the job (and array task), so a new submission starts afresh.
SLURM_RUN_ID = "${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"


@dataclass
class Stage:
    """One command of a job; skipped when ``guard`` exists."""

    name: str
    command: list[str]
    guard: str | None = None

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
    # keep shell variables such as ${SLURM_JOB_ID} expandable in the script
    var = r"[\w./:=+@%,-]*\$\{[^}]+\}[\w./:=+@%,${}-]*"
    return " ".join(a if re.fullmatch(var, a) else shlex.quote(a) for a in args)


def _guarded(stage: Stage, line: str, indent: str = "") -> list[str]:
    if stage.marker:
        line += f" && touch {shlex.quote(stage.guard)}"
    if stage.guard is None:
        return [indent + line]
    return [f"{indent}if [ ! -e {shlex.quote(stage.guard)} ]; then", f"{indent}  {line}", f"{indent}fi"]


def srun_line(stage: Stage, world: World, run_root: str, requeue: bool = True) -> str:
    """The stage's command as the job script runs it (srun over every task for a CLI call)."""
    parts = stage.split()
    if parts is None:
        return _join(stage.command)  # once, on the first node (the batch step)
    prefix, call = parts
    srun = ["srun", f"--nodes={world.nodes}", f"--ntasks-per-node={world.devices}"]
    extra = world.overrides() + ["--trainer.default_root_dir", f"{run_root}/{stage.name}"]
    if not requeue:
        extra += ["--trainer.plugins", NO_REQUEUE_PLUGIN]
    return _join(prefix + srun + call + extra)


def slurm_script(stages: list[Stage], world: World, *, job_name: str = "instaflow", partition: str | None = None,
                 time: str | None = None, output: str = "runs/slurm/%x-%j.out", cpus_per_task: int | None = None,
                 requeue: bool = True, signal_s: int = 90, workdir: str | None = None, run_dir: str = "runs/slurm",
                 array: list[list[Stage]] | None = None, extra_sbatch: list[str] | None = None) -> str:
    """A bash job script for sbatch that runs ``stages`` in order (or, with ``array``, task i runs ``array[i]``)."""
    if array is not None and stages:
        raise ValueError("give either stages or array, not both")
    sb = [f"--job-name={job_name}"]
    if partition:
        sb.append(f"--partition={partition}")
    sb += [f"--nodes={world.nodes}", f"--ntasks-per-node={world.devices}", f"--gpus-per-node={world.devices}"]
    if cpus_per_task:
        sb.append(f"--cpus-per-task={cpus_per_task}")
    if time:
        sb.append(f"--time={time}")
    sb += [f"--output={output}", "--open-mode=append"]  # a requeued job appends to the same log
    if array is not None:
        sb.append(f"--array=0-{len(array) - 1}")
    if requeue:
        sb += [f"--signal=SIGUSR1@{signal_s}", "--requeue"]
    sb += list(extra_sbatch or [])
    names = [s.name for s in stages] if array is None else [f"{len(array)} array tasks"]
    lines = ["#!/bin/bash", f"# Generated by instaflow/tools/launch.py: {world.nodes} node(s) x {world.devices} GPU(s), "
             f"{', '.join(names)}."]
    if requeue:
        lines.append(f"# SIGUSR1 {signal_s} s before the end: Lightning's SLURMEnvironment (auto_requeue=True) saves "
                     "an hpc checkpoint and runs scontrol requeue.")
    lines += [f"#SBATCH {s}" for s in sb]
    lines += ["set -euo pipefail", f"cd {shlex.quote(workdir or os.getcwd())}",
              f'RUN_ID="{SLURM_RUN_ID}"', 'RUN_ID="${RUN_ID:-$SLURM_JOB_ID}"', ""]
    run_root = f"{run_dir}/${{RUN_ID}}"
    if array is None:
        for i, st in enumerate(stages, 1):
            where = "every task" if st.split() else "once"
            skip = f", skipped when {st.guard} exists" if st.guard else ""
            lines.append(f"# stage {i}/{len(stages)}: {st.name} ({where}{skip})")
            lines += _guarded(st, srun_line(st, world, run_root, requeue))
    else:
        lines.append('case "$SLURM_ARRAY_TASK_ID" in')
        for i, task in enumerate(array):
            lines.append(f"  {i})")
            for st in task:
                lines += _guarded(st, srun_line(st, world, run_root, requeue), indent="    ")
            lines.append("    ;;")
        lines.append("esac")
    return "\n".join(lines) + "\n"


def submit(script: str, script_path: str | Path, sbatch: str = "sbatch") -> str:
    """Write the script, submit it with sbatch, return the job id."""
    path = Path(script_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
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
           f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}-{stage.name}"]
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


def main(argv: list[str] | None = None) -> str | int | None:
    a = _parser().parse_args(argv)
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


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
