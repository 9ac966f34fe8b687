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
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from instaflow.experiments import expand


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    args = expand(sys.argv[1:] if args is None else list(args), subcommand=run)
    return LightningCLI(
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
