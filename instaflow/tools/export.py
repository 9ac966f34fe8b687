"""Export a trained 2-RF or one-step model folder as a self-contained diffusers pipeline folder.

    python -m instaflow.tools.export --model runs/embedded/models/instaflow --out runs/export/instaflow

The folder holds unet/, vae/, scheduler/, text_encoder/ and tokenizer/ (the embedded MiniLM, which
project folders only reference through ``instaflow_components.json``, is resolved and copied in),
``pipeline_rectified_flow.py`` (instaflow/models/rf_pipeline.py verbatim) and a ``model_index.json``
naming it, so that diffusers alone loads it, with no import of this project:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("runs/export/instaflow", trust_remote_code=True)
    image = pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, seeds=0).images[0]

Unless ``--no-check``, the export is reloaded that way and compared with the project's own
sampling (its family's, ``load_family``) for one prompt and seed; the maximum pixel difference is printed. The
reload runs the folder's own Python files, so it first verifies that they are byte for byte this
project's ``rf_pipeline.py`` (and ``stacked_unet.py``) and refuses the folder otherwise.

The folder is written beside ``--out`` and renamed into place when complete: a kill or an error half
way leaves the previous export (or nothing), never a ``model_index.json`` over missing files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from instaflow.models.export import check, export


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="project model folder (kind flow or ddpm_velocity) or hub id")
    p.add_argument("--out", required=True, help="the diffusers folder to write")
    p.add_argument("--prompt", default="a large red circle in the center on a white background",
                   help="prompt of the README example and of the check")
    p.add_argument("--no-check", action="store_true", help="skip reloading the export with diffusers and comparing")
    a = p.parse_args(argv)
    out = export(a.model, a.out, a.prompt)
    print(f"exported {a.model} -> {out}/")
    if not a.no_check:
        for steps, guidance in ((1, 1.0), (4, 1.5)):
            diff = check(a.model, out, a.prompt, steps, guidance)
            print(f"check: {steps} step(s), w = {guidance:g}: max abs pixel difference to the project's "
                  f"sample {diff:.2e}")
    return out


if __name__ == "__main__":
    main()
