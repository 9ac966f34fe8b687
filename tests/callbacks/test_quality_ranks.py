"""Quality at scale (issue #24): score names that agree on every rank whatever block a rank scores, rank 0's
work failing loudly on every rank, and a quality.jsonl cut by a kill that does not stop a resume.

The 2-rank cases are real Lightning fits (DDP, gloo, CPU) of a stand-in module, one process per rank
(``tests/callbacks/rank_worker.py``); the one-process numbers come from the same callback in this process.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.callbacks import rank_worker
from tests.callbacks.rank_worker import N, PLANTED_REFERENCE, BlockPrompts, StandIn, launch
from tests.callbacks.test_quality import TinyFeatures


@pytest.fixture(scope="module")
def val32(tmp_path_factory) -> str:
    """16 embedded val samples at 32 px (the committed evaluator's size): two hold three objects."""
    from data.shapes import brace_pattern, write_split

    root = tmp_path_factory.mktemp("val32")
    write_split(root, "val", 16, samples_per_shard=16, seed=0, resolution=32, progress=False)
    return brace_pattern(root / "val", 1)


def one_process(shards: str, root: Path) -> dict:
    """What Quality logs at step 0 on one process for the same prompts and images."""
    cb = rank_worker.quality(BlockPrompts, shards, root)
    logged = []
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj, is_global_zero=True, root_device=torch.device("cpu"))
    trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=0, callback_metrics={}, log_dir=str(root),
                              default_root_dir=str(root), strategy=strategy, callbacks=[],
                              loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append(m))])
    module = StandIn(shards)
    cb.setup(trainer, module, "fit")
    cb._score(trainer, module)
    return logged[0]


def test_per_object_alignment_on_two_ranks_equals_one_process(val32, tmp_path):
    """Rank 1's prompts hold no three-object (nor two-object) scene: both ranks still gather the same names, in
    the same order, and log one process's FID and alignment per object count (it used to hang or mix names)."""
    counts = [len(m["scene"]["objects"]) for m in BlockPrompts(val32, n=N, resolution=32).load().meta]
    assert 3 in counts[:N // 2] and set(counts[N // 2:]) == {1}  # the premise: the blocks' counts differ

    ranks = launch("alignment", tmp_path / "ddp", val32)
    assert [r["rc"] for r in ranks] == [0, 0], ranks[0]["out"][-3000:] + ranks[1]["out"][-3000:]
    (line,) = next((tmp_path / "ddp" / "logs" / "run").glob("version_*/quality.jsonl")).read_text().splitlines()
    got = json.loads(line)
    want = one_process(val32, tmp_path / "one")
    names = {k for k in want if "seconds" not in k}
    assert names == {"quality/fid_euler1_w1", "quality/alignment_euler1_w1"} | {
        f"quality/alignment_euler1_w1_{k}obj" for k in (1, 2, 3)}
    assert got["step"] == 0 and names <= set(got["metrics"])
    for k in names:
        assert got["metrics"][k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    per_count = {want[f"quality/alignment_euler1_w1_{k}obj"] for k in (1, 2, 3)}
    assert len(per_count) == 3  # distinct values: a pairing of one rank's name with another's would show


def test_score_names_that_differ_between_ranks_raise_on_every_rank():
    """The names' check is one all-gather of a digest: every rank sees the others' and raises, saying what to do
    (a score named after the rank's own prompts would otherwise pair wrong values or hang)."""
    from callbacks.quality import same_names_on_every_rank

    cpu = torch.device("cpu")

    def digest(names: list[str]) -> torch.Tensor:  # what this rank contributes to the all-gather
        sent = []
        same_names_on_every_rank(SimpleNamespace(global_rank=0, strategy=SimpleNamespace(
            all_gather=lambda t: sent.append(t) or t[None])), cpu, names)
        return sent[0]

    def rank(r: int, *per_rank: list[str]) -> SimpleNamespace:  # rank r of a group whose ranks hold per_rank
        gathered = torch.stack([digest(names) for names in per_rank])
        return SimpleNamespace(global_rank=r, strategy=SimpleNamespace(all_gather=lambda t: gathered))

    mine, theirs = ["__features", "alignment", "alignment@3obj"], ["__features", "alignment", "alignment@1obj"]
    for r in (0, 1):
        same_names_on_every_rank(rank(r, mine, mine), cpu, mine)  # the same names: nothing raised
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] differ from rank 0.*bind\(prompts\)"):
            same_names_on_every_rank(rank(r, mine, theirs), cpu, (mine, theirs)[r])
    with pytest.raises(RuntimeError, match="differ"):  # the order counts too: values are gathered name by name
        same_names_on_every_rank(rank(0, mine, mine[::-1]), cpu, mine)


def test_an_error_building_the_fid_reference_on_rank_zero_is_raised_on_every_rank(val32, tmp_path):
    """Rank 0 builds the reference alone; when that fails, both ranks end within 60 s naming the planted error
    (rank 1 used to wait in a broadcast until the collective timed out)."""
    ranks = launch("reference", tmp_path, val32)
    for r, res in enumerate(ranks):
        assert res["rc"] != 0 and res["seconds"] < 60, (r, res["seconds"], res["out"][-3000:])
        assert PLANTED_REFERENCE in res["out"], (r, res["out"][-3000:])
    assert "RankError: Quality: the FID and scores of euler1_w1 failed on rank 0: ValueError: " + PLANTED_REFERENCE \
        in ranks[1]["out"]


def test_a_cut_last_line_of_quality_jsonl_is_dropped_on_resume_and_the_curve_goes_on(tmp_path, capsys):
    """A kill in the middle of an older append left half a line: the resumed run drops it with a message,
    keeps the points up to its checkpoint, and appends its next point to a readable file."""
    from callbacks.quality import Quality

    path = tmp_path / "quality.jsonl"
    points = [{"step": s, "metrics": {"quality/fid_euler1_w1": float(s)}} for s in (0, 160, 320)]
    path.write_text("".join(json.dumps(p) + "\n" for p in points) + '{"step": 480, "metrics": {"quality/fi')
    one = SimpleNamespace(is_global_zero=True, broadcast=lambda obj, src=0: obj)
    trainer = SimpleNamespace(log_dir=str(tmp_path), strategy=one, global_step=160, loggers=[])
    cb = Quality(BlockPrompts("unused", n=2), TinyFeatures())
    cb.on_train_start(trainer, None)  # a resume at step 160
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 160]
    assert "skipped 1 unreadable line(s)" in capsys.readouterr().out

    path.write_text(path.read_text() + '{"step": 2')  # cut again, then the next scoring appends
    Quality._record(SimpleNamespace(global_step=200, loggers=[]), {"quality/fid_euler1_w1": 2.0}, str(tmp_path))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 160, 200]
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out
