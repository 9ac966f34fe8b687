"""``make demo`` in a real browser: headless Chromium from the system packages, driven by Selenium.

The demo runs as ``python -m instaflow.tools.demo`` (a subprocess, as ``make demo`` runs it) on the
committed miniature SD (``assets/embedded-sd``: a trained model, so prompts visibly matter; one
DPM-Solver++ step stands in for a one-step student, and its 25-step self is the teacher); the test
types prompts into the page and reads back the image the page shows. Needs
``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (Debian's ``chromium`` and ``chromium-driver``;
``.ci/run`` installs them); nothing is downloaded (``SE_OFFLINE``: Selenium Manager stays off).

``DEMO_MODEL=<folder> DEMO_SCREENSHOT=docs/demo.png`` runs the same test on another model (the chain's
InstaFlow model for the README's screenshot) and keeps the screenshot there.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def test_missing_default_model_names_the_chain(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "instaflow.tools.demo"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "runs/embedded/models/instaflow" in proc.stderr and "make train-reflow" in proc.stderr


def test_debouncer_keeps_only_the_newest_event_of_a_session():
    import threading

    from instaflow.tools.demo import Debouncer

    d = Debouncer(0.2)
    results: dict[int, bool] = {}
    threads = []
    for i in range(3):  # three keystrokes 50 ms apart
        threads.append(threading.Thread(target=lambda i=i: results.__setitem__(i, d.wait("s1"))))
        threads[-1].start()
        time.sleep(0.05)
    assert d.wait("s2")  # another session is not affected
    for t in threads:
        t.join()
    assert results == {0: False, 1: False, 2: True}


def test_an_older_render_finishing_after_a_newer_event_does_not_update_the_image():
    """A keystroke's render is slow; a seed change (no typing) comes while it computes and renders fast. The
    keystroke's image, finished last, must not replace the seed change's (before, only keystrokes took a token)."""
    import threading

    from instaflow.tools.demo import Debouncer, make_handlers

    started = threading.Event()

    def render(prompt, seed):
        if seed == 0:  # the older event: slow
            started.set()
            time.sleep(0.6)
        return f"{prompt}/{seed}"

    typed, changed = make_handlers(render, Debouncer(0.05), skip="SKIP")
    got = {}
    older = threading.Thread(target=lambda: got.__setitem__("typed", typed("a red circle", 0, session="s")))
    older.start()
    assert started.wait(5)
    got["seed"] = changed("a red circle", 7, session="s")  # while the keystroke's render is computing
    older.join()
    assert got == {"seed": "a red circle/7", "typed": "SKIP"}
    # a newer event that came while an older one waited its pause: the older one does not even compute
    assert changed("x", 1, session="t") == "x/1" and typed("y", 2, session="t") == "y/2"


def test_the_device_is_cuda_when_available_else_cpu(monkeypatch):
    import torch

    from instaflow.tools import demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.pick_device() == torch.device("cpu")
    assert demo.pick_device("cuda:1") == torch.device("cuda:1")  # --device wins


def test_the_model_and_teacher_are_moved_to_the_chosen_device(monkeypatch, tiny_sd_folder):
    """The generator moves every network to the device it picked (here the meta device stands in for a GPU)."""
    import torch

    from instaflow.tools import demo

    monkeypatch.setattr(demo, "pick_device", lambda device=None: torch.device("meta"))
    gen = demo.Generator(str(tiny_sd_folder), str(tiny_sd_folder))
    assert gen.device == torch.device("meta")
    for model in (gen.model, gen.teacher):
        params = [p for net in (model.unet, model.vae, model.text_encoder) for p in net.parameters()]
        assert params and {p.device.type for p in params} == {"meta"}


@pytest.mark.parametrize("family", ["sd3", "sdxl", "flux"])
def test_bf16_runs_every_familys_denoiser_text_encoders_and_vae_under_autocast(family, request):
    """--bf16 (``model.bf16``) now reaches SDXL, SD3 and Flux as it reaches SD: autocast is active in the
    denoiser's, the text encoders' and the VAE decoder's forward passes; the latents stay fp32."""
    import torch

    from instaflow.models.families import load_family

    model = load_family(str(request.getfixturevalue(f"tiny_{family}_folder")))
    if family == "flux":
        model.resolution = 16  # the tiny VAE's size (latent 4 x 4 after packing 2 x 2)
    seen: dict[str, set] = {}

    def hook(name):
        def record(module, args, out):
            out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            out = getattr(out, "last_hidden_state", out)
            seen.setdefault(name, set()).add((torch.is_autocast_enabled("cpu"), out.dtype))
        return record

    model.unet.register_forward_hook(hook("denoiser"))
    model.pipe.text_encoder.register_forward_hook(hook("text"))
    model.pipe.vae.decoder.register_forward_hook(hook("vae"))
    for bf16 in (False, True):
        seen.clear()
        model.bf16 = bf16
        x1 = model.sample_latents(["a red circle"], 2, 2.0, [0])
        images = model.decode(x1)
        assert x1.dtype == torch.float32 and images.dtype == torch.float32 and torch.isfinite(images).all()
        if bf16:
            assert seen["denoiser"] == {(True, torch.bfloat16)}, seen
            assert all(enabled for name in ("text", "vae") for enabled, _ in seen[name]), seen
        else:
            assert all(not enabled and dtype == torch.float32 for v in seen.values() for enabled, dtype in v), seen


EMBEDDED_SD = str(ROOT / "assets" / "embedded-sd")


@pytest.fixture
def demo_server(tmp_path):
    """The demo's URL: on a free port, on DEMO_MODEL or the committed miniature SD, with the teacher."""
    model = os.environ.get("DEMO_MODEL") or EMBEDDED_SD
    teacher = os.environ.get("DEMO_TEACHER") or EMBEDDED_SD
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT),
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    args = [sys.executable, "-m", "instaflow.tools.demo", "--model", model, "--teacher", teacher, "--port", str(port)]
    log = open(tmp_path / "demo.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the demo exited: " + (tmp_path / "demo.log").read_text()[-3000:])
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        raise AssertionError("the demo did not answer in 180 s: " + (tmp_path / "demo.log").read_text()[-3000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver "
                    "(.ci/run does)")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def shown_image(driver, elem_id: str, previous: str | None = None, timeout: float = 90) -> tuple[str, np.ndarray]:
    """(src, pixels) of the image the page shows in ``#elem_id``, waiting for one other than ``previous``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def src(d):
        imgs = d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
        s = imgs[0].get_attribute("src") if imgs else None
        return s if s and s != previous else False

    url = WebDriverWait(driver, timeout, poll_frequency=0.2).until(src)
    with urllib.request.urlopen(url, timeout=10) as r:  # the bytes the browser was given
        pixels = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")).astype(np.float32)
    return url, pixels


def type_prompt(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    for ch in text:  # as a person types: one input event per key
        box.send_keys(ch)
        time.sleep(0.02)


def test_demo_in_a_real_browser(demo_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(demo_server)
    first_src, _ = shown_image(browser, "image")  # the page renders the default prompt on load
    type_prompt(browser, "a small blue square in the top left on a black background")
    src_a, a = shown_image(browser, "image", previous=first_src)
    assert a.shape[0] >= 256 and a.std() > 1.0, "blank image"  # enlarged for display, and not one flat colour
    latency = browser.find_element(By.CSS_SELECTOR, "#latency").text
    assert " ms" in latency and "1 step" in latency and "seed 0" in latency

    type_prompt(browser, "a big green triangle at the bottom on a gray background")
    src_b, b = shown_image(browser, "image", previous=src_a)
    assert np.abs(a - b).mean() > 5.0, "the image did not change with the prompt"  # of 255

    browser.find_element(By.CSS_SELECTOR, "#teacher input").click()  # the teacher's image beside it, on request
    _, t = shown_image(browser, "teacher-image")
    assert t.std() > 1.0 and "teacher:" in browser.find_element(By.CSS_SELECTOR, "#latency").text

    shot = Path(os.environ.get("DEMO_SCREENSHOT") or tmp_path / "demo.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_without_gradio_the_demo_names_the_extra(monkeypatch):
    """Gradio is the [demo] extra, not a training dependency: without it the demo says how to get it."""
    import builtins

    from instaflow.tools import demo

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[demo\]'"):
        demo.build_app(gen=None)
