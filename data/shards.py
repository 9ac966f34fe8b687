"""Writing WebDataset shards: reproducible tar bytes, written atomically (``instaflow.state.atomic_file``).

A shard is written to a temporary file of its own in the same folder (a unique name, created
exclusively, never through a planted symlink), fsynced, and renamed over ``NAME``; the folder is
fsynced. A reader never sees a half-written shard, a kill leaves the previous complete shard (or
none), and two writers of the same name each write a whole shard: the last rename wins. A killed
writer leaves its hidden temporary file ``.NAME.tmp-<pid>-<random>`` behind (safe to delete); the
fixed ``NAME.tmp`` that older versions left is removed (unlinked, never followed) once ``NAME`` is written.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from instaflow.state import atomic_file


def npy_bytes(x: torch.Tensor, dtype: str) -> bytes:
    """A tensor as the bytes of a ``.npy`` file of ``dtype`` (numpy has no bf16: "float16" or "float32")."""
    buf = io.BytesIO()
    np.save(buf, x.to(torch.float32).numpy().astype(dtype))
    return buf.getvalue()


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """Write ``(name, payload)`` members to ``path`` as an uncompressed tar; mtime 0, so equal members give equal bytes."""
    path = Path(path)
    # the tar is closed (its end blocks written) before atomic_file fsyncs and renames: a shard exists only once complete
    with atomic_file(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 0  # mtime 0: reproducible bytes
            tar.addfile(info, io.BytesIO(payload))
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + ".tmp").unlink()  # older versions' leftover (a link is removed, not followed)
    return path
