"""The one entry point: LightningCLI over the project's modules, configured by experiments/*.yaml.

    # an experiment by name: its -c chain (base, what it extends, itself) and its subcommand
    python -m lightning_modules.cli --experiment embedded/distill_direct        # = make run EXP=embedded/distill_direct
    # the same spelled out
    python -m lightning_modules.cli fit -c experiments/base/default.yaml -c experiments/embedded/distill.yaml \
        -c experiments/embedded/distill_direct.yaml
    # override any key; a misspelled key fails at parse time and names the key
    python -m lightning_modules.cli fit --experiment embedded/reflow --model.init_args.lr 1e-4 --trainer.max_steps 100

Every setting lives in the YAML: this file adds nothing to it (no hidden scaling of learning
rates or batch sizes); ``--experiment`` only names the files (``instaflow.experiments``).

Resume anywhere (the protocol: ``instaflow.resume``): every run has the ``callbacks.resume.Resume``
callback (config key ``resume``), and a ``fit`` without ``--ckpt_path`` first looks for its own
unfinished checkpoint (``instaflow.resume.find``) and continues from it, in the same run folder. A
fit stopped by SIGTERM saves ``last.ckpt`` and exits with status 143 (128 + SIGTERM), so a wrapper
sees it failed.

Safe checkpoints on every run: the trainer's strategy writes through ``AtomicCheckpointIO``
(``lightning_modules.checkpointing``; put on the strategy here, so a ``--trainer.plugins`` list, such
as the SLURM launcher's, cannot drop it), a fit loads its checkpoint with ``weights_only=True``, and
a checkpoint it is given or finds is checked before Lightning reads it (a file through torch's
weights-only allow-list, an FSDP2 folder's DCP metadata through ours): one naming code to run stops
the fit with a message naming the file.
"""

from __future__ import annotations

import os
import signal
import sys

import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.resume import Resume
from instaflow.collective import end_process_group
from instaflow.experiments import expand
from instaflow.resume.checkpoints import check_given
from instaflow.resume.find import continue_from
from lightning_modules.checkpointing import install_atomic_io


class InstaFlowCLI(LightningCLI):
    """LightningCLI plus the ``resume`` callback and, before ``fit``, continuing the run's own unfinished checkpoint."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Resume, "resume")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        note = install_atomic_io(trainer.strategy)
        if note:
            _say(note)
        return trainer

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads a given checkpoint's hyperparameters right after parsing: check it first
        sub = self.config.get("subcommand")
        if sub and self.config[sub].get("ckpt_path") is not None:
            check_given(self.config[sub].ckpt_path)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(str(self.subcommand)) if self.subcommand else None
        if cfg is None:
            return
        if "weights_only" in cfg and cfg.get("weights_only") is None:
            cfg.weights_only = True  # Lightning's own load: torch's allow-list, whatever torch's default or env say
        if cfg.get("ckpt_path") is not None:
            return
        if self.subcommand != "fit" or not cfg.resume.auto:
            return
        found = continue_from(yaml.safe_load(self.parser.dump(self.config))[self.subcommand], log=_say)
        if found is None:
            return
        cfg.ckpt_path = str(found.ckpt)
        logger = cfg.trainer.get("logger")
        if hasattr(logger, "init_args"):
            for key, value in found.logger_settings(str(logger.class_path)).items():
                setattr(logger.init_args, key, value)
        _say(found.message())


def _say(msg: str) -> None:
    """Print on the first rank only (every rank runs the search; one says what it found)."""
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:
        print(msg, flush=True)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    args = expand(sys.argv[1:] if args is None else list(args), subcommand=run)
    try:
        cli = _cli(args, run)
    except SIGTERMException as exn:  # Lightning's SIGTERM exit carries no status: make it a failure
        raise SystemExit(128 + signal.SIGTERM) from exn
    if run:  # every rank finished: close the group before the interpreter's exit can abort in its threads
        end_process_group()
    return cli


def _cli(args: list[str], run: bool) -> LightningCLI:
    return InstaFlowCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        # a requeued or resumed run may rewrite its own saved config
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
