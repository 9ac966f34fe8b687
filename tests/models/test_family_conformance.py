"""One test every model family passes (``instaflow.contracts.Family``), one row per family.

For each family, on its tiny offline folder (``tests/conftest.py``): the folder is read as that family; our
sampling (encode, then ``solve`` through the velocity conversion, guided or not) equals the family's own
diffusers pipeline to 1e-5, latents and images; and the whole chain runs through the stages unchanged:
teacher couplings -> reflow -> 2-RF couplings -> distillation -> export -> a folder plain diffusers reloads
(no import of this project) and samples as we do. A new family is one file in ``instaflow/models/families/``
and one ``Row`` here.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from tests.lightning_modules.test_chain import BASE, cli, gen_pairs, read_pairs, scalars, tiny_yaml

PROMPTS = ["a red circle in the center", "two blue squares on a white background"]


@dataclass(frozen=True)
class Row:
    """What a family's row says: its tiny folder, how its own pipeline is loaded and called, the student settings."""

    name: str  # the family's ``name`` (metadata)
    fixture: str  # the conftest fixture building its tiny folder
    kind: str  # what the teacher folder reads as
    student_kind: str  # what its students read as
    sampling: tuple  # ((steps, w), ...) compared with the pipeline
    pipeline_load: dict = field(default_factory=dict)  # extra from_pretrained arguments of its pipeline
    pipeline_call: dict = field(default_factory=dict)  # extra call arguments (same for ours and theirs)
    attrs: dict = field(default_factory=dict)  # family attributes set to match the pipeline call
    options: dict = field(default_factory=dict)  # loading options (coupling stage keys too)
    dpm: bool = False  # a diffusion teacher: its pipeline is given our DPM-Solver++ scheduler
    packed: bool = False  # the pipeline takes packed latents (Flux)
    stage: dict = field(default_factory=dict)  # student settings (reflow and distillation)
    teacher_w: float = 3.0
    exported: bool = False  # make export writes the plain folder (else the student's folder already is one)
    sigmas: bool = False  # the plain pipeline is called with our uniform sigmas
    reload_cases: tuple = ((1, 1.0, 1.0), (3, 2.0, 2.0))  # (steps, our w, the plain pipeline's w)
    saved: dict = field(default_factory=dict)  # what a trained folder says of itself, read back as attributes
    distill_falls: bool = False  # the distillation loss falls within the tiny run (measured where it does)
    reload_call: dict = field(default_factory=dict)  # extra call arguments of the plain reload (SANA's image size)


ROWS = [
    Row("sd", "tiny_sd_folder", "ddpm", "ddpm_velocity", ((4, 1.0), (6, 5.0)), dpm=True,
        pipeline_load={"safety_checker": None, "feature_extractor": None},
        stage={"parameterization": "velocity_wrapper"}, teacher_w=5.0, exported=True),
    Row("sdxl", "tiny_sdxl_folder", "ddpm", "ddpm_velocity", ((4, 1.0), (8, 5.0)), dpm=True,
        stage={"parameterization": "velocity_wrapper"}, teacher_w=5.0, exported=True),
    Row("sd3", "tiny_sd3_folder", "flow_matching", "flow_matching", ((1, 1.0), (5, 4.0)),
        pipeline_load={"text_encoder_3": None, "tokenizer_3": None, "feature_extractor": None, "image_encoder": None},
        stage={"parameterization": "flow"}, sigmas=True, saved={"uniform": True}, distill_falls=True),
    Row("flux", "tiny_flux_folder", "flow_matching", "flow_matching", ((1, 3.5), (4, 3.5)),
        pipeline_call={"max_sequence_length": 16}, attrs={"max_sequence_length": 16}, options={"resolution": 16},
        packed=True, stage={"parameterization": "flow", "guidance_input": 3.5, "resolution": 16}, teacher_w=3.5,
        reload_cases=((1, 1.0, 3.5), (3, 1.0, 3.5)), saved={"uniform": True, "resolution": 16, "guidance_input": 3.5}),  # a guidance input: our w is unused, theirs is the input
    Row("sana", "tiny_sana_folder", "flow_matching", "flow_matching", ((1, 1.0), (4, 4.0)),
        pipeline_call={"height": 32, "width": 32, "use_resolution_binning": False},  # SANA: multiples of 32 px
        stage={"parameterization": "flow"}, sigmas=True, saved={"uniform": True},
        reload_call={"height": 32, "width": 32, "use_resolution_binning": False}),
]
SAMPLING = [(row, steps, w) for row in ROWS for steps, w in row.sampling]


def _load(row: Row, folder, match_pipeline: bool = True):
    """The family of ``folder`` with the row's loading options (and, to match its pipeline call, its attributes)."""
    from instaflow.models.families import load_family

    family = load_family(str(folder), **row.options)
    for k, v in (row.attrs if match_pipeline else {}).items():
        setattr(family, k, v)
    return family


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_the_folder_is_read_as_its_family(row, request):
    from instaflow.contracts import Family
    from instaflow.models.families import family_class

    folder = request.getfixturevalue(row.fixture)
    family = _load(row, folder)
    assert family_class(str(folder)).name == family.name == row.name
    assert isinstance(family, Family) and family.kind == row.kind and family.latent_shape[1:] == (8, 8)
    assert any(m is family.denoiser for m in family.velocity().modules())  # v is read off the family's own network
    assert "vae" in family.frozen_modules() and family.device == torch.device("cpu")


@pytest.mark.parametrize("row,steps,w", SAMPLING, ids=[f"{r.name}-{s}-{w:g}" for r, s, w in SAMPLING])
def test_sampling_equals_the_family_pipeline(row, steps, w, request):
    """Encode, then solve through the velocity conversion, equals the family's own diffusers pipeline (1e-5)."""
    import diffusers

    from instaflow.flow.solvers import dpm_solver_scheduler
    from instaflow.models.families.flux import pack_latents

    folder = request.getfixturevalue(row.fixture)
    ours = _load(row, folder)
    pipe = getattr(diffusers, ours.pipeline_class).from_pretrained(str(folder), **row.pipeline_load)
    pipe.set_progress_bar_config(disable=True)
    if row.dpm:
        pipe.scheduler = dpm_solver_scheduler(ours.scheduler_config, steps)
    x0 = torch.randn(2, *ours.latent_shape, generator=torch.Generator().manual_seed(5))
    pack = pack_latents if row.packed else (lambda x: x)
    kw = dict(prompt=PROMPTS, latents=pack(x0.clone()), num_inference_steps=steps, guidance_scale=w,
              **{"height": 16, "width": 16, **row.pipeline_call})
    x1 = ours.sample_latents(PROMPTS, steps, w, x0=x0)
    theirs = pipe(**kw, output_type="latent").images
    # 1e-5 of the latents' scale (a diffusion teacher's unscaled x1 reaches ~40; our DPM-Solver++ runs in flow
    # time, theirs in sigma: the same steps, other float rounding); images in [0, 1] to 1e-5
    torch.testing.assert_close(pack(x1), theirs, atol=1e-5 * max(1.0, float(theirs.abs().max())), rtol=0)
    torch.testing.assert_close(ours.decode(x1), pipe(**kw, output_type="pt").images, atol=1e-5, rtol=0)


RELOAD = """
import json, sys, torch
from diffusers import DiffusionPipeline
folder, latents, out, spec = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **spec["load"])
pipe.set_progress_bar_config(disable=True)
for i, (n, w) in enumerate(spec["cases"]):
    extra = {"sigmas": [1 - k / n for k in range(n)]} if spec["sigmas"] else {}
    images = pipe(spec["prompts"], latents=torch.load(latents), num_inference_steps=n, guidance_scale=w,
                  output_type="pt", **{"height": 16, "width": 16, **spec["call"]}, **extra).images
    torch.save(images.cpu(), f"{out}_{i}.pt")
assert not [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
"""


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_couplings_reflow_distill_export_reload_with_plain_diffusers(row, request, tiny_world, tmp_path):
    """The chain through the unchanged stages: couplings (x1 = the family's own sampler), reflow (the loss falls),
    2-RF couplings, distillation, export, and plain diffusers samples the export as the student does."""
    from instaflow.flow.noise import sample_seed, seeded_noise
    from instaflow.models.export import export
    from instaflow.models.families.flux import pack_latents

    folder = request.getfixturevalue(row.fixture)
    kw = dict(kind=None, store_text_states=False, bf16=False, **row.options)
    gen_pairs(tmp_path, tiny_world, str(folder), tmp_path / "pairs_teacher", guidance=row.teacher_w,
              solver="dpm_solver++" if row.dpm else "euler", **kw)
    pairs = read_pairs(tmp_path / "pairs_teacher")
    teacher = _load(row, folder, match_pipeline=False)  # as the coupling stage loads it
    meta = json.loads((tmp_path / "pairs_teacher" / "generation.json").read_text())
    assert len(pairs) == 64 and (meta["family"], meta["kind"], meta["solver"], meta["latent_shape"]) == (
        row.name, row.kind, teacher.solvers[0], list(teacher.latent_shape))
    assert meta["conditioning"] == teacher.conditioning and meta["guidance"] == row.teacher_w
    key = sorted(pairs)[5]
    want = teacher.sample_latents([pairs[key]["txt"].decode()], 3, row.teacher_w, seeds=[sample_seed(key, 0)])
    got = torch.from_numpy(np.load(io.BytesIO(pairs[key]["x1.npy"])).astype(np.float32))
    torch.testing.assert_close(got, want[0], atol=2e-3, rtol=1e-3)  # stored as float16

    models, runs = tmp_path / "models", tmp_path / "runs"
    train = {"max_steps": 8, "val_check_interval": 8, "limit_val_batches": 1, "log_every_n_steps": 1}
    pdata = {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 16}
    stage = {**row.stage, "lr": 1e-3, "warmup_steps": 1}
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        **stage, "init": str(folder), "export_dir": str(models / "rf2"), "grid_steps": [1, 2]},
        {**pdata, "train": str(tmp_path / "pairs_teacher"), "val": str(tmp_path / "pairs_teacher")}, train)])
    loss = scalars(next((runs / "reflow").glob("version_*")), "train/loss")
    assert len(loss) == 8 and np.isfinite(loss).all() and np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    rf2 = _load(row, models / "rf2", match_pipeline=False)
    assert (rf2.name, rf2.kind) == (row.name, row.student_kind)

    gen_pairs(tmp_path, tiny_world, str(models / "rf2"), tmp_path / "pairs_rf2", src="pairs_rf2.yaml", guidance=1.5,
              solver="euler", **kw)
    assert len(read_pairs(tmp_path / "pairs_rf2")) == 64
    cli(["fit", "-c", BASE, "-c", tiny_yaml("distill.yaml", tmp_path, {
        **stage, "init": str(models / "rf2"), "export_dir": str(models / "instaflow")},
        {**pdata, "train": str(tmp_path / "pairs_rf2"), "val": str(tmp_path / "pairs_rf2")},
        {**train, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                             "init_args": {"save_dir": str(runs), "name": "distill"}}})])
    loss = scalars(next((runs / "distill").glob("version_*")), "train/loss")
    assert len(loss) == 8 and np.isfinite(loss).all(), loss
    assert not row.distill_falls or np.mean(loss[-3:]) < np.mean(loss[:3]), loss

    student = _load(row, models / "instaflow", match_pipeline=False)
    assert {k: getattr(student, k) for k in row.saved} == row.saved and student.kind == row.student_kind
    out = export(str(models / "instaflow"), tmp_path / "export") if row.exported else models / "instaflow"
    x0 = seeded_noise([0, 1], student.latent_shape)
    torch.save(pack_latents(x0) if row.packed else x0, tmp_path / "x0.pt")
    spec = {"load": row.pipeline_load, "call": row.reload_call, "sigmas": row.sigmas, "prompts": PROMPTS,
            "cases": [(n, theirs) for n, _, theirs in row.reload_cases]}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "x0.pt"), str(tmp_path / "plain"),
                           json.dumps(spec)], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for i, (n, w, _) in enumerate(row.reload_cases):
        ours = student.decode(student.sample_latents(PROMPTS, n, w, x0=x0))
        torch.testing.assert_close(torch.load(tmp_path / f"plain_{i}.pt"), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hub_id,options", [
    ("stabilityai/stable-diffusion-3-medium-diffusers", {}), ("stabilityai/stable-diffusion-xl-base-1.0", {}),
    ("black-forest-labs/FLUX.1-dev", {}), ("runwayml/stable-diffusion-v1-5", {})])
def test_a_missing_model_fails_naming_it(hub_id, options, tmp_path):
    from instaflow.models.families import load_family
    from instaflow.models.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=hub_id):
        load_family(hub_id, **options)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_a_family_class_names_its_pipeline_and_loads_missing_folders_by_name(row, tmp_path):
    from instaflow.models.families import registry
    from instaflow.models.loading import ModelNotFoundError

    cls = next(c for c in registry().values() if c.name == row.name)
    assert registry()[cls.pipeline_class] is cls and cls.title and cls.conditioning
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "absent")):
        cls.load(str(tmp_path / "absent"))
