"""Shared test fixtures: a tiny Stable Diffusion built in-process, never downloaded.

The components follow diffusers' own pipeline tests (``get_dummy_components``) and the tokenizer
follows transformers' CLIP tokenizer tests (a small vocab.json / merges.txt written to disk).
Everything is small enough to run on one CPU thread in milliseconds.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared with a training job: stay on one core

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from instaflow.flow.diffusion import SD_SCHEDULE  # noqa: E402  (SD 1.x's scaled-linear DDPM schedule)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_rank_device_mesh():
    """A 1-process gloo group and its (data_parallel, tensor_parallel) mesh: FSDP2 in-process on CPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def tiny_coupling_batch() -> dict:
    """Four seeded couplings of the tiny SD's latent shape, (4, 4, 8, 8) each, with captions."""
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.randn(4, 4, 8, 8, generator=g), "x1": torch.randn(4, 4, 8, 8, generator=g),
            "caption": ["a red circle", "a blue square", "a cat", "a dog"]}


@contextmanager
def reference_and_sharded(module_cls, **kw):
    """(reference module, its loss on ``tiny_coupling_batch``, the same module sharded by FSDP2 on a one-rank
    mesh with the bf16 policy and activation checkpointing, the batch): what the FSDP2 unit tests compare."""
    ref = module_cls(**kw)
    ref.configure_model()
    batch = tiny_coupling_batch()
    ref_loss = ref.loss(batch, torch.Generator(), 0.0)
    with one_rank_device_mesh() as mesh:
        model = module_cls(**kw, fsdp_mixed_precision="bf16", activation_checkpointing=True)
        model._device_mesh = mesh
        model.configure_model()
        yield ref, ref_loss, model, batch



CROSS_ATTENTION_DIM = 8
TOKENIZER_MAX_LENGTH = 77


def write_tiny_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt for a CLIP BPE tokenizer over lower-case letters (ids < 1000)."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges = ["l o", "lo w</w>", "e r</w>", "t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>"]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    tokens += ["".join(m.split()) for m in merges]  # the merged symbols must be in the vocab
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def build_tiny_sd(tmp_dir: Path) -> dict:
    """The tiny SD of diffusers' StableDiffusionPipeline tests, built deterministically."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM, norm_num_groups=2, attention_head_dim=2,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=2, sample_size=16,
    ).eval()
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=CROSS_ATTENTION_DIM, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=8, layer_norm_eps=1e-5,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    vocab_file, merges_file = write_tiny_clip_vocab(Path(tmp_dir) / "clip_vocab")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TOKENIZER_MAX_LENGTH)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler_config": dict(SD_SCHEDULE)}


@pytest.fixture
def sd_schedule() -> dict:
    """SD 1.x's DDPM scheduler config (a fresh copy)."""
    return dict(SD_SCHEDULE)


@pytest.fixture
def tiny_sd_components(tmp_path) -> dict:
    """dict(unet, vae, text_encoder, tokenizer, scheduler_config) of a fresh tiny SD (seed 0)."""
    return build_tiny_sd(tmp_path)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """A diffusers pipeline folder holding the tiny SD (unet/ vae/ scheduler/ text_encoder/ tokenizer/).

    Built with the same seeds as ``tiny_sd_components``, so its weights equal a fresh build.
    """
    from instaflow.models import saving

    root = tmp_path_factory.mktemp("tiny_sd")
    comps = build_tiny_sd(root / "build")
    folder = saving.save_pipeline(root / "pipeline", comps["unet"], comps["vae"], comps["scheduler_config"])
    comps["text_encoder"].save_pretrained(folder / "text_encoder")
    comps["tokenizer"].save_pretrained(folder / "tokenizer")
    return folder


TINY_VAE = {  # 16x16 RGB -> 8x8x4, the tiny SD's VAE as a config
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 16,
    "block_out_channels": [4, 8], "layers_per_block": 1, "norm_num_groups": 2,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
}
TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [4, 8], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": CROSS_ATTENTION_DIM, "norm_num_groups": 2, "attention_head_dim": 2,
}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Tiny embedded-world shards at 16 px: train (4 shards x 16) and val (1 x 16), brace patterns."""
    from types import SimpleNamespace

    from data.shapes import brace_pattern, write_split

    root = tmp_path_factory.mktemp("tiny_world")
    write_split(root, "train", 64, samples_per_shard=16, seed=0, resolution=16, progress=False)
    write_split(root, "val", 16, samples_per_shard=16, seed=0, resolution=16, progress=False)
    return SimpleNamespace(root=root, train=brace_pattern(root / "train", 4), val=brace_pattern(root / "val", 1))


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIP saved as a local model folder (model, tokenizer, image processor): ``ClipScore(model=...)``."""
    from tests.evaluation.test_coco import tiny_clip

    root = tmp_path_factory.mktemp("clip")
    model, tok, proc = tiny_clip(root)
    folder = root / "tiny-clip"
    for part in (model, tok, proc):
        part.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory) -> Path:
    """CLIP-L and CLIP-G stand-ins (8-wide, projections of 4: states 16 = joint_attention_dim, pooled 8), no T5
    (the pipeline then uses zeros for its tokens, as SD3 allows), a tiny VAE with a shift factor, shift 3.0."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from tests.flow.test_flow_matching import TINY_SD3

    root = tmp_path_factory.mktemp("sd3")
    vocab, merges = write_tiny_clip_vocab(root / "vocab")
    torch.manual_seed(0)
    text = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=1000,
                max_position_embeddings=77, projection_dim=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY_SD3), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[4, 8],
                          down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                          layers_per_block=1, norm_num_groups=2, sample_size=16, scaling_factor=1.5,
                          shift_factor=0.1),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer=CLIPTokenizer(str(vocab), str(merges), model_max_length=77),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer_2=CLIPTokenizer(str(vocab), str(merges), model_max_length=77),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory) -> Path:
    """Two 8-wide CLIP stand-ins (states 16 = cross_attention_dim; the second's projection of 4 is the pooled
    text), a text_time UNet (4 + 6 x 8 added inputs), DPM-Solver++ as ours configures it, a tiny VAE."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from instaflow.flow.diffusion import SD_SCHEDULE
    from instaflow.flow.solvers import dpm_solver_scheduler

    root = tmp_path_factory.mktemp("sdxl")
    vocab, merges = write_tiny_clip_vocab(root / "vocab")
    torch.manual_seed(0)
    text = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
                max_position_embeddings=77, projection_dim=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=4 + 6 * 8)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[4, 8],
                          down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                          layers_per_block=1, norm_num_groups=2, sample_size=16, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer=CLIPTokenizer(str(vocab), str(merges), model_max_length=77),
        tokenizer_2=CLIPTokenizer(str(vocab), str(merges), model_max_length=77),
        unet=unet, scheduler=dpm_solver_scheduler(SD_SCHEDULE, 25))
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="session")
def tiny_flux_folder(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev-like pipeline: CLIP (pooled 8) and T5 (states 16 = joint_attention_dim) stand-ins, a
    Unigram T5 tokenizer built offline, a guidance-embedding transformer on 2x2-packed 4-channel latents, the
    dynamic-shift scheduler, a tiny VAE with a shift factor."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    root = tmp_path_factory.mktemp("flux")
    vocab, merges = write_tiny_clip_vocab(root / "vocab")
    words = ["<pad>", "</s>", "<unk>"] + "a red blue circle square squares two in the center on white background".split()
    t5_tok = Tokenizer(models.Unigram([(w, -1.0) for w in words], unk_id=2))
    t5_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[4, 8],
                          down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                          layers_per_block=1, norm_num_groups=2, sample_size=16, scaling_factor=0.3611,
                          shift_factor=0.1159),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                                  num_hidden_layers=1, vocab_size=1000, max_position_embeddings=77,
                                                  bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        tokenizer=CLIPTokenizer(str(vocab), str(merges), model_max_length=77),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0)),
        tokenizer_2=T5TokenizerFast(tokenizer_object=t5_tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                    extra_ids=0),
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[2, 2, 4]))
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="session")
def tiny_sana_folder(tmp_path_factory) -> Path:
    """A tiny SANA pipeline: a 16-wide Gemma-2 stand-in (states 16 = caption_channels) with a character-level Gemma
    tokenizer built offline (vocab + no merges; it adds <bos> as Gemma does), a linear-attention transformer on
    (4, 8, 8) latents, a 3-level DC-AE (x4: 32 px images, SANA's minimum multiple) and FlowMatchEuler, shift 3."""
    import string

    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    root = tmp_path_factory.mktemp("sana")
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581", *string.ascii_lowercase]
    torch.manual_seed(0)
    blocks = dict(encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                  decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                  encoder_block_out_channels=(4, 8, 8), decoder_block_out_channels=(4, 8, 8),
                  encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                  encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1))
    pipe = SanaPipeline(
        tokenizer=GemmaTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], add_bos_token=True),
        text_encoder=Gemma2Model(Gemma2Config(hidden_size=16, intermediate_size=32, head_dim=8, num_attention_heads=2,
                                              num_key_value_heads=2, num_hidden_layers=1, vocab_size=len(vocab),
                                              max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                                              bos_token_id=2)),
        vae=AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, downsample_block_type="conv",
                          upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                          scaling_factor=0.41407, **blocks),
        transformer=SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                           num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                           cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
                                           sample_size=8),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"
