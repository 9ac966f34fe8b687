"""``make ablation``: the embedded world's evidence, as resumable stages (docs/ablation.md).

    python -m studies.ablation.run                      # run (or continue) every stage
    python -m studies.ablation.run --list               # each stage, its output, done or not
    python -m studies.ablation.run --until reflow       # stop after a stage

Stages, in order: data; teacher couplings (4,000 train prompts) and held-out val couplings; the
2-RF (reflow at the ablation's budget); the 2-RF couplings' step count chosen on val; 2-RF
couplings; the three distillations (InstaFlow, direct, control) x 3 training seeds; the 3-RF;
coupling quality; every test row; straightness at equal solver and guidance; latency; the report
(results/ablation.{md,json} and three figures). A stage whose output exists is skipped, so a
killed run continues at the first unfinished stage (a killed training stage resumes from its last
checkpoint; a killed coupling stage keeps its complete shards, which its rerun skips; a killed
evaluation keeps the rows it finished). Each stage's wall time is recorded in
``<root>/timings``. Every training stage is an experiment under ``experiments/ablation/`` run by
the project's CLI; the overrides a stage adds (seed, export folder, the chosen step count) are on
its command line, printed and recorded with its time. Every image set is scored through the library's one
scoring path (``protocol.score_images_per_image``); the rows, claims and record are ``studies.ablation.report``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from instaflow.tools.report import cpu_model
from instaflow.tools.timed import write_record
from studies.ablation import report
from studies.ablation import rows as ab
from studies.ablation.report import write_json
from studies.ablation.rows import DATA, EVALUATOR, TEST, TRAIN, VAL

RF2_STEP_CHOICES = (8, 16, 25)


@dataclass
class Stage:
    """One resumable step: done when ``done`` exists; runs ``command()`` (a subprocess) or ``fn()``."""

    name: str
    done: Path
    command: Callable[[], list[str]] | None = None
    fn: Callable[[], None] | None = None
    # a coupling stage's shard folder: kept when unfinished, its rerun skips the complete shards (resumes)
    partial: Path | None = None


class Ablation:
    def __init__(self, root: str, results: str, n_test: int = 1000, n_val: int = 500, n_path: int = 256,
                 n_boot: int = 500, batch_size: int = 256, latency_rounds: int = 3) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.pairs = self.root / "pairs"
        self.eval_dir = self.root / "eval"
        self.results = Path(results)
        self.n_test, self.n_val, self.n_path, self.n_boot = n_test, n_val, n_path, n_boot
        self.batch_size, self.latency_rounds = batch_size, latency_rounds
        self._evaluator = None
        self._protocols: dict = {}

    # --- the stages ----------------------------------------------------------------------------

    def cli(self, experiment: str, *overrides: str) -> list[str]:
        return [sys.executable, "-m", "lightning_modules.cli", "--experiment", experiment, *overrides]

    def stages(self) -> list[Stage]:
        st = [
            Stage("data", Path(DATA, "test", "00003.tar"),
                  lambda: [sys.executable, "-m", "data.shapes", "--out", DATA, "--train", "4000", "--train3", "0"]),
            self._pairs("pairs_teacher", "teacher", "ablation/pairs_teacher"),
            self._pairs("pairs_teacher_val", "teacher_val", "ablation/pairs_teacher_val"),
            Stage("reflow", self.models / "rf2" / "model_index.json", lambda: self.cli("ablation/reflow")),
            Stage("select_rf2_steps", self.root / "select_rf2_steps.json", fn=self.select_rf2_steps),
            self._pairs("pairs_rf2", "rf2", "ablation/pairs_rf2", rf2_steps=True),
            self._pairs("pairs_rf2_val", "rf2_val", "ablation/pairs_rf2_val", rf2_steps=True),
        ]
        for group, (experiment, _) in ab.DISTILLS.items():
            for seed in ab.SEEDS:
                st.append(Stage(f"distill_{group}_s{seed}", self.models / f"{group}_s{seed}" / "model_index.json",
                                self._distill_command(experiment, group, seed)))
        st.append(Stage("rf3", self.models / "rf3" / "model_index.json", lambda: self.cli("ablation/rf3")))
        st.append(Stage("coupling_quality", self.eval_dir / "coupling_quality.json", fn=self.coupling_quality))
        for row in ab.test_rows(str(self.models)):
            st.append(Stage(f"eval_{row.name}", self.eval_dir / "rows" / f"{row.name}.json",
                            fn=lambda row=row: self.eval_row(row)))
        for row in ab.path_rows(str(self.models)):
            st.append(Stage(f"path_{row.name}", self.eval_dir / "paths" / f"{row.name}.json",
                            fn=lambda row=row: self.path_row(row)))
        st.append(Stage("latency", self.eval_dir / "latency.json", fn=self.latency))
        st.append(Stage("report", self.results.with_suffix(".json"), fn=self.report))
        return st

    def _pairs(self, name: str, folder: str, experiment: str, rf2_steps: bool = False) -> Stage:
        out = self.pairs / folder

        def command() -> list[str]:
            extra = ["--model.init_args.steps", str(self.chosen_rf2_steps())] if rf2_steps else []
            return self.cli(experiment, *extra)

        return Stage(name, out / ".done", command, partial=out)

    def _distill_command(self, experiment: str, group: str, seed: int) -> Callable[[], list[str]]:
        return lambda: self.cli(experiment, "--seed_everything", str(seed), "--model.init_args.seed", str(seed),
                                "--data.init_args.seed", str(seed),
                                "--model.init_args.export_dir", str(self.models / f"{group}_s{seed}"),
                                "--trainer.logger.init_args.name", f"distill_{group}_s{seed}")

    def run(self, until: str | None = None, only: list[str] | None = None) -> None:
        for stage in self.stages():
            if only and stage.name not in only:
                continue
            if stage.done.exists() and stage.name != "report":
                print(f"[ablation] {stage.name}: done ({stage.done})", flush=True)
            else:
                self.run_stage(stage)
            if stage.name == until:
                break

    def run_stage(self, stage: Stage) -> None:
        """Run one stage (a subprocess or a function) and record its wall time."""
        if stage.partial is not None and stage.partial.exists():
            # never deleted: the writer renames each shard into place when complete and skips those on a rerun
            print(f"[ablation] {stage.name}: continuing the unfinished output {stage.partial}", flush=True)
        start = time.time()
        if stage.command is not None:
            cmd = stage.command()
            print(f"[ablation] {stage.name}: {' '.join(cmd)}", flush=True)
            rc = subprocess.call(cmd)
            if rc != 0:
                raise SystemExit(f"[ablation] stage {stage.name} failed (exit {rc}); rerun to continue from it")
            if stage.partial is not None:  # a predict stage: its writer has finished every shard
                stage.done.touch()
            command = " ".join(cmd)
        else:
            print(f"[ablation] {stage.name}", flush=True)
            stage.fn()
            command = f"studies.ablation.run:{stage.name}"
        rec = write_record(self.root / "timings", stage.name, command, start, time.time())
        print(f"[ablation] {stage.name}: {rec['wall_s']:.1f} s", flush=True)

    # --- scoring helpers -----------------------------------------------------------------------

    def evaluator(self):
        from instaflow.evaluation.shapes_evaluator import load_evaluator

        if self._evaluator is None:
            self._evaluator = load_evaluator(EVALUATOR)
        return self._evaluator

    def protocol(self, split: str) -> dict:
        """The test protocol (prompts test[0, n), reference test[n, 2n)) or the val one used for choices."""
        from instaflow.evaluation.protocol import eval_protocol

        if split not in self._protocols:
            shards, n = (TEST, self.n_test) if split == "test" else (VAL, self.n_val)
            self._protocols[split] = eval_protocol(shards, n, self.evaluator())
        return self._protocols[split]

    def load(self, folder: str, kind: str | None, n: int):
        from instaflow.models.sampler import TextToImage

        model = TextToImage.from_pretrained(folder, kind=kind, text_cache_size=n + 1)
        model.bf16 = True  # as the chain's evaluation: bf16 autocast, fp32 ODE state
        return model

    @torch.no_grad()
    def score(self, model, steps: int, guidance: float, split: str) -> tuple[dict, np.ndarray, np.ndarray]:
        """Images of the split's prompts from noise seeds 0..n-1: (scores, features (n, D), hits (n,))."""
        from instaflow.evaluation.protocol import score_images_per_image
        from instaflow.evaluation.scoring import FEATURES

        proto = self.protocol(split)
        n = len(proto["captions"])
        images = model.sample_images(proto["captions"], steps, guidance, list(range(n)), self.batch_size)
        s, values = score_images_per_image(images, proto["scenes"], proto["ref_features"], self.evaluator())
        return s, values[FEATURES], values["alignment"]

    # --- python stages -------------------------------------------------------------------------

    def select_rf2_steps(self) -> None:
        """The 2-RF couplings' step count, on val: the smallest of 8, 16, 25 whose val FID is within 5% of the best."""
        rf2 = self.load(str(self.models / "rf2"), None, self.n_val)
        scores = {}
        for steps in RF2_STEP_CHOICES:
            s, _, _ = self.score(rf2, steps, 1.5, "val")
            scores[steps] = {"fid": s["fid"], "alignment": s["alignment"]}
            print(f"  2-RF Euler {steps} w=1.5 on val: FID {s['fid']:.2f}, alignment {s['alignment']:.3f}", flush=True)
        teacher = self.load(ab.TEACHER, None, self.n_val)
        t, _, _ = self.score(teacher, 25, 3.0, "val")
        best = min(v["fid"] for v in scores.values())
        chosen = min(k for k, v in scores.items() if v["fid"] <= 1.05 * best)
        rec = {"rule": "smallest step count of 8, 16, 25 whose val FID is within 5% of the best of them",
               "protocol": f"val prompts [0, {self.n_val}), seeds 0..{self.n_val - 1}, FID vs val images "
                           f"[{self.n_val}, {2 * self.n_val}); 2-RF by Euler at w = 1.5",
               "rf2": {str(k): v for k, v in scores.items()},
               "teacher_dpm25_w3": {"fid": t["fid"], "alignment": t["alignment"]}, "chosen": chosen}
        write_json(self.root / "select_rf2_steps.json", rec)

    def chosen_rf2_steps(self) -> int:
        return int(json.loads((self.root / "select_rf2_steps.json").read_text())["chosen"])

    @torch.no_grad()
    def coupling_quality(self) -> None:
        """Each coupling set's decoded x1, scored as images (FID vs all val images, alignment with its prompt)."""
        from data.laion import LaionStream
        from data.pairs import CouplingDataModule, CouplingStream
        from instaflow.evaluation.fid import image_features
        from instaflow.evaluation.protocol import real_test_set, score_images
        from instaflow.models import loading
        from instaflow.models.sampler import decode_latents

        scenes = {s["key"]: s["meta"]["scene"] for s in LaionStream(TRAIN, resolution=32, require_meta=True)}
        val_images, _, _ = real_test_set(VAL, 2000)
        ref = image_features(val_images, self.evaluator())
        vae = loading.load_vae(ab.TEACHER)
        out = {"protocol": "every coupling's x1 decoded by the teacher's VAE; FID vs the 2,000 val images; "
                           "alignment with the scene of the train prompt it was made for"}
        for name, folder in (("teacher", "teacher"), ("rf2", "rf2")):
            samples = sorted(CouplingStream(CouplingDataModule.resolve(str(self.pairs / folder))),
                             key=lambda s: s["key"])
            keep = [s for s in samples if s["key"] in scenes]
            x1 = torch.stack([s["x1"] for s in keep])  # (N, 4, h, w)
            images = torch.cat([decode_latents(vae, x1[i:i + 500]) for i in range(0, len(x1), 500)])
            s = score_images(images, [scenes[k["key"]] for k in keep], ref, self.evaluator())
            gen = json.loads((self.pairs / folder / "generation.json").read_text())
            out[name] = {"n": len(keep), "unmatched_keys": len(samples) - len(keep), "generation": gen,
                         **{k: s[k] for k in ("fid", "fid_low", "fid_high", "alignment", "alignment_stderr")}}
            print(f"  couplings {name}: FID {s['fid']:.2f} alignment {s['alignment']:.3f} (n = {len(keep)})", flush=True)
        write_json(self.eval_dir / "coupling_quality.json", out)

    def eval_row(self, row: ab.EvalRow) -> None:
        model = self.load(row.model, row.kind, self.n_test)
        t0 = time.time()
        s, feats, hits = self.score(model, row.steps, row.guidance, "test")
        d = self.eval_dir / "rows"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{row.name}.features.npy", feats)
        np.save(d / f"{row.name}.hits.npy", hits)
        ref = self.eval_dir / "test_ref_features.npy"
        if not ref.exists():
            np.save(ref, self.protocol("test")["ref_features"])
        rec = {**asdict(row), "solver": row.solver, "nfe": row.nfe,
               **{k: s[k] for k in ("n", "fid", "fid_low", "fid_high", "alignment", "alignment_stderr")},
               "eval_wall_s": round(time.time() - t0, 1)}
        write_json(d / f"{row.name}.json", rec)  # last: it marks the row done
        print(f"  {row.name}: FID {s['fid']:.2f} alignment {s['alignment']:.3f}", flush=True)

    @torch.no_grad()
    def path_row(self, row: ab.PathRow) -> None:
        from instaflow.flow.straightness import path_length_ratio, straightness

        proto = self.protocol("test")
        n = min(self.n_path, len(proto["captions"]))
        model = self.load(row.model, row.kind, n)
        path: list = []
        model.sample_latents(proto["captions"][:n], row.steps, row.guidance, list(range(n)), path=path)
        s, r = straightness(path).double().numpy(), path_length_ratio(path).double().numpy()
        d = self.eval_dir / "paths"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{row.name}.straightness.npy", s)
        np.save(d / f"{row.name}.ratio.npy", r)
        solver = "dpm_solver++" if row.kind is None and row.model == ab.TEACHER else "euler"
        write_json(d / f"{row.name}.json", {**asdict(row), "solver": solver, "n": n,
                                               "straightness": float(s.mean()), "path_length_ratio": float(r.mean())})
        print(f"  {row.name}: straightness {s.mean():.4f} path ratio {r.mean():.4f}", flush=True)

    def latency(self) -> None:
        from instaflow.evaluation.results import latency

        loaded = {}
        for row in ab.test_rows(str(self.models)):
            if row.curve and (row.seed in (None, 0)):
                loaded[row.name] = (self.load(row.model, row.kind, 0), row.steps, row.guidance)
        prompt = self.protocol("test")["captions"][0]
        lat = latency(loaded, prompt, 1, self.latency_rounds)
        write_json(self.eval_dir / "latency.json", {"protocol": f"median over {self.latency_rounds} interleaved rounds, "
                                                                  "batch 1, end to end (text, UNet, decode); "
                                                                  f"{torch.get_num_threads()} threads", "rows": lat})

    def report(self) -> None:
        report.write(self.root, self.results, _machine(), self.n_test, self.n_path, self.n_boot)

def _machine() -> dict:
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/ablation")
    p.add_argument("--results", default="results/ablation", help="writes <results>.md, <results>.json, figures beside")
    p.add_argument("--until", default=None, help="stop after this stage")
    p.add_argument("--only", nargs="*", default=None, help="run just these stages (if not done)")
    p.add_argument("--list", action="store_true", help="print each stage, its output and whether it is done")
    p.add_argument("--n-test", type=int, default=1000, help="test prompts per row (the chain's table uses 2000; "
                   "1000 here keeps the 27 rows inside the 4-hour budget)")
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-path", type=int, default=256)
    p.add_argument("--n-boot", type=int, default=500)
    a = p.parse_args(argv)
    abl = Ablation(a.root, a.results, n_test=a.n_test, n_val=a.n_val, n_path=a.n_path, n_boot=a.n_boot)
    if a.list:
        for s in abl.stages():
            print(f"{'done' if s.done.exists() else '    '}  {s.name:32s} {s.done}")
        return
    abl.run(until=a.until, only=a.only)


if __name__ == "__main__":
    main()
