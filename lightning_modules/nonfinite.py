"""The non-finite guard of every trainable module: a step whose loss or gradient is not finite is never applied.

A finite loss can still give a NaN gradient (an overflow in the backward pass, one bad sample); applied
once, it makes the weights, then the EMA and every later checkpoint NaN for good, and auto-resume picks
that checkpoint up. ``NonfiniteGuard`` checks the gradients between the backward pass and the optimizer
step and decides the same on every rank.
"""

from __future__ import annotations

import torch

from instaflow.flow.losses import all_finite

DEFAULT_LIMIT = 10


def _no_closure() -> None:
    """The closure handed to ``optimizer.step`` after the guard already ran the real one."""
    return None


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class NonfiniteGuard:
    """Mixin placed before ``L.LightningModule`` in a module's bases: skip or stop on non-finite steps.

    Settings (the module's ``__init__`` arguments, kept in its hparams):
        nonfinite: "skip" (default): a step whose loss or gradient (on any rank) is not finite is not
            applied: no optimizer step (weights and AdamW moments unchanged), gradients zeroed; it is
            counted (``nonfinite_steps_skipped``, logged as ``train/nonfinite_steps_skipped``, printed at
            1, 2, 4, 8, ... skips, kept in checkpoints). "stop": the run raises a FloatingPointError naming
            the step instead.
        nonfinite_limit: after this many consecutive skipped steps the run stops all the same (default 10):
            an isolated overflow is noise worth skipping, but a run whose every step is non-finite has
            diverged (or its data is broken) and would otherwise burn its allocation training nothing.

    A skipped step still advances ``trainer.global_step`` and the learning-rate schedule: Lightning counts
    the ``optimizer_step`` call, not ``optimizer.step``, so ``max_steps`` counts attempted steps and the
    schedule stays a function of the step (a resumed run lines up). The EMA is not updated on it
    (``callbacks.ema.EMA`` updates only when ``optimizer.step`` ran).

    Every strategy: the check runs after the backward pass (DDP's gradients are all-reduced by then,
    FSDP2's are this rank's shards) and this rank's verdict is all-gathered (one number per rank), so every
    rank skips, steps or raises at the same step and none is left waiting in a collective. Under
    ``precision: 16-mixed`` the GradScaler already skips steps with inf/NaN gradients (and lowers its
    scale), so the guard stands aside there.
    """

    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` itself, its finiteness recorded for this step's verdict (over every accumulated micro-batch)."""
        flag = torch.isfinite(loss.detach()).all()
        seen = getattr(self, "_loss_finite", None)
        self._loss_finite = flag if seen is None else seen & flag.to(seen.device)
        return loss

    @property
    def nonfinite_steps_skipped(self) -> int:
        return getattr(self, "_nonfinite_skipped", 0)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if optimizer_closure is None or self.trainer.precision == "16-mixed":
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer_closure()  # training_step + backward, as optimizer.step(closure) would run it
        if self._step_is_finite(optimizer):
            self._nonfinite_run = 0
            optimizer.step(closure=_no_closure)  # gradient clipping and on_before_optimizer_step happen in here
        else:
            optimizer.zero_grad()
            self._skip_step()
        self.log("train/nonfinite_steps_skipped", float(self.nonfinite_steps_skipped))

    def _step_is_finite(self, optimizer) -> bool:
        """Whether this step's loss and gradients are finite on every rank (one all-gather of one number).

        Every parameter group counts: the student's and each network its loss trains (``instaflow.losses``), so
        a NaN in a discriminator's gradient skips the whole step, as it would the student's.
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        ok = all_finite(grads)
        loss_ok, self._loss_finite = getattr(self, "_loss_finite", None), None
        if loss_ok is not None:
            ok = ok & loss_ok.to(ok.device)
        bad = (~ok).to(device=self.device, dtype=torch.float32).reshape(1)
        return float(self.all_gather(bad).sum()) == 0.0

    def _skip_step(self) -> None:
        """Count the skipped step; raise (on every rank alike) under ``stop`` or past the consecutive limit."""
        step, mode = self.global_step, self.hparams.get("nonfinite", "skip")
        limit = self.hparams.get("nonfinite_limit", DEFAULT_LIMIT)
        hint = "lower the learning rate, check the couplings/data, or resume from an earlier checkpoint"
        if mode == "stop":
            raise FloatingPointError(f"non-finite loss or gradient at step {step} (nonfinite: stop); {hint}")
        self._nonfinite_skipped = self.nonfinite_steps_skipped + 1
        self._nonfinite_run = getattr(self, "_nonfinite_run", 0) + 1
        if self._nonfinite_run >= limit:
            raise FloatingPointError(f"{self._nonfinite_run} consecutive steps up to step {step} had a non-finite "
                                     f"loss or gradient and were skipped (nonfinite_limit: {limit}); the run has "
                                     f"diverged or its data is broken: {hint}")
        if is_power_of_two(self.nonfinite_steps_skipped) and self.trainer.is_global_zero:
            print(f"[nonfinite] skipped step {step}: non-finite loss or gradient, not applied "
                  f"({self.nonfinite_steps_skipped} skipped so far)", flush=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_steps_skipped"] = self.nonfinite_steps_skipped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._nonfinite_skipped = int(checkpoint.get("nonfinite_steps_skipped", 0))
