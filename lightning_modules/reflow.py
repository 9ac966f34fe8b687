"""Stage 2 of InstaFlow, reflow: the 2-Rectified Flow regresses v(x_t, t | text) on x1 - x0."""

from __future__ import annotations

import torch

from instaflow.flow.paths import interpolate, velocity_target
from instaflow.flow.time_sampling import sample_t
from instaflow.losses import L2, Loss
from lightning_modules.student import FlowStudent


def check_time_distribution(name: str, kwargs: dict | None) -> None:
    """Raise a ValueError naming ``time_distribution`` / ``time_kwargs`` unless they draw finite t in [0, 1]."""
    try:
        t = sample_t(name, 64, generator=torch.Generator().manual_seed(0), **(kwargs or {}))
    except TypeError as exn:
        raise ValueError(f"time_kwargs {kwargs!r} do not fit time_distribution {name!r}: {exn}") from None
    if not (torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1):
        raise ValueError(f"time_distribution {name!r} with time_kwargs {kwargs!r} draws t outside [0, 1] or non-finite")


class ReflowTraining(FlowStudent):
    """v(x_t, t | text) -> x1 - x0 on the couplings (InstaFlow sec. 3; Liu et al. 2022, eq. 1).

    Args:
        loss: ``instaflow.losses.Loss`` by ``class_path`` (null: ``L2`` on velocities). A loss that compares
            images (``compares_images``: LPIPS, LPIPS-Huber) is given the x1 estimate x_t + (1 - t) v and x1
            instead of the velocities (Lee et al. 2024: the premetric on the denoised estimate), with t.
    """

    def __init__(self, init: str, parameterization: str = "raw", time_distribution: str = "uniform",
                 time_kwargs: dict | None = None, loss: Loss | None = None, **kw) -> None:
        super().__init__(init, parameterization, **kw)
        self.set_criterion(L2() if loss is None else loss)
        check_time_distribution(time_distribution, time_kwargs)

    def configure_model(self) -> None:
        super().configure_model()
        self.configure_criterion()

    def loss(self, batch: dict, generator: torch.Generator, dropout: float) -> torch.Tensor:
        x0, x1 = batch["x0"], batch["x1"]  # (B, 4, h, w)
        t = sample_t(self.hparams.time_distribution, x0.shape[0], generator=generator,
                           **(self.hparams.time_kwargs or {})).to(x0.device)
        x_t = interpolate(x0, x1, t)
        v_pred = self.velocity(x_t, t, self.batch_states(batch, dropout))
        if self.criterion.compares_images:
            s = (1 - t).view(-1, *([1] * (x_t.dim() - 1)))  # (B, 1, 1, 1): one Euler step from t to 1
            return self.criterion(x_t + s * v_pred, x1, t)
        return self.criterion(v_pred, velocity_target(x0, x1), t)
