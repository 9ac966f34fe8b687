"""The one entry point: LightningCLI over the project's modules, configured by experiments/*.yaml.

    # one device
    python -m lightning_modules.cli fit -c experiments/base/default.yaml -c experiments/embedded/teacher.yaml
    # override any key; a misspelled key fails at parse time and names the key
    python -m lightning_modules.cli fit -c ... --model.init_args.lr 1e-4 --trainer.max_steps 100

Every setting lives in the YAML: this file adds nothing to it (no hidden scaling of learning
rates or batch sizes).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
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
