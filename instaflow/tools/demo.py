"""A live one-step demo: the image follows the prompt as it is typed (Gradio).

    python -m instaflow.tools.demo                                   # = make demo: the chain's InstaFlow model
    python -m instaflow.tools.demo --model runs/embedded/models/rf2  # any model folder (2-RF: raise the steps)
    python -m instaflow.tools.demo --model runs/export/instaflow --teacher assets/embedded-sd --port 7861

Typing in the prompt box regenerates the image once the typing pauses (``--debounce-s``, 0.25 s):
every keystroke is sent, each waits that long and only the newest of a session generates. Seed,
guidance and steps regenerate at once. Every event of a session (a keystroke, a control, the page
load) takes a token, and an image is shown only if its event is still the session's newest when it
has been computed, so a slow older render never replaces a newer image. The model runs on the GPU
when there is one (``--device``), under bf16 autocast with ``--bf16`` (every family). Under the image: its latency (text encoding, the solver and
decoding, measured around the call) and setting. "Teacher beside it" adds the teacher's image for
the same prompt and seed at its own setting (25-step DPM-Solver++, w = 3 for the embedded teacher).

Any folder ``instaflow.models.families.load_family`` reads works: this framework's exports (SD
layout, SDXL), SD3 and Flux folders, and the embedded models. Images smaller than 256 px are shown
enlarged (nearest neighbour) so the 32 px embedded world is visible.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "runs/embedded/models/instaflow"
DEFAULT_TEACHER = "assets/embedded-sd"
DEFAULT_PROMPT = "a large red circle in the center on a white background"


def missing_model_message(path: str) -> str:
    """What to do when the model folder is not there (the default one is made by the chain)."""
    if str(path).rstrip("/") == DEFAULT_MODEL:
        return (f"no model at {path}: the demo's default is the one-step InstaFlow model the chain trains. "
                "Run `make train-reflow` first (about 20-30 min on 2 CPU cores), or pass MODEL=<folder> "
                "(make demo MODEL=runs/export/instaflow) / --model <folder or hub id>.")
    return (f"no model at {path}: give a model folder (an export of this framework, a diffusers SD/SDXL/SD3/Flux "
            "folder) or a hub id that is in the local cache (HF_HUB_OFFLINE=1 needs it downloaded).")


@dataclass
class Debouncer:
    """Per-session "newest event wins after a pause": ``touch`` on every event, ``newest`` after waiting."""

    delay_s: float = 0.25
    _latest: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def touch(self, session: str) -> int:
        with self._lock:
            self._latest[session] = token = self._latest.get(session, 0) + 1
        return token

    def newest(self, session: str, token: int) -> bool:
        with self._lock:
            return self._latest.get(session) == token

    def wait(self, session: str) -> bool:
        """Register an event, wait the pause, say whether it is still the newest."""
        token = self.touch(session)
        time.sleep(self.delay_s)
        return self.newest(session, token)


def newest_only(debouncer: Debouncer, session: str, token: int, compute, skip):
    """``compute()`` unless a newer event of the session came first; its result only if its event is still the
    newest once computed (else ``skip``: the newer event's render shows instead)."""
    if not debouncer.newest(session, token):
        return skip
    out = compute()
    return out if debouncer.newest(session, token) else skip


def make_handlers(render, debouncer: Debouncer, skip):
    """(typed, changed): event handlers over ``render(*inputs)``, called with ``session=``. Both take a token;
    typed waits the debounce pause first (keystrokes come in bursts), changed renders at once."""

    def typed(*inputs, session: str):
        token = debouncer.touch(session)
        time.sleep(debouncer.delay_s)
        return newest_only(debouncer, session, token, lambda: render(*inputs), skip)

    def changed(*inputs, session: str):
        return newest_only(debouncer, session, debouncer.touch(session), lambda: render(*inputs), skip)

    return typed, changed


def pick_device(device: str | None = None):
    """``device`` if given, else cuda when available, else cpu."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_uint8(image, min_px: int = 256) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H', W', 3) uint8, enlarged by an integer factor (nearest) to at least ``min_px``."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    k = max(1, -(-min_px // max(arr.shape[:2])))
    return arr.repeat(k, axis=0).repeat(k, axis=1)


class Generator:
    """One model (and optionally its teacher), one image at a time (a lock: one model, shared by all sessions),
    on ``device`` (default: cuda when available, else cpu), under bf16 autocast with ``bf16``."""

    def __init__(self, model_path: str, teacher_path: str | None = None, teacher_steps: int = 25,
                 teacher_guidance: float = 3.0, bf16: bool = False, device: str | None = None) -> None:
        from instaflow.models.families import load_family

        if not Path(model_path).exists() and not _looks_like_hub_id(model_path):
            raise FileNotFoundError(missing_model_message(model_path))
        self.model_path, self.teacher_path = model_path, teacher_path
        self.device = pick_device(device)
        self.model = load_family(model_path).to(self.device)
        self.model.bf16 = bf16
        self.teacher = None
        if teacher_path:
            if not Path(teacher_path).exists() and not _looks_like_hub_id(teacher_path):
                raise FileNotFoundError(f"no teacher at {teacher_path}: pass --teacher <folder>, or --teacher '' "
                                        "for none")
            self.teacher = load_family(teacher_path).to(self.device)
            self.teacher.bf16 = bf16
        self.teacher_steps, self.teacher_guidance = teacher_steps, teacher_guidance
        self._lock = threading.Lock()

    def image(self, prompt: str, seed: int, guidance: float, steps: int) -> tuple[np.ndarray, float]:
        """The model's image for (prompt, seed) and its latency in seconds."""
        with self._lock:
            t0 = time.perf_counter()
            img = self.model.sample_images([prompt], int(steps), float(guidance), [int(seed)])[0]  # (3, H, W)
            return to_uint8(img), time.perf_counter() - t0

    def teacher_image(self, prompt: str, seed: int) -> tuple[np.ndarray, float]:
        with self._lock:
            t0 = time.perf_counter()
            img = self.teacher.sample_images([prompt], self.teacher_steps, self.teacher_guidance, [int(seed)])[0]
            return to_uint8(img), time.perf_counter() - t0


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "runs", "assets"))


def build_app(gen: Generator, debounce_s: float = 0.25, prompt: str = DEFAULT_PROMPT):
    """The Gradio Blocks: prompt, seed, guidance, steps, teacher toggle; image, latency, teacher image."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no usage calls home
    try:
        import gradio as gr
    except ImportError as exn:  # an extra: a training install need not carry a web framework
        raise SystemExit("demo: Gradio is not installed; it comes with the demo extra: pip install -e '.[demo]' "
                         "(make demo installs it into .venv)") from exn

    debouncer = Debouncer(debounce_s)

    def render(prompt, seed, guidance, steps, with_teacher):
        prompt = (prompt or "").strip()
        img, dt = gen.image(prompt, seed, guidance, steps)
        label = f"{int(steps)} step{'s' if int(steps) > 1 else ''}"
        info = (f"**{dt * 1000:.0f} ms** · {label} · w {float(guidance):g} · seed {int(seed)} · "
                f"{Path(gen.model_path).name}")
        t_img = None
        if with_teacher and gen.teacher is not None:
            t_img, t_dt = gen.teacher_image(prompt, seed)
            info += (f"  \nteacher: **{t_dt * 1000:.0f} ms** · {gen.teacher_steps} steps · "
                     f"w {gen.teacher_guidance:g} · {Path(gen.teacher_path).name}")
        return img, info, gr.update(value=t_img, visible=bool(with_teacher and gen.teacher is not None))

    typed, changed = make_handlers(render, debouncer, skip=(gr.skip(), gr.skip(), gr.skip()))

    def on_typed(prompt, seed, guidance, steps, with_teacher, request: gr.Request):
        return typed(prompt, seed, guidance, steps, with_teacher, session=_session(request))

    def on_changed(prompt, seed, guidance, steps, with_teacher, request: gr.Request):
        return changed(prompt, seed, guidance, steps, with_teacher, session=_session(request))

    with gr.Blocks(title="InstaFlow one-step demo") as app:
        gr.Markdown("## InstaFlow: one step from text to image\nThe image follows the prompt as you type.")
        with gr.Row():
            with gr.Column(scale=1):
                box = gr.Textbox(value=prompt, label="Prompt", elem_id="prompt", lines=2)
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                guidance = gr.Slider(1.0, 8.0, value=1.0, step=0.5, label="Guidance w (1 = none)", elem_id="guidance")
                steps = gr.Slider(1, 25, value=1, step=1, label="Steps (1 = one step; more for multi-step models)",
                                  elem_id="steps")
                with_teacher = gr.Checkbox(value=False, label=f"Teacher beside it ({gen.teacher_steps} steps)",
                                           interactive=gen.teacher is not None, elem_id="teacher")
            with gr.Column(scale=1):
                image = gr.Image(label="One step", type="numpy", format="png", elem_id="image", interactive=False)
                info = gr.Markdown(elem_id="latency")
            teacher_image = gr.Image(label="Teacher", type="numpy", format="png", elem_id="teacher-image",
                                     interactive=False, visible=False)
        inputs = [box, seed, guidance, steps, with_teacher]
        outputs = [image, info, teacher_image]
        # every keystroke reaches the server at once (multiple, no concurrency limit); Debouncer keeps the newest
        box.input(on_typed, inputs, outputs, trigger_mode="multiple", concurrency_limit=None, show_progress="hidden")
        for control in (seed, guidance, steps, with_teacher):
            control.change(on_changed, inputs, outputs, trigger_mode="always_last", show_progress="hidden")
        app.load(on_changed, inputs, outputs, show_progress="hidden")
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model folder or hub id (default: the chain's InstaFlow model)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher folder shown on request ('' for none)")
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--teacher-guidance", type=float, default=3.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs, CPUs with AMX/AVX512-BF16)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    p.add_argument("--debounce-s", type=float, default=0.25, help="pause after the last keystroke before generating")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    a = p.parse_args(argv)
    try:
        gen = Generator(a.model, a.teacher or None, a.teacher_steps, a.teacher_guidance, a.bf16, a.device)
    except FileNotFoundError as exn:
        raise SystemExit(f"demo: {exn}") from None
    print(f"demo: {a.model} (teacher: {a.teacher or 'none'}) on {gen.device}{', bf16' if a.bf16 else ''}, "
          f"http://{a.host}:{a.port}", flush=True)
    build_app(gen, a.debounce_s).launch(server_name=a.host, server_port=a.port, show_error=True)


if __name__ == "__main__":
    main()
