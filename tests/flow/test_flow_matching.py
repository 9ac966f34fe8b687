"""The flow-matching (SD3) conversion: Euler in our time == diffusers' scheduler loop and StableDiffusion3Pipeline."""

from __future__ import annotations

import pytest
import torch

from instaflow.flow.flow_matching import Conditioning, FlowMatchingVelocity, flow_matching_time_grid
from instaflow.flow.guidance import guided
from instaflow.flow.solvers import sample_euler

TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
                pos_embed_max_size=16)


@pytest.fixture(scope="module")
def tiny_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**TINY_SD3).eval()
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g))
    uncond = Conditioning(torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g))
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    return transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), cond, uncond, x0


def ours(transformer, scheduler, cond, uncond, x0, steps, w, path=None):
    ts = flow_matching_time_grid(scheduler, steps)
    assert float(ts[0]) == 0.0 and float(ts[-1]) == 1.0
    return sample_euler(guided(FlowMatchingVelocity(transformer), cond, uncond, w), x0, ts, path)


@pytest.mark.parametrize("steps,w", [(1, 1.0), (4, 1.0), (4, 5.0), (28, 7.0)])
def test_euler_in_our_time_is_the_schedulers_loop(tiny_sd3, steps, w):
    """The SD3 pipeline's denoising loop written out (CFG on the doubled batch, ``scheduler.step``)."""
    transformer, scheduler, cond, uncond, x0 = tiny_sd3
    scheduler.set_timesteps(steps)
    x = x0.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if w > 1:
                out = transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(4),
                                  encoder_hidden_states=torch.cat([uncond.states, cond.states]),
                                  pooled_projections=torch.cat([uncond.pooled, cond.pooled]), return_dict=False)[0]
                u, c = out.chunk(2)
                out = u + w * (c - u)
            else:
                out = transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=cond.states,
                                  pooled_projections=cond.pooled, return_dict=False)[0]
            x = scheduler.step(out, t, x, return_dict=False)[0]
    path: list = []
    got = ours(transformer, scheduler, cond, uncond, x0, steps, w, path)
    torch.testing.assert_close(got, x, atol=1e-5, rtol=0)
    assert len(path) == steps + 1 and torch.equal(path[0][1], x0)


def test_euler_in_our_time_is_the_sd3_pipeline(tiny_sd3):
    """diffusers' StableDiffusion3Pipeline on the same transformer, embeddings and noise (latents out)."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    transformer, scheduler, cond, uncond, x0 = tiny_sd3
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[4, 8],
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        layers_per_block=1, norm_num_groups=2, sample_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    for steps, w in ((1, 1.0), (6, 4.5)):
        theirs = pipe(prompt_embeds=cond.states, pooled_prompt_embeds=cond.pooled,
                      negative_prompt_embeds=uncond.states, negative_pooled_prompt_embeds=uncond.pooled,
                      latents=x0.clone(), num_inference_steps=steps, guidance_scale=w, output_type="latent",
                      height=16, width=16).images
        torch.testing.assert_close(ours(transformer, scheduler, cond, uncond, x0, steps, w), theirs, atol=1e-5, rtol=0)


def test_velocity_sign_and_timestep():
    """v = -(noise - data) = data - noise along x_t = t data + (1 - t) noise, fed sigma * 1000."""
    seen = {}

    class Oracle(torch.nn.Module):  # predicts noise - data exactly for a known pair
        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
            seen["timestep"] = timestep
            return (noise - data,)

    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.25, 0.9])
    v = FlowMatchingVelocity(Oracle())(t[:, None, None, None] * data + (1 - t[:, None, None, None]) * noise, t,
                                      Conditioning(torch.zeros(3, 1, 1)))
    torch.testing.assert_close(v, data - noise)
    torch.testing.assert_close(seen["timestep"], torch.tensor([1000.0, 750.0, 100.0]))
