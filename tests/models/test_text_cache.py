"""The text-state cache (issue #24): in CPU memory, bounded by bytes, outputs equal to encoding every time.

Before, ``text_cache_size=100_000`` entries were kept on the accelerator: about 24 GB for SD 1.5 (77 x 768
fp32 states a caption) hours into a LAION run, whose captions rarely repeat.
"""

from __future__ import annotations

import pytest
import torch

from instaflow.experiments import resolved
from instaflow.models.text_encoder import TextEncoder

WORDS = ["a cat", "the dog", "lower", "", "cat a", "dog the", "a low", "the cat", "zebra", "a dog", "low cat"]


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def test_the_cache_holds_at_most_its_byte_budget_on_cpu_and_changes_no_output(tiny_sd_components):
    tok, model = tiny_sd_components["tokenizer"], tiny_sd_components["text_encoder"]
    plain = TextEncoder(tok, model, max_length=16)
    entry = 16 * 8 * 4  # L x D x fp32 bytes of one caption's states
    budget = 3 * entry + 100  # room for three entries, not four
    cached = TextEncoder(tok, model, max_length=16, cache_mb=budget / 2**20)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        batch = [WORDS[i] for i in torch.randint(len(WORDS), (4,), generator=g).tolist()]
        torch.testing.assert_close(cached(batch), plain(batch), atol=1e-6, rtol=0)
        held = list(cached._cache.values())
        assert 0 < cached.cache_bytes <= budget and len(held) <= 3
        assert cached.cache_bytes == sum(_storage_bytes(t) for t in held)  # copies, not views pinning a batch
        assert all(t.device.type == "cpu" and t.shape == (16, 8) for t in held)
    hit = cached([batch[-1]])  # the newest caption: served from the cache, exactly the stored states
    assert torch.equal(hit[0], cached._cache[batch[-1]])


def test_states_under_autocast_are_cached_apart_from_fp32_ones(tiny_sd_components):
    tok, model = tiny_sd_components["tokenizer"], tiny_sd_components["text_encoder"]
    plain = TextEncoder(tok, model, max_length=16)
    cached = TextEncoder(tok, model, max_length=16, cache_mb=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cached(["a cat"])
        torch.testing.assert_close(low, plain(["a cat"]), atol=0, rtol=0)
    torch.testing.assert_close(cached(["a cat"]), plain(["a cat"]), atol=0, rtol=0)  # fp32, not the bf16 entry
    assert len(cached._cache) == 2


def test_a_zero_budget_caches_nothing(tiny_sd_components):
    tok, model = tiny_sd_components["tokenizer"], tiny_sd_components["text_encoder"]
    enc = TextEncoder(tok, model, max_length=16, cache_mb=0)
    enc(["a cat", "the dog"])
    assert not enc._cache and enc.cache_bytes == 0


def test_a_student_builds_its_encoder_with_the_megabyte_budget(tiny_sd_folder):
    from lightning_modules.reflow import ReflowTraining

    model = ReflowTraining(str(tiny_sd_folder), parameterization="velocity_wrapper", text_cache_mb=0.5)
    model.configure_model()
    assert model.text_encoder.cache_mb == 0.5 and model.text_encoder.caching


@pytest.mark.parametrize("name", ["sd15/reflow_part1", "sd15/reflow_part2", "sd15/distill_part1",
                                  "sd15/distill_part2", "sdxl/reflow", "sd3/distill", "flux/reflow"])
def test_laion_recipes_do_not_cache_text_states(name):
    """LAION captions rarely repeat: the SD 1.5 recipes (and the families' files that extend them) cache none."""
    assert resolved(name)["model"]["init_args"]["text_cache_mb"] == 0


def test_the_embedded_chain_keeps_its_captions_cached():
    """The embedded world repeats its 2000 training prompts: 48 x 384 fp32 states (74 KB) each fit the default."""
    from lightning_modules.student import FlowStudent
    import inspect

    default = inspect.signature(FlowStudent.__init__).parameters["text_cache_mb"].default
    assert "text_cache_mb" not in resolved("embedded/reflow")["model"]["init_args"]
    assert default * 2**20 >= 2000 * 48 * 384 * 4
