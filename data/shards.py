"""Writing WebDataset shards: reproducible tar bytes, written atomically (temporary name, then rename).

A reader never sees a half-written shard: a killed writer leaves ``NAME.tmp``, which a rerun overwrites.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch


def npy_bytes(x: torch.Tensor, dtype: str) -> bytes:
    """A tensor as the bytes of a ``.npy`` file of ``dtype`` (numpy has no bf16: "float16" or "float32")."""
    buf = io.BytesIO()
    np.save(buf, x.to(torch.float32).numpy().astype(dtype))
    return buf.getvalue()


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """Write ``(name, payload)`` members to ``path`` as an uncompressed tar; mtime 0, so equal members give equal bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 0  # mtime 0: reproducible bytes
            tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)  # a shard exists only once complete
    return path
