"""Read a Lightning checkpoint (a file, or an FSDP2 distributed-checkpoint folder) safely: its weights, its step.

Nothing here unpickles code. A checkpoint file is read with ``torch.load(weights_only=True)``
(torch's allow-list of tensors and plain containers; Lightning's own checkpoints need nothing
more). A folder's DCP ``.metadata`` (which torch's reader unpickles without restriction) is first
read by ``DcpMetadataUnpickler``, an allow-list of the ``torch.distributed.checkpoint`` metadata
classes, and its ``meta.pt`` with ``weights_only=True``. A file that names anything else raises
``UnsafeCheckpoint`` and is never loaded; a cut or incomplete one raises ``UnreadableCheckpoint``.

The resume protocol (``instaflow.resume``) reads every checkpoint through these; so do the export
(``checkpoint_weights``) and the CLI's check of a given ``--ckpt_path`` (``check_given``).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

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
                                         "(instaflow.resume.checkpoints.DCP_GLOBALS)")
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


def check_given(ckpt_path: str) -> None:
    """Refuse a given checkpoint that is unsafe or unreadable before Lightning reads it (``last``, ``best``,
    ``hpc``: Lightning's names, checked by its weights-only load)."""
    if not os.path.exists(ckpt_path):
        return
    try:
        checkpoint_meta(ckpt_path)
    except (UnsafeCheckpoint, UnreadableCheckpoint) as exn:
        raise SystemExit(f"[checkpoint] --ckpt_path: {exn}") from exn
