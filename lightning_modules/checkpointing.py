"""How a fit writes and reads its checkpoints: atomically, finite, and never unpickling code (the reading and the
refusals are the resume protocol's, ``instaflow.resume``; this module puts them on Lightning's IO and strategy).

- ``AtomicCheckpointIO`` (the CLI installs it on every run's strategy, ``install_atomic_io``): a
  checkpoint file is written to a temporary file in its own folder, fsynced and renamed over the
  target (``instaflow.state.atomic_file``), so a kill leaves the previous file whole; Lightning's
  default writes a temporary file in ``$TMPDIR`` and moves it, a truncating copy when that is another
  filesystem (as on clusters). A checkpoint with NaN/inf weights or EMA is refused, not written; a
  file is read with ``weights_only=True`` whatever the caller asks.
- ``AtomicModelParallelStrategy`` (``experiments/sharding/fsdp2.yaml``): ModelParallelStrategy
  (FSDP2) whose distributed checkpoint folder is written beside its target by every rank, then
  renamed into place by rank 0 with the previous folder kept until the new one is complete
  (``instaflow.state.replace_folder``); every rank checks its shards for NaN/inf first, and a folder
  is validated (DCP metadata through an allow-list, every shard present) before it is loaded. An
  error on any rank is raised on every rank (``instaflow.collective``).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import save as dcp_save

from instaflow.collective import every_rank_raises, on_rank_zero
from instaflow.resume.checkpoints import META, load_file, validate_folder
from instaflow.resume.refusals import refuse_non_finite_on_every_rank
from instaflow.state import TMP_MARK, atomic_file, fsync_dir, recover_folder, replace_folder, sibling


def _remote(path: Any) -> bool:
    return "://" in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes atomically in the target's folder and loads with ``weights_only=True`` only
    (remote URLs go through Lightning's fsspec path, still weights-only).

    NaN/inf is refused before this runs, on every rank at once (``callbacks.resume.Resume.on_save_checkpoint``,
    which the CLI adds to every run, through ``instaflow.resume.refusals``): a check here would run on rank 0
    alone and leave the others waiting."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        if _remote(path):
            return super().save_checkpoint(checkpoint, path)
        with atomic_file(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if _remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_file(path, mmap=False, map_location=map_location)


def install_atomic_io(strategy: Any) -> str | None:
    """Put ``AtomicCheckpointIO`` on ``strategy`` where it uses Lightning's default IO; a note when it keeps
    another (configured) one."""
    io = strategy.checkpoint_io
    if isinstance(io, AtomicCheckpointIO):
        return None
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return None
    return (f"[checkpoints] keeping the configured {type(io).__name__}: its checkpoint writes are not known to be "
            "atomic (a kill during a write may cut last.ckpt; resume then falls back to an older checkpoint)")


def _temp_beside(path: Path) -> Path:
    """A new temporary folder name beside ``path`` (``instaflow.state``'s naming: cleaned up once its owner died)."""
    return sibling(path, TMP_MARK)


def _prepare(path: Path) -> str:
    """Rank 0: put back a folder an interrupted swap left aside, drop dead writers' leftovers; a temp name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    return str(_temp_beside(path))


def _finish(tmp: Path, path: Path, meta: dict) -> None:
    """Rank 0: write ``meta.pt`` into the complete temporary folder and rename it over ``path``."""
    with atomic_file(tmp / META, "wb") as f:
        torch.save(meta, f)
    fsync_dir(tmp)
    replace_folder(tmp, path)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``lightning.pytorch.strategies.ModelParallelStrategy`` with atomic, validated distributed checkpoint folders.

    Same arguments as ``ModelParallelStrategy``.
    """

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto",
                 tensor_parallel_size: Literal["auto"] | int = "auto", save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = timedelta(minutes=30)) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.distributed_checkpoint = save_distributed_checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self.distributed_checkpoint:  # one file, gathered on rank 0: through the (atomic) CheckpointIO
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        path = Path(self.broadcast(str(filepath)))
        # each rank its own shards
        refuse_non_finite_on_every_rank(checkpoint, str(path), f"checking the checkpoint {path} for NaN/inf")
        tmp = Path(on_rank_zero(self, lambda: _prepare(path), f"preparing to write {path}"))
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        with every_rank_raises(f"writing the checkpoint shards into {tmp}"):
            dcp_save(state, checkpoint_id=tmp)  # every rank its shard; the coordinator writes .metadata last
        on_rank_zero(self, lambda: _finish(tmp, path, checkpoint), f"putting the checkpoint folder {path} in place")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            with every_rank_raises(f"validating the checkpoint folder {path}"):
                validate_folder(path)  # before torch's DCP reader unpickles its .metadata
        return super().load_checkpoint(path, weights_only=True)
