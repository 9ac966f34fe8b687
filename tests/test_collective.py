"""instaflow.collective on real gloo process groups: an error on one rank is raised, named, on every rank."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from instaflow import collective

WORKER = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from instaflow import collective

    rank, world = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=world)

    class Strategy:  # what Lightning's strategies offer: broadcast(obj, src) and is_global_zero
        is_global_zero = rank == 0
        def broadcast(self, obj, src=0):
            box = [obj]
            dist.broadcast_object_list(box, src=src)
            return box[0]

    case = sys.argv[4]
    try:
        if case == "rank0":
            value = collective.on_rank_zero(Strategy(), lambda: 1 / 0 if sys.argv[5] == "fail" else 42, "the FID reference")
            print(f"rank {rank} value {value}", flush=True)
        else:
            with collective.every_rank_raises("loading the prompts"):
                if rank == world - 1:
                    raise FileNotFoundError("shard 7 is missing")
            print(f"rank {rank} ok", flush=True)
    except Exception as exn:
        print(f"rank {rank} raised {type(exn).__name__}: {exn}", flush=True)
        # exit at once: an interpreter shutdown racing gloo's threads can abort (SIGABRT) after the message
        os._exit(3)
    collective.end_process_group()  # as the CLI does: an exit with a live gloo group can abort (status -6)
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, *args: str) -> list[tuple[int, str]]:
    port = str(_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(world), port, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=120)
        out.append((p.returncode, text))
    return out


def test_rank_zero_value_reaches_every_rank():
    out = _run(3, "rank0", "ok")
    assert [rc for rc, _ in out] == [0, 0, 0], out
    assert all(f"rank {r} value 42" in text for r, (_, text) in enumerate(out))


def test_an_error_on_rank_zero_is_raised_on_every_rank_at_once():
    t0 = time.monotonic()
    out = _run(3, "rank0", "fail")
    assert time.monotonic() - t0 < 60  # not a collective timeout
    assert [rc for rc, _ in out] == [3, 3, 3], out
    assert "rank 0 raised ZeroDivisionError" in out[0][1]
    for r in (1, 2):
        assert f"rank {r} raised RankError: the FID reference failed on rank 0: ZeroDivisionError" in out[r][1]


def test_an_error_on_any_rank_is_raised_on_every_rank():
    out = _run(3, "all")
    assert [rc for rc, _ in out] == [3, 3, 3], out
    assert "rank 2 raised FileNotFoundError: shard 7 is missing" in out[2][1]
    for r in (0, 1):
        assert f"rank {r} raised RankError: loading the prompts failed on rank 2: FileNotFoundError" in out[r][1]


def test_single_process_passes_values_and_errors_through():
    class One:
        is_global_zero = True

        def broadcast(self, obj, src=0):
            return obj

    assert collective.on_rank_zero(One(), lambda: "v", "x") == "v"
    with pytest.raises(KeyError):
        collective.on_rank_zero(One(), lambda: {}["k"], "x")
    with pytest.raises(ValueError):
        with collective.every_rank_raises("x"):
            raise ValueError("mine")


def test_end_process_group_closes_the_group_after_a_finished_run_and_is_a_no_op_without_one():
    """The CLI closes the group itself after a run (left to the exit, gloo's threads could abort a successful
    rank with status -6, which the launcher reports as a failed job)."""
    import torch.distributed as dist

    from instaflow.collective import end_process_group

    end_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_process_group()
    assert not dist.is_initialized()
