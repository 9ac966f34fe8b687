"""Offline failures of the real path (issue 4): each missing resource gives one clear message.

Missing model id (an SD 1.5 experiment run offline), missing COCO files, missing CLIP model,
missing LPIPS backbone weights. Nothing here touches the network: HF_HUB_OFFLINE=1, an empty
TORCH_HOME and a download function that fails.
"""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch

from tests.conftest import ROOT

BASE = str(ROOT / "experiments" / "base" / "default.yaml")
SD15_ID = "runwayml/stable-diffusion-v1-5"


def cli(args: list[str]):
    from lightning_modules.cli import main

    return main(args, run=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty hub cache: nothing to fall back on
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.mark.parametrize("exp, key", [("pairs_teacher.yaml", "model"), ("reflow_part1.yaml", "init")])
def test_sd15_experiment_offline_names_the_model_and_the_fix(exp, key, tmp_path):
    from instaflow.models.loading import ModelNotFoundError

    c = cli(["-c", BASE, "-c", str(ROOT / "experiments" / "sd15" / exp),
             "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert c.model.hparams[key] == SD15_ID
    with pytest.raises(ModelNotFoundError) as info:
        c.model.configure_model()  # weights load here, not at parse time
    msg = str(info.value)
    assert SD15_ID in msg and "nothing could be downloaded" in msg and "HF_HUB_OFFLINE=1" in msg
    assert f"huggingface-cli download {SD15_ID} --local-dir DIR" in msg and "point the config at it" in msg


def test_missing_clip_model_offline():
    from instaflow.evaluation import coco
    from instaflow.models.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError) as info:
        coco.ClipScorer.from_pretrained(coco.DEFAULT_CLIP)
    msg = str(info.value)
    assert "openai/clip-vit-large-patch14" in msg and "CLIP model" in msg and "nothing could be downloaded" in msg


def test_missing_coco_annotations_fail_before_any_model_loads(tmp_path, capsys):
    from instaflow.evaluation import coco
    from instaflow.tools import coco as coco_tool

    missing = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    # the model id does not exist either: the COCO check must come first, with its own message
    args = ["--model", "nobody/no-model", "--annotations", str(missing), "--images", str(tmp_path / "val2017"),
            "--out", str(tmp_path / "out")]
    with pytest.raises(coco.CocoFilesMissing) as info:
        coco_tool.main(args)
    msg = str(info.value)
    assert str(missing) in msg and "coco2017_5k" in msg
    assert "http://images.cocodataset.org/annotations/annotations_trainval2017.zip" in msg
    assert "--annotations PATH" in msg


def test_missing_coco_images_fail_before_any_model_loads(tmp_path):
    from instaflow.evaluation import coco

    ann = tmp_path / "captions_val2014.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"}],
                               "annotations": [{"id": 7, "image_id": 1, "caption": "a dog"}]}))
    with pytest.raises(coco.CocoFilesMissing) as info:
        coco.evaluate("nobody/no-model", tmp_path / "out", ann, tmp_path / "val2014", "coco2014_30k", n=1)
    msg = str(info.value)
    assert str(tmp_path / "val2014") in msg and "http://images.cocodataset.org/zips/val2014.zip" in msg
    assert "--images PATH" in msg and not (tmp_path / "out").exists()


def test_missing_lpips_backbone_weights(monkeypatch, tmp_path):
    """LPIPS-VGG with an empty TORCH_HOME and no network: the distillation's perceptual loss says what to do."""
    from instaflow.models import perceptual

    attempts = []

    def no_network(url, dst, *a, **k):
        attempts.append((url, dst))
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as info:
        perceptual.PerceptualLoss("lpips_vgg")
    msg = str(info.value)
    assert "LPIPS-vgg needs torchvision's pretrained VGG backbone" in msg
    assert "hub/checkpoints" in msg and "vae_encoder" in msg and "no network (test)" in msg
    # it looked where the message says: $TORCH_HOME/hub/checkpoints, for torchvision's VGG16 file
    (url, dst), = attempts
    assert "vgg16" in url and str(dst).startswith(str(tmp_path / "torch_home" / "hub" / "checkpoints"))


def test_distill_part2_offline_fails_at_configure_model_with_the_lpips_message(monkeypatch, tmp_path, tiny_sd_folder):
    """The sd15 LPIPS stage, tiny SD swapped in: the missing backbone is the one error, at configure_model."""
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("no network (test)")))
    sd15 = ROOT / "experiments" / "sd15"
    c = cli(["-c", BASE, "-c", str(sd15 / "distill_part1.yaml"), "-c", str(sd15 / "distill_part2.yaml"),
             "--model.init_args.init", str(tiny_sd_folder), "--trainer.default_root_dir", str(tmp_path),
             "--trainer.logger", "false"])
    with pytest.raises(RuntimeError, match=r"LPIPS-vgg needs .*\$TORCH_HOME/hub/checkpoints"):
        c.model.configure_model()
