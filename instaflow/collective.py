"""Work that one rank does while the others wait, made safe: an error reaches every rank, named.

On a multi-rank run, rank 0 often does something alone (build the FID reference, compute a
Frechet distance, export the best checkpoint) while the other ranks wait in the next collective.
If rank 0 raises there, the others wait until the collective times out (30 min by default on
NCCL) and then die with a timeout that hides the real error. ``on_rank_zero`` runs the work inside
one broadcast: the value, or the error's description, reaches every rank, and every rank raises
the named cause at once. ``raise_if_any`` does the same for work that every rank does on its own
(loading its share, preparing a network): if any rank failed, all raise.

``strategy`` is anything with Lightning's ``broadcast(obj, src=0)`` and ``is_global_zero`` (a
``lightning.pytorch`` strategy, or ``trainer.strategy``). Layer 0: imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


class RankError(RuntimeError):
    """Raised on a rank because work on another rank failed (the message names that rank and its error)."""


def describe(exn: BaseException) -> str:
    """``Type: message`` and the innermost frame, short enough to broadcast and to read in a log."""
    tb = traceback.extract_tb(exn.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(exn).__name__}: {exn}"[:2000] + where


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank_zero(strategy: Any, fn: Callable[[], T], what: str) -> T:
    """``fn()`` on global rank 0 only; its return value on every rank, or its error raised on every rank.

    One broadcast, whatever happens: rank 0 re-raises its own exception, the others raise ``RankError``
    naming ``what`` and rank 0's error. ``fn`` must not use collectives (it runs on one rank).
    """
    value: Any = None
    error: BaseException | None = None
    if strategy.is_global_zero:
        try:
            value = fn()
        except Exception as exn:  # SystemExit / KeyboardInterrupt end the process anyway
            error = exn
    value, text = strategy.broadcast((value if error is None else None,
                                      describe(error) if error is not None else None), src=0)
    if error is not None:
        raise error
    if text is not None:
        raise RankError(f"{what} failed on rank 0: {text}")
    return value


def raise_if_any(error: BaseException | None, what: str) -> None:
    """Call on every rank after work each rank did alone: if any rank's ``error`` is set, every rank raises.

    A rank with its own error re-raises it; the others raise ``RankError`` naming the first failed rank.
    One all-gather (nothing on a single process).
    """
    rank, world = _world()
    texts: list[str | None] = [describe(error) if error is not None else None]
    if world > 1:
        import torch.distributed as dist

        texts = [None] * world
        dist.all_gather_object(texts, describe(error) if error is not None else None)
    if error is not None:
        raise error
    failed = [(r, t) for r, t in enumerate(texts) if t is not None]
    if failed:
        r, t = failed[0]
        others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise RankError(f"{what} failed on rank {r}{others}: {t}")


@contextlib.contextmanager
def every_rank_raises(what: str) -> Iterator[None]:
    """``with every_rank_raises("loading the prompts"): ...`` on every rank: an error in the block on any rank
    is raised on all of them when the block ends (``raise_if_any``), instead of leaving the others in a collective."""
    error: BaseException | None = None
    try:
        yield
    except Exception as exn:
        error = exn
    raise_if_any(error, what)


def end_process_group() -> None:
    """After a run that finished on every rank: wait for the others, then destroy the default process group.

    Left to the interpreter's exit, the backend's threads can be torn down while still joinable and the
    process aborts (``terminate called without an active exception``, status -6) after a successful run,
    which torchrun and SLURM report as a failed job. The barrier keeps a fast rank from closing its
    connections while a slower one still finishes its last collective.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
