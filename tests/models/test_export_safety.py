"""``make export`` at scale (issue #24): an export is whole or absent (a failure or a kill -9 half way leaves the
previous folder), and ``check`` runs an export's own code only when that code is this project's, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, build_tiny_sd


def flow_model(folder: Path, shift: float = 0.0) -> Path:
    """A rectified-flow model folder (kind flow) of the tiny SD, its UNet weights moved by ``shift``."""
    from instaflow.flow.diffusion import SD_SCHEDULE
    from instaflow.models.saving import save_pipeline
    from instaflow.models.text_encoder import TextEncoder

    c = build_tiny_sd(folder.parent / f"build_{folder.name}")
    with torch.no_grad():
        for p in c["unet"].parameters():
            p.add_(shift)
    return save_pipeline(folder, c["unet"], c["vae"], dict(SD_SCHEDULE), max_length=77, kind="flow",
                         text_encoder_module=TextEncoder(c["tokenizer"], c["text_encoder"], max_length=77))


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("flow_models")
    return flow_model(root / "a"), flow_model(root / "b", shift=0.01)


def test_an_export_failing_half_way_leaves_the_previous_export_whole(models, tmp_path, monkeypatch):
    """The scheduler is saved after the UNet, VAE and text encoder: when it fails, the target still holds the
    previous export, byte for byte (it used to hold the new UNet beside the old model_index.json), and a fresh
    target holds nothing (no model_index.json, the Makefile's "done")."""
    from diffusers import DDPMScheduler

    from instaflow.models.export import export

    a, b = models
    out = export(str(a), tmp_path / "export")
    before = contents(out)
    assert "model_index.json" in before and "unet/diffusion_pytorch_model.safetensors" in before

    def fail(self, *args, **kwargs):
        raise OSError("planted: the disk filled up while writing scheduler/")

    monkeypatch.setattr(DDPMScheduler, "save_pretrained", fail)
    with pytest.raises(OSError, match="planted"):
        export(str(b), tmp_path / "export")
    assert contents(out) == before
    with pytest.raises(OSError, match="planted"):
        export(str(b), tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # nothing at "fresh", no temporary folder
    monkeypatch.undo()
    export(str(b), tmp_path / "export")  # and the next export replaces the old one whole
    after = contents(out)
    assert after.keys() == before.keys()
    assert after["unet/diffusion_pytorch_model.safetensors"] != before["unet/diffusion_pytorch_model.safetensors"]
    assert str(tmp_path / "export") in after["README.md"].decode() and ".tmp-" not in after["README.md"].decode()


KILLED = r"""
import sys, time
from pathlib import Path
from diffusers import DDPMScheduler
from instaflow.models.export import export

def stall(self, *args, **kwargs):  # the moment of the kill: UNet, VAE, text encoder written; scheduler not yet
    Path(sys.argv[3]).touch()
    time.sleep(120)

DDPMScheduler.save_pretrained = stall
export(sys.argv[1], sys.argv[2])
"""


def test_a_kill_9_during_an_export_leaves_the_old_folder(models, tmp_path):
    """A real SIGKILL in the middle of writing: the previous export is intact; the next export cleans up after
    the dead one and completes."""
    from instaflow.models.export import export

    a, b = models
    out = export(str(a), tmp_path / "export")
    before = contents(out)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(b), str(out), str(ready)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert contents(out) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".export.tmp-")]
    assert len(leftovers) == 1  # the dead export's half-written folder, beside the target
    export(str(b), out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]
    assert contents(out)["unet/diffusion_pytorch_model.safetensors"] != before["unet/diffusion_pytorch_model.safetensors"]


def test_check_refuses_an_export_whose_code_is_not_the_projects(models, tmp_path, monkeypatch):
    """check() loads with trust_remote_code=True only after verifying the folder's code is byte for byte
    rf_pipeline.py (and stacked_unet.py): a tampered pipeline file, an extra Python file or a model_index.json
    naming other code is refused with a message, and the planted code never runs."""
    from instaflow.models.export import UntrustedExportCode, check, export, verify_own_code

    a, _ = models
    out = export(str(a), tmp_path / "export")
    verify_own_code(out)  # the project's own export passes
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    ran = tmp_path / "planted_code_ran"
    original = (out / "pipeline_rectified_flow.py").read_text()
    (out / "pipeline_rectified_flow.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n" + original)
    with pytest.raises(UntrustedExportCode, match="pipeline_rectified_flow.py is not this project's"):
        check(str(a), out, "a red circle", 1, 1.0)
    assert not ran.exists()

    (out / "pipeline_rectified_flow.py").write_text(original)
    (out / "text_encoder" / "helper.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    with pytest.raises(UntrustedExportCode, match="text_encoder/helper.py"):
        check(str(a), out, "a red circle", 1, 1.0)
    (out / "text_encoder" / "helper.py").unlink()

    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "vae": ["my_vae", "AutoencoderKL"]}))
    with pytest.raises(UntrustedExportCode, match="names code 'my_vae' for 'vae'.*instaflow.tools.export"):
        check(str(a), out, "a red circle", 1, 1.0)
    assert not ran.exists()
