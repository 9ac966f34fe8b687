"""State on disk that a kill cannot half-write, and readers that survive what a kill left behind.

Every file or folder the project writes and later reads again (checkpoint markers, records,
``quality.jsonl``, shards, exported model folders) goes through here:

- a file is written to a temporary name *in the same folder* (so the rename never crosses a
  filesystem, where it would be a truncating copy), flushed and fsynced, then ``os.replace``d over
  the target, and the folder is fsynced so the rename itself survives a power cut; a symlink at the
  target is replaced, never followed;
- a folder is written beside its target and renamed into place when complete; the previous one is
  kept (renamed aside) until the new one is in place, and ``recover_folder`` puts it back when a
  kill fell between the two renames;
- a JSON-lines log is appended by rewriting it whole (atomically), and read tolerantly: a cut or
  garbled line (a kill in the middle of an older, non-atomic write) is skipped and counted.

Layer 0: imports nothing of the project, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"  # temporary names: ".<name>.tmp-<host>-<pid>-<random>"
OLD_MARK = ".old-"  # a replaced folder kept aside: ".<name>.old-<host>-<pid>-<random>"


def _host() -> str:
    """This machine's name as it goes into temporary names (no separators that could confuse the parse)."""
    return "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname())[:64] or "host"


def sibling(path: str | Path, mark: str = TMP_MARK) -> Path:
    """A new hidden name beside ``path`` that says which process made it (host, pid), so that its leftovers can
    be told apart from a live writer's, also on a filesystem shared by several machines."""
    path = Path(path)
    return path.parent / f".{path.name}{mark}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_sibling = sibling


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on a folder
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on a clean exit it is fsynced and renamed over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. The temporary file is
    created exclusively (``O_EXCL``: never an existing file or a planted symlink).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes whole files: mode 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK)
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path``."""
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file's value, or ``default`` when it is absent, empty or not valid JSON (a cut write)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError):
        return default
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return default


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file (absent: none) and how many lines were unreadable and skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return [], 0
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Replace a JSON-lines file with ``records``, atomically."""
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path: str | Path, record: dict) -> int:
    """Append one record by rewriting the file atomically (unreadable old lines dropped); returns how many were."""
    records, bad = read_jsonl(path)
    write_jsonl(path, records + [record])
    return bad


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``path`` to write into; on a clean exit it becomes ``path``.

    The previous ``path`` (if any) is renamed aside first and deleted only after the new folder is in
    place, so at every moment either the old or the new complete folder exists under ``path`` or
    aside (``recover_folder`` puts an aside folder back). On an exception the new folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = _sibling(path, TMP_MARK)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, path)


def replace_folder(src: str | Path, dst: str | Path) -> None:
    """Move the complete folder ``src`` to ``dst`` (same filesystem), keeping an old ``dst`` aside until done."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        old = _sibling(dst, OLD_MARK)
        os.rename(dst, old)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_folder(path: str | Path) -> Path | None:
    """If ``path`` is missing but a folder replaced by ``atomic_folder`` was left aside (a kill between the two
    renames), rename the newest such folder back; returns it, or None. Leftover temporary folders are removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    prefix = f".{path.name}"
    aside = [p for p in path.parent.iterdir() if p.name.startswith(prefix + OLD_MARK) and p.is_dir()]
    restored = None
    if not path.exists() and aside:
        restored = max(aside, key=lambda p: p.stat().st_mtime)
        os.rename(restored, path)
        fsync_dir(path.parent)
        aside.remove(restored)
    for p in aside + [p for p in path.parent.iterdir() if p.name.startswith(prefix + TMP_MARK) and p.is_dir()]:
        if _owner_alive(p.name):
            continue  # another live process on this machine is writing it right now
        shutil.rmtree(p, ignore_errors=True)
    return restored


def _owner_alive(name: str) -> bool:
    """Whether the process that named a temporary entry (``...<mark><host>-<pid>-<random>``) may still be writing
    it: True for another machine's entry (its process cannot be checked from here), else whether that pid lives."""
    try:
        host, pid, _ = name.rsplit("-", 2)
        pid = int(pid)
    except ValueError:
        return False  # not one of ours (or the old "<pid>-<random>" form): nobody writes it any more
    mark = TMP_MARK if TMP_MARK in host else OLD_MARK
    if mark not in host or host.split(mark, 1)[1] != _host():
        return mark in host
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files and folders (``.<name>.tmp-...``) that dead writers on this machine left in
    ``folder``; returns how many. Another machine's entries and live writers' are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.iterdir():
        if not (p.name.startswith(".") and TMP_MARK in p.name) or _owner_alive(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        n += 1
    return n


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (a folder about to be renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            p = os.path.join(folder, name)
            if os.path.islink(p):
                continue
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        fsync_dir(folder)
