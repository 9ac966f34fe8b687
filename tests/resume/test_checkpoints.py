"""instaflow.resume.checkpoints and .refusals: nothing unpickles code, cut or incomplete checkpoints are named,
NaN/inf is found.

The planted files carry a pickle whose loading would create a file (``PAYLOAD``): each test checks
both the refusal (its message names the file) and that the file was never created.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from instaflow.resume import checkpoints as ck
from instaflow.resume import refusals


class Payload:
    """Unpickling this creates ``path`` (a stand-in for any code a planted checkpoint could run)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def plant_file(path: Path, marker: Path) -> Path:
    torch.save({"global_step": 500, "state_dict": {}, "x": Payload(marker)}, path)
    return path


def dcp_folder(folder: Path, step: int = 7, weight: torch.Tensor | None = None) -> Path:
    """A distributed checkpoint folder as Lightning's FSDP2 strategy writes it: DCP shards + meta.pt."""
    import torch.distributed.checkpoint as dcp

    w = torch.arange(12.0).reshape(3, 4) if weight is None else weight
    state = {"state_dict": {"unet.w": w}, "optimizer_0": {"state": {}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    with pytest.warns(UserWarning):  # no process group: DCP says it saves in one process
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": step, "callbacks": {"EMA": {"shadow": [w.clone()]}}}, folder / ck.META)
    return folder


def test_a_planted_checkpoint_file_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = plant_file(tmp_path / "last.ckpt", marker)
    for read in (ck.checkpoint_step, ck.read_checkpoint, ck.checkpoint_meta):
        with pytest.raises(ck.UnsafeCheckpoint, match=f"{evil}.*not a plain checkpoint.*(GLOBAL|global).*mkdir"):
            read(evil)
    assert not marker.exists()


def test_a_planted_meta_pt_in_a_checkpoint_folder_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    folder = dcp_folder(tmp_path / "last.ckpt")
    plant_file(folder / ck.META, marker)
    for read in (ck.checkpoint_step, ck.read_checkpoint):
        with pytest.raises(ck.UnsafeCheckpoint, match="meta.pt is not a plain checkpoint"):
            read(folder)
    assert not marker.exists()


def test_a_planted_dcp_metadata_is_refused_before_torch_reads_it(tmp_path):
    """torch's DCP reader unpickles .metadata without restriction; ours allows only DCP's metadata classes."""
    marker = tmp_path / "payload_ran"
    folder = dcp_folder(tmp_path / "last.ckpt")
    (folder / ck.DCP_METADATA).write_bytes(pickle.dumps(Payload(marker)))
    for read in (ck.checkpoint_step, ck.read_checkpoint, ck.validate_folder):
        with pytest.raises(ck.UnsafeCheckpoint, match=r"\.metadata is not a plain checkpoint.*posix\.mkdir"):
            read(folder)
    assert not marker.exists()


def test_a_real_dcp_folder_validates_and_reads_back(tmp_path):
    folder = dcp_folder(tmp_path / "step=7.ckpt")
    assert ck.checkpoint_step(folder) == 7
    whole = ck.read_checkpoint(folder)
    assert torch.equal(whole["state_dict"]["unet.w"], torch.arange(12.0).reshape(3, 4))
    assert ck.checkpoint_weights(folder)["w"].shape == (3, 4)


def test_cut_files_and_incomplete_folders_are_unreadable_not_unsafe(tmp_path):
    good = tmp_path / "step=5.ckpt"
    torch.save({"global_step": 5, "state_dict": {"w": torch.ones(1000)}}, good)
    cut = tmp_path / "last.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a kill during a non-atomic copy
    with pytest.raises(ck.UnreadableCheckpoint, match="last.ckpt cannot be read.*cut"):
        ck.checkpoint_step(cut)
    folder = dcp_folder(tmp_path / "folder.ckpt")
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])  # a rank killed while writing its shard
    with pytest.raises(ck.UnreadableCheckpoint, match="incomplete.*distcp"):
        ck.validate_folder(folder)
    (folder / ck.DCP_METADATA).unlink()
    with pytest.raises(ck.UnreadableCheckpoint, match="not a complete distributed checkpoint"):
        ck.checkpoint_step(folder)


def test_first_non_finite_names_the_weight_or_the_ema_tensor():
    ok = {"global_step": 3, "state_dict": {"unet.a": torch.ones(2), "unet.b": torch.zeros(2, dtype=torch.long)},
          "callbacks": {"EMA": {"shadow": [torch.ones(2), torch.ones(3)]}}}
    assert refusals.first_non_finite(ok) is None
    bad_w = {**ok, "state_dict": {"unet.a": torch.ones(2), "unet.c": torch.tensor([1.0, float("inf")])}}
    assert refusals.first_non_finite(bad_w) == "unet.c"
    bad_ema = {**ok, "callbacks": {"EMA": {"shadow": [torch.ones(2), torch.tensor([0.0, float("nan"), 1.0])]}}}
    assert refusals.first_non_finite(bad_ema) == "callbacks['EMA']['shadow'][1]"
    with pytest.raises(refusals.NonFiniteCheckpoint, match=r"step 3 \(x\.ckpt\) holds NaN/inf in callbacks\['EMA'\]"):
        refusals.refuse_non_finite(bad_ema, "x.ckpt")


def test_non_finite_is_refused_on_every_rank_and_found_in_a_file(tmp_path):
    """On one process the every-rank refusal raises the rank's own error; a file on disk is named with its tensor."""
    bad = {"global_step": 4, "state_dict": {"unet.w": torch.tensor([1.0, float("nan")])}}
    with pytest.raises(refusals.NonFiniteCheckpoint, match=r"step 4 \(checked before saving\) holds NaN/inf in unet\.w"):
        refusals.refuse_non_finite_on_every_rank(bad, "checked before saving", "checking step 4")
    refusals.refuse_non_finite_on_every_rank({**bad, "state_dict": {"unet.w": torch.ones(2)}}, "x", "checking")
    torch.save(bad, tmp_path / "last.ckpt")
    assert refusals.non_finite_file(tmp_path / "last.ckpt") == f"{tmp_path / 'last.ckpt'} holds NaN/inf in unet.w"
    torch.save({**bad, "state_dict": {"unet.w": torch.ones(2)}}, tmp_path / "good.ckpt")
    assert refusals.non_finite_file(tmp_path / "good.ckpt") is None


def test_a_given_checkpoint_is_checked_before_lightning_reads_it(tmp_path):
    """``--ckpt_path``: a planted or cut file stops the launch naming it; Lightning's names (``last``) pass through."""
    marker = tmp_path / "payload_ran"
    evil = plant_file(tmp_path / "evil.ckpt", marker)
    with pytest.raises(SystemExit, match=r"\[checkpoint\] --ckpt_path: .*evil\.ckpt is not a plain checkpoint"):
        ck.check_given(str(evil))
    assert not marker.exists()
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03")
    with pytest.raises(SystemExit, match=r"--ckpt_path: .*cut\.ckpt cannot be read"):
        ck.check_given(str(tmp_path / "cut.ckpt"))
    ck.check_given("last")  # not a path: Lightning resolves it and loads it weights-only
    torch.save({"global_step": 2, "state_dict": {}}, tmp_path / "ok.ckpt")
    ck.check_given(str(tmp_path / "ok.ckpt"))
