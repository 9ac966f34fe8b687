"""Export a trained 2-RF or one-step model folder as a self-contained diffusers pipeline folder.

The folder holds unet/, vae/, scheduler/, text_encoder/ and tokenizer/ (the embedded MiniLM, which
project folders only reference through ``instaflow_components.json``, is resolved and copied in),
``pipeline_rectified_flow.py`` (``instaflow/models/rf_pipeline.py`` verbatim) and a
``model_index.json`` naming it, so that diffusers alone loads it, with no import of this project.
``python -m instaflow.tools.export`` runs it and checks the reload.

The folder is written beside ``out`` and renamed into place when complete (``instaflow.state.atomic_folder``):
a kill or an error half way leaves the previous export (or nothing), never a folder whose
``model_index.json`` says "done" over missing files. ``check`` loads an export with the folder's own
pipeline code only after verifying that code is this project's, byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from instaflow.models import loading
from instaflow.models.lora import LORA_DIR
from instaflow.state import atomic_folder, atomic_write_text, read_json

README = """# {name}: a rectified-flow text-to-image model (InstaFlow framework export)

Exported from `{model}`, kind `{kind}`: {kind_text}.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)
image = pipe("{prompt}", num_inference_steps=1, guidance_scale=1.0, seeds=0).images[0]
```

- Sampling: Euler steps from t = 0 (noise) to t = 1 (image) with dt = 1/N.
  `num_inference_steps=1, guidance_scale=1.0` is the one-step case (no unconditional pass); with
  `guidance_scale` w > 1 each step uses v_u + w (v_c - v_u).
- `trust_remote_code=True` lets diffusers run `pipeline_rectified_flow.py` from this folder (read it
  first: it imports only torch, diffusers and transformers).
- `seeds`: per-image noise seeds (an int s gives image j of each prompt the seed s + j). The same
  prompt and seed give the same image as the framework's
  `python -m instaflow.tools.generate --model {model} --seed s`.
- Text encoder `{text_class}`, padded to {max_length} tokens; images are {size}x{size} px, `output_type`
  "pil", "np" or "pt" (values in [0, 1]).
"""

KIND_TEXT = {
    "flow": "a rectified-flow UNet fed the timestep 1000 (1 - t), as the released InstaFlow / 2-RF weights",
    "ddpm_velocity": "a DDPM UNet trained through the analytic epsilon/v -> velocity conversion",
}


LORA_README = """# {name}: a LoRA adapter for rectified-flow sampling (InstaFlow framework export)

Rank {rank}, alpha {alpha}, on `{targets}` of the base model `{base}`, sampled as kind `{kind}`.
`base/` is that base model as a diffusers folder (the same pipeline class as the merged model in `..`).

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{out}/base", trust_remote_code=True)
pipe.load_lora_weights("{out}")        # pytorch_lora_weights.safetensors, diffusers' LoRA format
image = pipe("{prompt}", num_inference_steps=1, guidance_scale=1.0, seeds=0).images[0]
```

On another copy of the same base (e.g. your own SD 1.5 folder), load it into this pipeline class with
the same `kind`, then the adapter. The merged model (`..`) gives the same images without the adapter.
"""


def export(model: str, out: str | Path, prompt: str = "a large red circle in the center on a white background") -> Path:
    """Write the diffusers folder for the project model folder (or hub id) ``model``; returns ``out``.

    A LoRA student's folder (``lora/`` beside the merged weights) also gets ``out/lora/``: the adapter,
    and under it ``base/``, the base model it adapts as the same pipeline, so that
    ``DiffusionPipeline.from_pretrained(out/lora/base).load_lora_weights(out/lora)`` reproduces the merged model.
    Written into a folder beside ``out`` and renamed into place when whole; an older ``out`` stays until then.
    """
    out = Path(out)
    with atomic_folder(out) as tmp:  # the READMEs name ``out``, never the temporary folder
        _export(model, tmp, prompt, shown=out)
        adapter = Path(loading.resolve_path(model)) / LORA_DIR
        if adapter.is_dir():
            _export_adapter(model, adapter, tmp / LORA_DIR, prompt, shown=out / LORA_DIR)
    return out


def _export_adapter(model: str, adapter: Path, dst: Path, prompt: str, shown: Path) -> None:
    """``dst``: the LoRA adapter of ``model``, its base as the same pipeline (``base/``) and a README naming ``shown``."""
    info = read_json(adapter / "lora.json")
    if not isinstance(info, dict) or not {"base", "rank", "alpha", "target_modules"} <= set(info):
        raise ValueError(f"{adapter / 'lora.json'} is missing or unreadable (rank, alpha, target_modules, base): "
                         "export the LoRA student again (callbacks.export.Export writes it)")
    shutil.copytree(adapter, dst)
    kind = loading.component_sources(model)["kind"]
    _export(model, dst / "base", prompt, unet_from=info["base"], shown=shown / "base")
    atomic_write_text(dst / "README.md", LORA_README.format(
        name=shown.parent.name, rank=info["rank"], alpha=info["alpha"], targets=", ".join(info["target_modules"]),
        base=info["base"], kind=kind, out=shown, prompt=prompt))


def _export(model: str, out: str | Path, prompt: str, unet_from: str | None = None,
            shown: Path | None = None) -> Path:
    """The pipeline folder of ``model`` (its UNet, or ``unet_from``'s: a LoRA's base, sampled as ``model``'s kind),
    written by its family (``export_pipeline``); ``shown``: the path its README names (where the folder will be
    once renamed into place)."""
    from instaflow.models import families

    return families.family_class(model).export_pipeline(model, Path(out), prompt, unet_from=unet_from, shown=shown)


def check(model: str, out: str | Path, prompt: str, steps: int, guidance: float, seed: int = 0) -> float:
    """Max abs pixel difference (images in [0, 1]) between the reloaded export and the project's sample."""
    from diffusers import DiffusionPipeline

    from instaflow.models.families import load_family

    verify_own_code(out)
    ours = load_family(model).sample_images([prompt], steps, guidance, [seed])
    # trust_remote_code=True runs the folder's Python files: verify_own_code has just checked that they are
    # byte for byte this project's rf_pipeline.py (and stacked_unet.py), so no other code can run here
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, seeds=[seed], output_type="pt").images
    return float((ours - theirs.cpu()).abs().max())


class UntrustedExportCode(RuntimeError):
    """An export folder whose Python code is not this project's own: it is not loaded (its code never runs)."""


def own_code() -> dict[str, bytes]:
    """The Python files an export may carry, by their path inside it: this project's pipeline and stacked U-Net."""
    from instaflow.models import rf_pipeline, stacked_unet

    return {rf_pipeline.PIPELINE_FILE: Path(rf_pipeline.__file__).read_bytes(),
            f"unet/{stacked_unet.MODULE_NAME}.py": Path(stacked_unet.__file__).read_bytes()}


def verify_own_code(out: str | Path) -> None:
    """Refuse (``UntrustedExportCode``) an export whose Python files, or the code ``model_index.json`` names, are not
    byte for byte this project's: what lets ``check`` load it with ``trust_remote_code=True``."""
    out, allowed = Path(out), own_code()
    problems = []
    for path in sorted(out.rglob("*.py")):
        rel = path.relative_to(out).as_posix()
        if path.is_symlink() or allowed.get(rel) != path.read_bytes():
            problems.append(f"{rel} is not this project's {'code' if rel not in allowed else 'file of that name'}")
    index = read_json(out / "model_index.json")
    if not isinstance(index, dict):
        problems.append("model_index.json is missing or unreadable")
    else:
        for name, entry in index.items():
            library = entry[0] if isinstance(entry, list) and entry else None
            custom = f"{name}/{library}.py" if name != "_class_name" else f"{library}.py"
            if isinstance(library, str) and library not in ("diffusers", "transformers") and custom not in allowed:
                problems.append(f"model_index.json names code {library!r} for {name!r}")
    if problems:
        raise UntrustedExportCode(
            f"{out} is not loaded with its own code ({'; '.join(problems)}): an export of this project carries only "
            f"{' and '.join(sorted(allowed))}, copied verbatim. Export the model again with `python -m "
            "instaflow.tools.export`, or load the folder with your own, reviewed pipeline code")
