"""Memory planning: the architecture files rebuild each family with its published parameter count."""

from __future__ import annotations

import pytest

from instaflow.tools import memory

# parameter counts of the released checkpoints (their safetensors headers; the model cards round them)
PUBLISHED = {
    "sd15": (859_520_964, {"text_encoder": 123_060_480}),
    "sdxl": (2_567_463_684, {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
    "sd3_medium": (2_028_328_000, {"text_encoder_3": 4_762_310_656}),
    "flux_dev": (11_901_408_320, {"text_encoder_2": 4_762_310_656}),
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_architectures_rebuild_the_published_parameter_counts(family):
    c = memory.count(family, lora_rank=4)
    denoiser, encoders = PUBLISHED[family]
    assert c["denoiser"] == denoiser
    assert {k: c["frozen"][k] for k in encoders} == encoders
    assert 0 < c["lora"] < 0.01 * denoiser


def test_plan_bytes_follow_the_stated_rule():
    c = {"denoiser": 1000, "frozen": {"a": 200, "b": 56}, "lora": 10, "lora_rank": 4}
    p = memory.plan(c, gpus=8)
    gib = 2 ** 30
    assert p["ddp"] == round((4 * 256 + 16 * 1000) / gib, 1)
    c = {"denoiser": 2 * gib, "frozen": {"a": gib}, "lora": gib // 8, "lora_rank": 4}
    p = memory.plan(c, gpus=8)
    assert p == {"ddp": 36.0, "fsdp2_8": 8.0, "lora_ddp": 14.0}  # 4 + 32; 4 + 32/8; 4 + 8 + 2
    assert "| Stable Diffusion 1.5 |" in memory.table([{**memory.count("sd15", 16), "plan": p}], 8)
