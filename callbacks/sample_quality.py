"""FID and prompt alignment of the model being trained, logged to TensorBoard as curves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from instaflow.contracts import SamplesImages
from instaflow.evaluation.protocol import eval_protocol, score_images
from instaflow.evaluation.shapes_evaluator import load_evaluator
from instaflow.flow.straightness import straightness


class SampleQuality(Callback):
    """Sample fixed val prompts from fixed seeds and log ``quality/fid_*`` and ``quality/alignment_*``.

    Runs when training starts (the initialisation's score) and after every validation (inside the
    EMA swap, so the curve is the averaged weights', as exported). The module is
    ``contracts.SamplesImages``: ``sample_images(prompts, steps, guidance, seeds) -> (N, 3, H, W) in
    [0, 1]`` and a ``solver_tag`` that names its solver in the metric names.

    FID here uses ``n`` images against real images [n, 2n) of the same shards and is biased upward
    at small ``n``: compare it along one curve or between runs, not with the results table (n = 2000).
    The curves are for choosing (a budget, a checkpoint, a setting), so they read the val split;
    the test split is for the final tables only. Every scoring is also appended to
    ``<log_dir>/quality.jsonl`` ({step, metrics}), for tools that plot the curves.

    Args:
        shards: val shards (their captions are the prompts [0, n), their images [n, 2n) the reference).
        evaluator: feature network for FID and the alignment classifier (embedded world); real
            runs would plug Inception features and CLIP score here.
        steps: solver steps to score (Euler, or the module's ``solver_tag`` solver); guidance
            ``guidance`` applies above one step (one-step models run conditional only, as the
            paper samples them). Alignment is also logged per number of prompt objects.
        bf16: bf16 autocast while sampling (the ODE state stays fp32).
        straightness_n: also log ``quality/straightness_<solver><steps>_w<guidance>``, the
            straightness S of the model's own ``straightness_steps``-step path at ``guidance`` on
            the first ``straightness_n`` prompts (0: off); needs the module's ``sampler()``.
    """

    def __init__(self, shards: str, evaluator: str = "assets/embedded-evaluator", n: int = 256,
                 steps: list[int] | None = None, guidance: float = 1.5, seed: int = 0, bf16: bool = False,
                 straightness_n: int = 0, straightness_steps: int = 25) -> None:
        self.shards, self.evaluator_path, self.n = shards, evaluator, n
        self.steps = steps or [1]
        self.guidance, self.seed, self.bf16 = guidance, seed, bf16
        self.straightness_n, self.straightness_steps = straightness_n, straightness_steps
        self._proto = None

    def _protocol(self):
        if self._proto is None:
            evaluator = load_evaluator(self.evaluator_path)
            self._proto = (evaluator, eval_protocol(self.shards, self.n, evaluator))
        return self._proto

    def supports_sharded_module(self) -> bool:
        """No: it samples on rank 0 alone, which hangs an FSDP2-sharded module (contracts.ShardingAware)."""
        return False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, SamplesImages):
            raise TypeError(f"SampleQuality needs a module with sample_images(prompts, steps, guidance, seeds) and a "
                            f"solver_tag (contracts.SamplesImages); {type(pl_module).__name__} lacks them")
        if self.straightness_n and not callable(getattr(pl_module, "sampler", None)):
            raise TypeError(f"SampleQuality(straightness_n={self.straightness_n}) needs the module's sampler() "
                            f"(a TextToImage, for the solver path); {type(pl_module).__name__} has none")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._score(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._score(trainer, pl_module)

    @rank_zero_only
    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluator, proto = self._protocol()
        seeds = list(range(self.seed, self.seed + self.n))
        metrics = {}
        for steps in self.steps:
            w = self.guidance if steps > 1 else 1.0
            t0 = time.perf_counter()
            with torch.autocast(pl_module.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                images = pl_module.sample_images(proto["captions"], steps, w, seeds).float()
            s = score_images(images, proto["scenes"], proto["ref_features"], evaluator, n_bootstrap=0)
            tag = f"{pl_module.solver_tag}{steps}_w{w:g}"
            metrics[f"quality/fid_{tag}"] = s["fid"]
            metrics[f"quality/alignment_{tag}"] = s["alignment"]
            for k, v in s["by_objects"].items():  # binding shows in the many-object scenes
                metrics[f"quality/alignment_{tag}_{k}obj"] = v["alignment"]
            metrics[f"quality/seconds_{tag}"] = time.perf_counter() - t0
        if self.straightness_n:
            n, steps, w = min(self.straightness_n, self.n), self.straightness_steps, self.guidance
            path: list = []
            with torch.autocast(pl_module.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                pl_module.sampler().sample_latents(proto["captions"][:n], steps, w, seeds[:n], path=path)
            metrics[f"quality/straightness_{pl_module.solver_tag}{steps}_w{w:g}"] = straightness(path).mean().item()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.log_dir:
            with open(Path(trainer.log_dir) / "quality.jsonl", "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "metrics": metrics}) + "\n")
        pl_module.print(f"step {trainer.global_step}: " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items()
                                                                      if "seconds" not in k))
