"""The ablation's data, teacher and rows: what is trained (``DISTILLS`` x ``SEEDS``) and what is scored.

Every test row is sampled from the same test prompts i and noise seeds i (so rows are paired);
straightness rows compare each model's own 25-step path at equal solver (Euler) and guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SEEDS = (0, 1, 2)
DISTILLS = {  # name -> (experiment, label)
    "instaflow": ("ablation/distill", "InstaFlow (2-RF couplings, 2-RF init)"),
    "direct": ("ablation/distill_direct", "direct distillation (teacher couplings, teacher init)"),
    "control": ("ablation/distill_control", "control (teacher couplings, 2-RF init)"),
}
TEACHER = "assets/embedded-sd"
DATA = "runs/data/shapes"
TRAIN = f"{DATA}/train/{{00000..00003}}.tar"
VAL = f"{DATA}/val/{{00000..00001}}.tar"
TEST = f"{DATA}/test/{{00000..00003}}.tar"
EVALUATOR = "assets/embedded-evaluator"
PATH_GUIDANCE = (1.0, 1.5, 3.0)


@dataclass(frozen=True)
class EvalRow:
    """One test row: a model sampled by one solver at one step count and guidance."""

    name: str
    label: str
    model: str          # folder, relative to the repository (runs/ablation/models/... or the teacher)
    steps: int
    guidance: float
    kind: str | None = None   # None: the folder's own; "ddpm_velocity": a diffusion UNet by Euler in flow time
    curve: str | None = None  # the line of figure (c) it belongs to
    group: str | None = None  # distillation rows: instaflow / direct / control
    seed: int | None = None   # distillation rows: the training seed

    @property
    def solver(self) -> str:
        return "dpm_solver++" if self.kind is None and self.model == TEACHER else "euler"

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.guidance != 1 else 1)  # every w != 1 runs the unconditional pass


@dataclass(frozen=True)
class PathRow:
    """Straightness of one model's own 25-step path at one guidance (per prompt, on ``n_path`` prompts)."""

    name: str
    label: str
    model: str
    guidance: float
    kind: str | None = None
    steps: int = 25


def test_rows(models: str) -> list[EvalRow]:
    """Every row of the test table; ``models``: the ablation's model folder."""
    m = models.rstrip("/")
    rows = [EvalRow(f"teacher_dpm{s}", f"teacher (DPM-Solver++, {s} steps)", TEACHER, s, 3.0, curve="teacher, DPM-Solver++")
            for s in (2, 4, 8, 25)]
    rows.append(EvalRow("step0_1", "2-RF step 0 (teacher via the conversion), 1 step", TEACHER, 1, 1.0,
                        kind="ddpm_velocity", curve="teacher, Euler (step-0 model)"))
    rows += [EvalRow(f"step0_euler{s}", f"teacher via the conversion (Euler, {s} steps)", TEACHER, s, 3.0,
                     kind="ddpm_velocity", curve="teacher, Euler (step-0 model)") for s in (2, 4, 8, 25)]
    rows += [EvalRow(f"rf2_{s}", f"2-RF (Euler, {s} step{'s' if s > 1 else ''})", f"{m}/rf2", s, 1.5 if s > 1 else 1.0,
                     curve="2-RF, Euler") for s in (1, 2, 4, 8, 25)]
    rows += [EvalRow(f"rf3_{s}", f"3-RF (Euler, {s} step{'s' if s > 1 else ''})", f"{m}/rf3", s, 1.5 if s > 1 else 1.0,
                     curve="3-RF, Euler") for s in (1, 2, 4, 8)]
    for group, (_, label) in DISTILLS.items():
        rows += [EvalRow(f"{group}_s{seed}_1", f"{label}, seed {seed}", f"{m}/{group}_s{seed}", 1, 1.0,
                         curve="InstaFlow (one step)" if group == "instaflow" else None, group=group, seed=seed)
                 for seed in SEEDS]
    return rows


def path_rows(models: str) -> list[PathRow]:
    """Straightness rows at equal solver and guidance (Euler, 25 steps), and the teacher's own solver beside."""
    m = models.rstrip("/")
    rows = []
    for w in PATH_GUIDANCE:
        rows += [PathRow(f"step0_w{w:g}", f"2-RF step 0 (teacher via the conversion), Euler, w = {w:g}", TEACHER, w,
                         kind="ddpm_velocity"),
                 PathRow(f"rf2_w{w:g}", f"2-RF, Euler, w = {w:g}", f"{m}/rf2", w),
                 PathRow(f"rf3_w{w:g}", f"3-RF, Euler, w = {w:g}", f"{m}/rf3", w),
                 PathRow(f"teacher_dpm_w{w:g}", f"teacher, DPM-Solver++, w = {w:g}", TEACHER, w)]
    return rows


def asdicts(items) -> list[dict]:
    return [asdict(i) for i in items]
