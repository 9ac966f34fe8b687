"""Read a Lightning checkpoint (a file, or an FSDP2 distributed-checkpoint folder): a network's weights, its step.

``FINISHED`` is the mark a fit leaves beside its ``last.ckpt`` when it ends normally
(``callbacks.resume``); a ``last.ckpt`` without it belongs to an unfinished fit (``lightning_modules.resume``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

FINISHED = "fit_finished.json"
RUNNING = "fit_running.json"  # {host, pid, start} of the process training into this folder now


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` stored in a checkpoint file or a sharded checkpoint folder's ``meta.pt``."""
    p = Path(path)
    if p.is_dir():
        return int(torch.load(p / "meta.pt", map_location="cpu", weights_only=False)["global_step"])
    # mmap: the weights stay on disk, only the small metadata is read
    return int(torch.load(p, map_location="cpu", mmap=True, weights_only=False)["global_step"])


def read_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint as one dict on CPU; a distributed (FSDP2) folder is converted on this process alone.

    A folder holds the tensors as DCP shards plus ``meta.pt`` (everything else, e.g. callback
    states); ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` reads the shards
    without collectives, so one rank can call this while the others wait.
    """
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if not (path / "meta.pt").is_file():
        raise FileNotFoundError(f"{path} is neither a checkpoint file nor a distributed checkpoint folder (meta.pt)")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/whole.pt")
        tensors = torch.load(f"{tmp}/whole.pt", map_location="cpu", weights_only=False)
    return {**torch.load(path / "meta.pt", map_location="cpu", weights_only=False), **tensors}


def checkpoint_weights(path: str | Path, prefix: str = "unet.", ema_key: str | None = None,
                       names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the submodule ``prefix`` in a checkpoint, its trainable tensors replaced by the EMA's.

    ``ema_key``: the EMA callback's ``state_key`` (its shadow is a list in parameter order);
    ``names``: the trainable parameters' names in that order (``FlowStudent.trainable_names``).
    """
    ckpt = read_checkpoint(path)
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise KeyError(f"{path} holds no weights under {prefix!r}")
    if ema_key is not None:
        ema = ckpt.get("callbacks", {}).get(ema_key) or {}
        shadow = ema.get("shadow")
        if shadow is None:
            raise KeyError(f"{path} holds no EMA state under {ema_key!r}: was it saved by a run with that EMA callback?")
        if names is None or len(names) != len(shadow):
            raise ValueError(f"the EMA state holds {len(shadow)} tensors, the module names {len(names or [])}")
        state.update(zip(names, shadow))
    return state
