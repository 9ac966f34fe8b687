"""The Export callback at scale (issue #24): rank 0's export failing is raised on every rank, and an export is
written beside its target and renamed into place whole (a failure half way leaves the previous one)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.callbacks.rank_worker import PLANTED_EXPORT, launch

ONE = SimpleNamespace(is_global_zero=True, broadcast=lambda obj, src=0: obj, barrier=lambda *a: None)  # one process


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_error_exporting_the_best_checkpoint_on_rank_zero_is_raised_on_every_rank(tmp_path):
    """Export(weights=best) writes on rank 0 alone; when that fails, both ranks end within 60 s naming the planted
    error (rank 1 used to wait in a barrier until the collective timed out), and nothing is left at the target."""
    ranks = launch("export", tmp_path, "")
    for r, res in enumerate(ranks):
        assert res["rc"] != 0 and res["seconds"] < 60, (r, res["seconds"], res["out"][-3000:])
        assert PLANTED_EXPORT in res["out"], (r, res["out"][-3000:])
    assert "RankError: Export(weights=best): exporting" in ranks[1]["out"]
    assert f"failed on rank 0: OSError: {PLANTED_EXPORT}" in ranks[1]["out"]
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export.*"))


def test_a_student_export_failing_half_way_leaves_the_previous_export(tiny_sd_folder, tmp_path, monkeypatch):
    """FlowStudent.export writes the UNet, VAE, scheduler, then the text encoder: when that fails, the target
    still holds the previous export byte for byte, and a fresh target holds nothing (no model_index.json)."""
    from transformers import CLIPTextModel

    from callbacks.export import Export
    from lightning_modules.reflow import ReflowTraining

    module = ReflowTraining(init=str(tiny_sd_folder), parameterization="flow")
    module.configure_model()
    trainer = SimpleNamespace(strategy=ONE, is_global_zero=True, callbacks=[])
    Export(str(tmp_path / "export"))._export(trainer, module)
    before = contents(tmp_path / "export")
    assert "model_index.json" in before and "text_encoder/config.json" in before

    with torch.no_grad():  # other weights: a partial overwrite would show
        for p in module.unet.parameters():
            p.add_(0.01)

    def fail(self, *args, **kwargs):
        raise OSError("planted: the disk filled up while writing text_encoder/")

    monkeypatch.setattr(CLIPTextModel, "save_pretrained", fail)
    for target in ("export", "fresh"):
        with pytest.raises(OSError, match="planted"):
            Export(str(tmp_path / target))._export(trainer, module)
    assert contents(tmp_path / "export") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # nothing at "fresh", no temporary folder


def test_a_module_exporting_one_part_keeps_the_rest_of_the_folder(tmp_path):
    """The VAE trainer writes dirpath/vae beside a teacher's UNet: the new folder carries the other entries over."""
    from callbacks.export import write_export

    folder = tmp_path / "teacher"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(b"unet weights")
    (folder / "model_index.json").write_text("{}")
    (folder / "vae").mkdir()
    (folder / "vae" / "old.bin").write_bytes(b"old vae")

    class VaeOnly:
        def export(self, dirpath: str) -> Path:
            (Path(dirpath) / "vae").mkdir()
            (Path(dirpath) / "vae" / "new.bin").write_bytes(b"new vae")
            return Path(dirpath) / "vae"

    write_export(VaeOnly(), str(folder))
    assert contents(folder) == {"model_index.json": b"{}", "unet/weights.bin": b"unet weights",
                                "vae/new.bin": b"new vae"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
