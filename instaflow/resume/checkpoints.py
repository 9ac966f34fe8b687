"""Read a Lightning checkpoint (a file, or an FSDP2 distributed-checkpoint folder) safely: its weights, its step.

Nothing here unpickles code. A checkpoint file is read with ``torch.load(weights_only=True)``
(torch's allow-list of tensors and plain containers; Lightning's own checkpoints need nothing
more). A folder's DCP ``.metadata`` (which torch's reader unpickles without restriction) is first
read by ``DcpMetadataUnpickler``, an allow-list of the ``torch.distributed.checkpoint`` metadata
classes, and its ``meta.pt`` with ``weights_only=True``. A file that names anything else raises
``UnsafeCheckpoint`` and is never loaded; a cut or incomplete one raises ``UnreadableCheckpoint``.

``first_non_finite`` finds a NaN/inf tensor among a checkpoint's weights and callback states
(the EMA shadow): a checkpoint holding one is never written (``refuse_non_finite``).

``FINISHED`` is the mark a fit leaves beside its ``last.ckpt`` when it ends normally
(``callbacks.resume``); ``RUNNING`` names the process training into the folder (``running_mark``).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

FINISHED = "fit_finished.json"
RUNNING = "fit_running.json"  # running_mark(): host, pid, process start time, boot id
RUN_STATE_KEY = "Resume"  # callbacks.resume.Resume's state in each checkpoint: {"run": the run folder writing it}
META = "meta.pt"  # Lightning's non-tensor part of a distributed checkpoint folder
DCP_METADATA = ".metadata"  # torch DCP's index of the shards (a pickle)

# Everything torch's DCP writes into .metadata (measured on torch 2.14's dcp.save), plus plain
# builtins. Each is a data class, an enum, a path or a dtype/layout lookup: constructing one runs no
# code of the file's choosing. torch dtypes (torch.float32, ...) are allowed by type, not listed.
DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice", "complex", "bytearray"},
}


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint whose pickle names code outside the allow-list: refused, never loaded."""


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint that is cut, incomplete or corrupt (a kill during its write): resume falls back past it."""


class NonFiniteCheckpoint(ValueError):
    """A checkpoint whose weights or EMA hold NaN/inf: never written, never resumed from."""


def _unsafe(path: Path | str, what: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"{path} is not a plain checkpoint: {what}. It was not loaded (loading it could run code). If you did not "
        f"write it, delete it; a checkpoint of this project holds only tensors and plain values")


def _named_global(message: str) -> str:
    """The line of torch's weights-only error that names the refused global (its other lines advise unsafe loading)."""
    lines = [ln.strip() for ln in message.splitlines() if "GLOBAL" in ln or "nsupported" in ln]
    return (lines[0][:300] if lines else "it names a global outside torch's weights-only allow-list")


def load_file(path: str | Path, mmap: bool = True, map_location: Any = "cpu") -> dict:
    """A checkpoint file's dict, read with ``weights_only=True`` (``mmap``: tensors stay on disk until used)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as exn:  # the weights-only unpickler met a global or opcode it does not allow
        raise _unsafe(path, _named_global(str(exn))) from exn
    except (RuntimeError, EOFError, OSError, ValueError) as exn:  # cut zip, empty file, missing file
        raise UnreadableCheckpoint(f"{path} cannot be read ({type(exn).__name__}: {str(exn)[:200]}): "
                                   "it was probably cut by a kill during its write") from exn
    if not isinstance(obj, dict):
        raise UnreadableCheckpoint(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


class DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, allowing only ``DCP_GLOBALS`` and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in DCP_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not on the DCP metadata allow-list "
                                         "(instaflow.models.checkpoints.DCP_GLOBALS)")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in DCP metadata")


def read_dcp_metadata(folder: str | Path) -> Any:
    """The ``torch.distributed.checkpoint.metadata.Metadata`` of a folder, read through the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            md = DcpMetadataUnpickler(f).load()
    except pickle.UnpicklingError as exn:
        if "allow-list" in str(exn) or "persistent" in str(exn):
            raise _unsafe(path, str(exn)) from exn
        raise UnreadableCheckpoint(f"{path} cannot be read ({exn}): the folder is incomplete") from exn
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as exn:
        raise UnreadableCheckpoint(f"{path} cannot be read ({type(exn).__name__}: {exn}): "
                                   "the folder is incomplete (a kill during its write?)") from exn
    if not isinstance(md, Metadata):
        raise _unsafe(path, f"it holds a {type(md).__name__}, not DCP Metadata")
    return md


def _check_shards(folder: Path, md: Any) -> None:
    """Every shard file the metadata names is inside the folder and long enough to hold its bytes."""
    needed: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = str(info.relative_path)
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise _unsafe(folder / DCP_METADATA, f"it points outside its folder ({rel})")
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in needed.items():
        f = folder / rel
        if not f.is_file() or f.stat().st_size < size:
            raise UnreadableCheckpoint(f"{folder} is incomplete: {rel} is missing or shorter than {size} bytes")


def validate_folder(folder: str | Path) -> dict:
    """Check a distributed checkpoint folder before anything reads it; returns its ``meta.pt`` (step, callbacks)."""
    folder = Path(folder)
    if not (folder / DCP_METADATA).is_file() or not (folder / META).is_file():
        raise UnreadableCheckpoint(f"{folder} is not a complete distributed checkpoint (needs {DCP_METADATA} "
                                   f"and {META})")
    _check_shards(folder, read_dcp_metadata(folder))
    return load_file(folder / META, mmap=False)


def checkpoint_meta(path: str | Path) -> dict:
    """A checkpoint's dict without reading its weights (file: memory-mapped; folder: validated ``meta.pt``)."""
    p = Path(path)
    return validate_folder(p) if p.is_dir() else load_file(p, mmap=True)


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` stored in a checkpoint file or a sharded checkpoint folder's ``meta.pt``."""
    meta = checkpoint_meta(path)
    if "global_step" not in meta:
        raise UnreadableCheckpoint(f"{path} holds no global_step: not a Lightning checkpoint")
    return int(meta["global_step"])


def read_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint as one dict on CPU; a distributed (FSDP2) folder is converted on this process alone.

    A folder holds the tensors as DCP shards plus ``meta.pt`` (everything else, e.g. callback
    states); ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` reads the shards
    without collectives, so one rank can call this while the others wait.
    """
    path = Path(path)
    if path.is_file():
        return load_file(path, mmap=False)
    meta = validate_folder(path)  # before torch's reader unpickles .metadata
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/whole.pt")
        tensors = load_file(f"{tmp}/whole.pt", mmap=False)
    return {**meta, **tensors}


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


# -- non-finite weights --------------------------------------------------------------------------------

def _tensors(obj: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every floating tensor in nested dicts/lists (DTensors as their local shard)."""
    if isinstance(obj, torch.Tensor):
        t = obj.to_local() if hasattr(obj, "to_local") else obj
        if (t.is_floating_point() or t.is_complex()) and t.device.type != "meta":
            yield name, t
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}[{k!r}]" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")


def first_non_finite(checkpoint: dict) -> str | None:
    """The name of the first weight (``state_dict``) or EMA shadow tensor (a callback state's ``shadow``) holding
    NaN/inf, or None. Other callback states may be infinite by design (``ModelCheckpoint``'s ``kth_value``).

    One ``isfinite`` pass over the tensors, one device sync per device (cost: reading them once).
    """
    named = list(_tensors(checkpoint.get("state_dict") or {}, ""))
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if isinstance(state, dict) and "shadow" in state:
            named += list(_tensors(state["shadow"], f"callbacks[{key!r}]['shadow']"))
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        ok = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu()
        bad += [i for i, good in zip(idx, ok.tolist()) if not good]
    return named[min(bad)][0] if bad else None


def non_finite_message(checkpoint: dict, where: str) -> str | None:
    """Why ``checkpoint`` must not be written to (or resumed from) ``where``, or None when it is finite."""
    name = first_non_finite(checkpoint)
    if name is None:
        return None
    return (f"the checkpoint of step {checkpoint.get('global_step', '?')} ({where}) holds NaN/inf in {name}: not "
            "written, so the last good checkpoint stays the newest; the training diverged (lower the learning "
            "rate, check the data, or resume from the last good checkpoint)")


def refuse_non_finite(checkpoint: dict, where: str) -> None:
    """Raise ``NonFiniteCheckpoint`` naming the first NaN/inf tensor and the step instead of writing it."""
    msg = non_finite_message(checkpoint, where)
    if msg is not None:
        raise NonFiniteCheckpoint(msg)


# -- the running mark: which process trains into a folder ----------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def boot_id() -> str | None:
    """This boot of this machine (Linux), None elsewhere: a pid from another boot is another process."""
    return _read("/proc/sys/kernel/random/boot_id")


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)" start at field 3
    except (ValueError, IndexError):
        return None


def running_mark(pid: int | None = None) -> dict:
    """What identifies process ``pid`` (default: this one) on this machine, across pid reuse and reboots."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": process_start(pid), "boot_id": boot_id()}


def mark_alive(mark: dict) -> bool:
    """Whether the process a ``running_mark`` names is alive now: same host, same boot, same pid *and* start time.

    A mark from another machine cannot be checked (False: a requeued job's process is gone); one
    without a start time or boot id (older marks, non-Linux) counts as stale.
    """
    try:
        host, pid, start, boot = mark["host"], int(mark["pid"]), mark.get("start_ticks"), mark.get("boot_id")
    except (KeyError, TypeError, ValueError):
        return False
    if host != socket.gethostname() or start is None or boot is None or boot != boot_id():
        return False
    return process_start(pid) == start
