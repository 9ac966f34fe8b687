"""FID and text-image scores of the model being trained, on every strategy, logged as ``quality/*`` curves."""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.ema import find_ema
from instaflow.collective import every_rank_raises, on_rank_zero
from instaflow.contracts import SamplesImages, SamplesPaths
from instaflow.evaluation.quality import (ImageFeatures, PromptSet, QualityPrompts, Setting, TextImageScore,
                                          gathered_order, rank_share, reference_stats)
from instaflow.evaluation.scoring import aggregate, per_image
from instaflow.flow.straightness import straightness
from instaflow.state import append_jsonl, read_jsonl, write_jsonl


class Quality(Callback):
    """Sample a fixed prompt set from fixed seeds and log ``quality/fid_<tag>`` and the text-image scores.

    ``<tag>`` is ``<solver><steps>_w<guidance>`` (e.g. ``euler1_w1``, ``dpm25_w3``). Scores when
    training starts (the initialisation's score), then after every validation (inside the EMA swap,
    so the curve is the averaged weights', as exported) or, with ``every_n_train_steps``, every N
    optimizer steps (the EMA weights swapped in here). Every scoring is also appended to
    ``<log_dir>/quality.jsonl`` ({step, metrics}) and put in ``trainer.callback_metrics``, so a
    ``ModelCheckpoint(monitor="quality/fid_euler1_w1", mode="min")`` keeps the best checkpoints.

    Every strategy: the prompts are split in equal contiguous blocks over the ranks, every rank
    samples and scores its block (under FSDP2 each forward is a collective, so all ranks must take
    part), per-image features and scores are gathered, rank 0 computes FID and the means, and the
    numbers are broadcast to every rank (for checkpoint monitoring). On the same prompts they equal
    one process's up to float round-off. What rank 0 does alone (the FID reference, the Frechet
    distance, logging and ``quality.jsonl``) runs through ``instaflow.collective.on_rank_zero``: an
    error there is raised, named, on every rank at once instead of leaving the others in a collective.

    FID uses ``n`` images against ``n`` reference images and is biased upward at small ``n``: compare
    it along one curve or between runs at the same ``n``, not with a 5k/30k protocol number. The
    prompts should be held-out (val) prompts: the curves are for choosing a checkpoint or a setting.

    Args:
        prompts: the prompt set and its reference images (``ShardPrompts``: a LAION val shard or the
            embedded val split; ``CocoPrompts``: COCO captions).
        features: FID features (``CleanFidInception`` for real runs, ``EmbeddedFeatures``).
        scores: per-image text-image scores (``ClipScore``, ``EmbeddedAlignment``); [] for FID only.
        settings: the (steps, guidance) pairs to sample, each logged under its own tag.
        every_n_train_steps: score every N optimizer steps instead of after each validation.
        at_start: also score the weights the run starts from (step 0).
        batch_size: prompts per sampling batch on each rank.
        bf16: bf16 autocast while sampling (the ODE state stays fp32).
        download: let clean-fid / the hub fetch missing weights (False: local files only).
        cache_dir: where the reference statistics are cached (default ``<default_root_dir>/quality_reference``).
        straightness_n: also log ``quality/straightness_<solver><steps>_w<guidance>``, the straightness
            S of the model's own ``straightness_steps``-step path at ``straightness_guidance`` on the first
            ``straightness_n`` prompts (0: off); needs a module with ``sampler()`` (``contracts.SamplesPaths``).

    Scoring is ``instaflow.evaluation.scoring``'s (``per_image`` on every rank, ``aggregate`` on rank 0): the
    results table, the ablation and COCO score through it too, so the same images give the same numbers.
    """

    def __init__(self, prompts: QualityPrompts, features: ImageFeatures, scores: list[TextImageScore] | None = None,
                 settings: list[Setting] | None = None, every_n_train_steps: int | None = None, at_start: bool = True,
                 batch_size: int = 256, bf16: bool = False, download: bool = True, cache_dir: str | None = None,
                 straightness_n: int = 0, straightness_steps: int = 25, straightness_guidance: float = 1.5) -> None:
        self.prompts, self.features, self.scores = prompts, features, list(scores or [])
        self.settings = list(settings or [Setting(1, 1.0)])
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        self.every_n_train_steps, self.at_start = every_n_train_steps, at_start
        self.batch_size, self.bf16, self.download, self.cache_dir = batch_size, bf16, download, cache_dir
        self.straightness_n, self.straightness_steps = straightness_n, straightness_steps
        self.straightness_guidance = straightness_guidance
        self._set: PromptSet | None = None
        self._ref: tuple | None = None
        self._last_step: int | None = None

    def supports_sharded_module(self) -> bool:
        """Yes: every rank samples its share of the prompts (contracts.ShardingAware)."""
        return True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, SamplesImages):
            raise TypeError(f"Quality needs a module with sample_images(prompts, steps, guidance, seeds) and a "
                            f"solver_tag (contracts.SamplesImages); {type(pl_module).__name__} lacks them")
        if self.straightness_n and not isinstance(pl_module, SamplesPaths):
            raise TypeError(f"Quality(straightness_n={self.straightness_n}) needs a module whose sampler() records "
                            f"its solver path (contracts.SamplesPaths); {type(pl_module).__name__} lacks it: "
                            "set straightness_n: 0 or give the module a sampler()")
        if stage != "fit":
            return
        # everything that reads files or loads weights runs now, on every rank: a missing COCO folder,
        # Inception file or CLIP model stops the run before its first step, not at the first scoring;
        # a failure on any rank is raised on all of them
        with every_rank_raises("Quality: loading the prompts and the feature and score networks"):
            self._set = self.prompts.load()
            device = trainer.strategy.root_device
            self.features.prepare(device, self.download)
            for s in self.scores:
                s.prepare(device, self.download)
                s.bind(self._set)  # the score names come from the whole prompt set: the same on every rank

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if trainer.global_step > 0:
            self._forget_after(trainer, trainer.global_step)
        elif self.at_start:
            self._score_with_ema(trainer, pl_module)

    @staticmethod
    def _forget_after(trainer: L.Trainer, step: int) -> None:
        """A resumed run: drop the curve's points after its checkpoint (the weights they scored are gone)."""
        log_dir = trainer.log_dir  # a broadcast: every rank asks
        path = Path(log_dir) / "quality.jsonl" if log_dir else None
        on_rank_zero(trainer.strategy, lambda: forget_after(path, step), "Quality: trimming quality.jsonl on resume")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        if n and step != self._last_step and step % n == 0:  # once per optimizer step, not per micro-batch
            self._last_step = step
            self._score_with_ema(trainer, pl_module)
        self._last_step = step

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_train_steps and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._score(trainer, pl_module)  # the EMA callback has swapped its weights in for validation

    def _score_with_ema(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = find_ema(trainer)
        with ema.swapped(pl_module) if ema is not None else nullcontext():
            self._score(trainer, pl_module)

    def _cache_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(trainer.default_root_dir) / "quality_reference"

    @torch.no_grad()
    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank, world, full = trainer.global_rank, trainer.world_size, self._set
        index, _ = rank_share(len(full), rank, world)
        mine = full.take(index)
        metrics: dict[str, float] = {}
        autocast = torch.autocast(pl_module.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        for setting in self.settings:
            tag = f"{pl_module.solver_tag}{setting.steps}_w{setting.guidance:g}"
            t0 = time.perf_counter()
            with autocast:
                images = pl_module.sample_images(mine.captions, setting.steps, setting.guidance, mine.seeds,
                                                 self.batch_size).float()  # (m, 3, H, W) in [0, 1]
            values = per_image(images, mine, self.features, self.scores)  # {FEATURES: (m, D), name: (m,)}
            rows = self._gather(trainer, pl_module, values, len(full))
            # rank 0 alone: the reference (built lazily) and the distance; its value or error reaches every rank
            metrics.update(on_rank_zero(trainer.strategy, lambda: self._metrics(trainer, rows, tag, t0),
                                        f"Quality: the FID and scores of {tag}"))
        if self.straightness_n:
            n, steps, w = min(self.straightness_n, len(full)), self.straightness_steps, self.straightness_guidance
            own, _ = rank_share(n, rank, world)
            sub, path = full.take(own), []
            with autocast:
                pl_module.sampler().sample_latents(sub.captions, steps, w, sub.seeds, path=path)
            rows = self._gather(trainer, pl_module, {"s": straightness(path).double().cpu().numpy()}, n)
            # every rank holds the gathered rows: the same mean everywhere, no rank-0 step
            metrics[f"quality/straightness_{pl_module.solver_tag}{steps}_w{w:g}"] = float(rows["s"].mean())
        for k, v in metrics.items():  # for ModelCheckpoint(monitor=...) and EarlyStopping, on every rank
            trainer.callback_metrics[k] = torch.tensor(v)
        log_dir = trainer.log_dir  # a broadcast itself: every rank must ask
        on_rank_zero(trainer.strategy, lambda: self._record(trainer, metrics, log_dir),
                     "Quality: logging the scores and writing quality.jsonl")

    def _metrics(self, trainer: L.Trainer, rows: dict[str, np.ndarray], tag: str, t0: float) -> dict[str, float]:
        """FID against the reference and the mean scores of one setting (rank 0)."""
        s = aggregate(rows, self._reference(trainer))  # no bootstrap: a curve point
        out = {f"quality/fid_{tag}": s.fid}
        for name, value in s.means.items():
            base, _, suffix = name.partition("@")
            out[f"quality/{base}_{tag}" + (f"_{suffix}" if suffix else "")] = value
        out[f"quality/seconds_{tag}"] = time.perf_counter() - t0
        return out

    @staticmethod
    def _record(trainer: L.Trainer, metrics: dict[str, float], log_dir: str | None) -> None:
        """Log the scores and append them to ``<log_dir>/quality.jsonl`` (rank 0; rewritten atomically)."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if log_dir:
            path = Path(log_dir) / "quality.jsonl"
            dropped = append_jsonl(path, {"step": trainer.global_step, "metrics": metrics})
            if dropped:
                print(f"[quality] {path}: dropped {dropped} unreadable line(s) (a write cut by a kill)")
        print(f"step {trainer.global_step}: " + ", ".join(
            f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if "seconds" not in k))

    def _reference(self, trainer: L.Trainer) -> tuple:
        if self._ref is None:
            self._ref = reference_stats(self.prompts, self.features, self._cache_dir(trainer))
        return self._ref

    @staticmethod
    def _gather(trainer: L.Trainer, pl_module: L.LightningModule, values: dict[str, np.ndarray],
                n: int) -> dict[str, np.ndarray]:
        """Each rank's (m, ...) arrays -> on every rank the (n, ...) arrays in prompt order (padding dropped)."""
        if trainer.world_size == 1:
            return {k: np.asarray(v)[:n] for k, v in values.items()}
        same_names_on_every_rank(trainer, pl_module.device, list(values))
        order = gathered_order(n, trainer.world_size)
        out = {}
        for k, v in values.items():
            local = torch.as_tensor(np.asarray(v, dtype=np.float64), device=pl_module.device)
            rows = trainer.strategy.all_gather(local)  # (world, m, ...)
            out[k] = rows.reshape(-1, *local.shape[1:]).cpu().numpy()[order]
        return out


def same_names_on_every_rank(trainer: L.Trainer, device: torch.device, names: list[str]) -> None:
    """One all-gather of a digest of ``names``: if any rank's names (or their order) differ, every rank raises.

    The gather below issues one collective per name, so differing names would pair one rank's values
    with another's (wrong numbers) or leave a rank waiting in a collective the others never call.
    """
    digest = int.from_bytes(hashlib.sha256("\n".join(names).encode()).digest()[:7], "big")
    seen = trainer.strategy.all_gather(torch.tensor([digest], dtype=torch.int64, device=device)).reshape(-1).tolist()
    differ = [r for r, d in enumerate(seen) if d != seen[0]]
    if differ:
        raise RuntimeError(
            f"Quality: the ranks score different per-image names (rank(s) {differ} differ from rank 0; rank "
            f"{trainer.global_rank} has {names}). Every TextImageScore must return the same names in the same order "
            "on every rank, with NaN where a score does not apply to an image: derive them from the whole prompt "
            "set in bind(prompts), not from the rank's own block")


def forget_after(path: Path | None, step: int) -> None:
    """Keep the points of ``quality.jsonl`` scored at or before ``step``; unreadable lines are dropped and counted."""
    if path is None or not path.is_file():
        return
    records, bad = read_jsonl(path)
    keep = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
    bad += sum(1 for r in records if not isinstance(r.get("step"), int))
    if bad:
        print(f"[quality] {path}: skipped {bad} unreadable line(s) (a write cut by a kill); the curve goes on without them")
    if bad or len(keep) < len(records):
        write_jsonl(path, keep)
