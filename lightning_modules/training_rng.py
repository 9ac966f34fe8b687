"""The training draws' generator in checkpoints, one state per rank: a resumed run draws what the killed one would.

Each data-parallel rank draws its own t and caption dropout from a ``torch.Generator``. Reseeded on a
restart, a resumed run would draw other t's than the uninterrupted one; saved and restored (with the
stream's position, ``data.stream_state``), it is the same run. Checkpoints are built on every rank, so the
states are all-gathered there (one small uint8 tensor per rank).
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)

KEY = "training_rng"


def _trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's Trainer, or None for a module used (or saved) on its own: one process."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def gathered_state(module: L.LightningModule, gen: torch.Generator) -> torch.Tensor:
    """(world, n) uint8: every rank's generator state (a collective on every rank)."""
    trainer = _trainer(module)
    state = gen.get_state().to(module.device)
    states = module.all_gather(state) if trainer is not None and trainer.world_size > 1 else state
    return (states if states.dim() == 2 else states.unsqueeze(0)).cpu()


def restore_state(module: L.LightningModule, gen: torch.Generator, checkpoint: dict) -> None:
    """Set ``gen`` to this rank's saved state; a checkpoint from another world size keeps the fresh seed (warned)."""
    states = checkpoint.get(KEY)
    if states is None:
        return
    trainer = _trainer(module)
    world, rank = (trainer.world_size, module.global_rank) if trainer is not None else (1, 0)
    if states.shape[0] != world:
        log.warning("the checkpoint's training generators come from %d ranks, this run has %d: t and caption "
                    "dropout are drawn afresh (the run is resumed, not replayed exactly)", states.shape[0], world)
        return
    gen.set_state(states[rank].to(torch.uint8).cpu().clone())  # a row view (storage offset) segfaults set_state
