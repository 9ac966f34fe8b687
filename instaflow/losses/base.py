"""The loss interface, and how a loss's own networks join the stage's one optimizer (parameter groups)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from instaflow.flow.schedules import check_count, check_lr, check_nonnegative, warmup_cosine_factor


@dataclass
class NetworkOptimizer:
    """AdamW settings of one network a loss trains (a discriminator, a fake-score model): its own parameter group.

    AdamW is per-parameter (each parameter's moments and step see only its group's lr, betas, weight decay),
    so a group with its own hyperparameters updates exactly as a separate AdamW over that network would.
    The learning rate follows this group's own warm-up (``warmup_steps``) on the stage's step counter.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_lr(self.lr, "loss optimizer lr")
        check_nonnegative(self.weight_decay, "loss optimizer weight_decay")
        check_count(self.warmup_steps, "loss optimizer warmup_steps")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"loss optimizer betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class ParamGroup:
    """One AdamW parameter group of a stage's optimizer: a named network's trainable parameters and settings."""

    name: str
    params: list[torch.nn.Parameter] = field(repr=False)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None

    def lr_factor(self, step: int) -> float:
        """The LambdaLR factor of this group at ``step`` (linear warm-up, then constant or cosine)."""
        return warmup_cosine_factor(step, self.warmup_steps, self.decay_steps)


def adamw_param_groups(groups: list[ParamGroup]) -> dict:
    """One AdamW over ``groups`` (each its own lr, betas, weight decay) and one LambdaLR with one lambda per group.

    One group gives exactly ``instaflow.flow.schedules.adamw_with_warmup``'s optimizer and schedule. Several: each
    group updates as its own AdamW would; what they share is the step (one ``optimizer.step``), the non-finite
    guard (a step skipped for one group's NaN is skipped for all), and global-norm gradient clipping
    (``gradient_clip_val`` clips the norm over every group together, not per network).
    """
    if not groups or not groups[0].params:
        raise ValueError("the stage's optimizer has no trainable parameters (is every weight frozen?)")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"parameter group names must be unique, got {names}")
    for g in groups:
        check_lr(g.lr, f"{g.name} lr")
        check_nonnegative(g.weight_decay, f"{g.name} weight_decay")
        check_count(g.warmup_steps, f"{g.name} warmup_steps")
    first = groups[0]
    # named only when there are several, so a single group's logged lr keeps its name (lr-AdamW)
    specs = [{"params": g.params, "lr": g.lr, "betas": tuple(g.betas), "weight_decay": g.weight_decay,
              **({"name": g.name} if len(groups) > 1 else {})} for g in groups]
    opt = torch.optim.AdamW(specs, lr=first.lr, weight_decay=first.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [g.lr_factor for g in groups])
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Loss(nn.Module):
    """A training objective between a prediction and its target, both (B, C, h, w) latents; returns a scalar.

    Subclasses implement ``forward(pred, target, t=None)``; ``t`` (B,) is the time of each sample where the stage
    has one (reflow), None otherwise (one-step distillation: every prediction is at t = 1). A loss that needs the
    model's parts (its VAE) builds them in ``configure``, called once by the stage's ``configure_model`` (nothing
    is built in ``__init__``, so a YAML parses without loading a network). A loss that trains networks of its own
    returns them from ``trained_networks`` and their settings from ``optimizer_for``.
    """

    compares_images = False  # True: it decodes pred/target, so they must be clean latents (estimates of x1)

    def configure(self, vae: nn.Module | None = None) -> None:
        """Build what needs the student's parts (called once, before the first step); default: nothing."""

    def trained_networks(self) -> dict[str, nn.Module]:
        """The networks this loss trains, by name (the stage lists them as ``loss.<name>``); default: none."""
        return {}

    def optimizer_for(self, name: str) -> NetworkOptimizer:
        """AdamW settings of the trained network ``name``."""
        raise NotImplementedError(f"{type(self).__name__} trains {name!r} but says nothing of its optimizer: "
                                  "implement optimizer_for(name) -> NetworkOptimizer")

    def param_groups(self) -> list[ParamGroup]:
        """One parameter group per trained network (``loss.<name>``), its trainable parameters and settings."""
        groups = []
        for name, net in self.trained_networks().items():
            o = self.optimizer_for(name)
            params = [p for p in net.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"{type(self).__name__}'s trained network {name!r} has no trainable parameters")
            groups.append(ParamGroup(f"loss.{name}", params, o.lr, tuple(o.betas), o.weight_decay, o.warmup_steps))
        return groups

    def description(self) -> dict:
        """What the stage records in its hyperparameters, spelled as YAML writes it: ``{class_path, init_args}``
        (the package's public path for its own losses; no ``init_args`` when there are no settings)."""
        import instaflow.losses

        cls = type(self)
        public = getattr(instaflow.losses, cls.__name__, None) is cls
        path = f"instaflow.losses.{cls.__name__}" if public else f"{cls.__module__}.{cls.__qualname__}"
        settings = self.settings()
        return {"class_path": path, **({"init_args": settings} if settings else {})}

    def settings(self) -> dict:
        """This loss's constructor settings (plain values), for ``description``; default: none."""
        return {}

    def forward(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError
