"""Stage 1 (and the 2-RF's coupling stage): solve a model's ODE from seeded noise, keep (x0, x1, prompt).

Run through ``trainer.predict``; the ``callbacks.pair_writer.CouplingWriter`` callback writes the
couplings as WebDataset shards. The noise of each sample comes from its own seed on a CPU
generator, so a coupling can store the seed instead of the noise and any machine regenerates it.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import torch

from instaflow.contracts import Family
from instaflow.flow.guidance import check_guidance
from instaflow.flow.noise import sample_seed, seeded_noise
from instaflow.flow.solvers import check_steps
from instaflow.models.families import check_solver, load_family


class CouplingGeneration(L.LightningModule):
    """Teacher ODE solving: prompts in, couplings out (no training).

    The model is held as its family (``instaflow.models.families.load_family``, picked by the folder's
    ``model_index.json``): encode, then the family's ``solve``; nothing here depends on which family it is.

    Args:
        model: pipeline folder or hub id of the model whose ODE is solved.
        kind: "ddpm" for SD-style teachers (DPM-Solver++ through diffusers' scheduler), "flow"
            for rectified-flow models (our Euler/Heun, timestep 1000 (1 - t)), "ddpm_velocity"
            (a diffusion UNet trained through the velocity conversion: Euler/Heun), or
            "flow_matching" (an SD3 pipeline folder: Euler at its scheduler's shifted sigmas,
            ``instaflow.models.families``); default: what the model folder says.
        solver: "dpm_solver++" (ddpm), "euler" / "heun" (flow), "euler" (flow_matching).
        steps, guidance: ODE steps (>= 1) and classifier-free guidance w (finite, >= 0): out_u + w (out_c - out_u),
            applied for every w != 1 (w = 1 is the conditional model alone).
        base_seed: noise seeds are crc32("{base_seed}/{key}").
        store_noise: also write x0 itself (it can always be regenerated from the seed).
        store_text_states: also write the text encoder's token states (saves encoding later).
        bf16: bf16 autocast for text encoding and the UNet evaluations (the ODE state stays fp32).
        resolution: pixel size for families whose denoiser does not fix it (Flux; default 1024);
            SD, SDXL and SD3 read it from their UNet / transformer config.
        vae: another VAE (hub id or folder) to decode an SDXL teacher's couplings with, e.g. a local copy of
            the fp16-fixed ``madebyollin/sdxl-vae-fp16-fix`` (SDXL only; the couplings' x1 does not change).
    """

    def __init__(self, model: str, kind: str | None = None, solver: str = "dpm_solver++", steps: int = 25,
                 guidance: float = 5.0, base_seed: int = 0, store_noise: bool = False,
                 store_text_states: bool = False, bf16: bool = False, resolution: int | None = None,
                 vae: str | None = None) -> None:
        super().__init__()
        check_steps(steps)
        check_guidance(guidance)
        if kind is not None:
            check_solver(kind, solver)
        self.save_hyperparameters()
        self.pipe: Family | None = None

    def configure_model(self) -> None:
        if self.pipe is None:
            h = self.hparams
            self.pipe = load_family(h.model, kind=h.kind, resolution=h.resolution, vae=h.vae)
            check_solver(self.pipe.kind, h.solver)
            if h.store_text_states:
                self.pipe.check_stored_states()
            self.pipe.to(self.device)  # its denoiser, text encoders and VAE
            self.pipe.bf16 = h.bf16  # text encoding under the same autocast as the denoiser

    def metadata(self) -> dict:
        """What produced the couplings; written next to them (formula and w included, docs/pitfalls.md)."""
        h = self.hparams
        meta = {"model": h.model, "family": self.pipe.name, "conditioning": self.pipe.conditioning,
                "kind": self.pipe.kind, "solver": h.solver, "steps": h.steps, "guidance": h.guidance,
                "guidance_formula": "out_u + w * (out_c - out_u), applied when w != 1", "base_seed": h.base_seed,
                "seed_rule": "crc32(f'{base_seed}/{key}') & 0x7FFFFFFF; x0 = randn(latent_shape, CPU generator)",
                "latent_shape": list(self.pipe.latent_shape), "time_convention": "t=0 noise, t=1 data",
                "prediction_type": self.pipe.scheduler_config.get("prediction_type", "epsilon")}
        dm = getattr(self._trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "filters"):  # which captions were kept (data.init_args.filters); null = all
            f = dm.filters
            meta["data_filters"] = dataclasses.asdict(f) if dataclasses.is_dataclass(f) else f
        return meta

    @torch.no_grad()
    def decode(self, x1: torch.Tensor) -> torch.Tensor:
        """x1 latents -> images in [0, 1] (for the coupling writer's grid)."""
        return self.pipe.decode(x1.to(self.device))

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        h = self.hparams
        if not batch["key"]:  # only a count of skipped inputs (a reader whose shards held no usable sample)
            return {"key": [], "caption": [], "url": [], "worker": [], "seed": [], "skipped": batch["skipped"]}
        seeds = [sample_seed(k, h.base_seed) for k in batch["key"]]
        x0 = seeded_noise(seeds, self.pipe.latent_shape).to(self.device)  # (B, 4, h, w)
        cond, uncond = self.pipe.encode(batch["caption"], h.guidance)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=h.bf16):
            # along the family's time grid (a flow-matching teacher's shifted sigmas; ours uniform, dt = 1/N)
            x1 = self.pipe.solve(x0, cond, uncond, h.steps, h.guidance, h.solver)
        x1 = x1.float()
        out = {"key": batch["key"], "caption": batch["caption"], "url": batch["url"], "worker": batch["worker"],
               "seed": seeds, "x1": x1.cpu(), "skipped": batch["skipped"]}
        if h.store_noise:
            out["x0"] = x0.cpu()
        if h.store_text_states:
            out["text_states"] = cond.cpu()
        return out
