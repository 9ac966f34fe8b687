"""Installing where users already are: setup.cfg states ranges, the lock pins them, and pip keeps a supported torch."""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

LOCK = ROOT / "requirements" / "constraints.txt"
WHEELS = Path("/opt/wheels")
LOCAL_INDEXES = [u for u in ("file:///opt/pypi/simple", "file:///opt/pypi-more/simple") if Path(u[7:]).is_dir()]


def requirements() -> dict[str, list[Requirement]]:
    """setup.cfg's install_requires and extras, parsed."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def parse(text: str) -> list[Requirement]:
        return [Requirement(ln.strip()) for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]

    out = {"install": parse(cfg["options"]["install_requires"])}
    out.update({k: parse(v) for k, v in cfg["options.extras_require"].items()})
    return out


def pins() -> dict[str, str]:
    """{canonical name: version} of the lock file."""
    out = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_setup_cfg_states_ranges_that_the_lock_satisfies_and_keeps_demo_and_test_tools_as_extras():
    reqs, locked = requirements(), pins()
    for group, rs in reqs.items():
        for r in rs:
            assert canon(r.name) in locked, f"{r.name} ({group}) is not in {LOCK.name}"
            assert r.specifier.contains(locked[canon(r.name)]), f"{LOCK.name} pins {r.name}=={locked[canon(r.name)]} " \
                                                                f"outside setup.cfg's {r}"
            assert not any(s.operator == "==" for s in r.specifier), f"{r} is an exact pin: give a range"
    names = {g: {canon(r.name) for r in rs} for g, rs in reqs.items()}
    assert "gradio" not in names["install"] and names["demo"] == {"gradio"}
    assert {"pytest", "selenium", "pip-audit"} <= names["test"]
    torch, = [r for r in reqs["install"] if r.name == "torch"]
    assert all(torch.specifier.contains(v) for v in ("2.13.0", "2.13.0+cpu", "2.14.1"))
    assert not any(line.startswith(("-e", "instaflow")) for line in LOCK.read_text().splitlines())


def test_make_venv_installs_the_extras_at_the_locked_versions_and_rebuilds_when_the_lock_changes():
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", ".venv/.installed"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert "pip install --quiet -e '.[test,demo]' -c requirements/constraints.txt" in out
    rule = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("$(VENV)/.installed:")]
    assert rule == ["$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)"]


SYSTEM_CA = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


def clean_pip_env(tmp_path: Path) -> dict:
    """pip without this machine's configuration (its constraint file caps torch): local indexes passed explicitly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # which certificates to trust is not configuration to drop: behind a TLS-inspecting proxy (and in a CI shell
    # started with env -i, which has no CA variables) pip's own bundle fails where the system's store works
    ca = next((c for c in (os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE"),
                           os.environ.get("SSL_CERT_FILE"), *SYSTEM_CA) if c and Path(c).is_file()), None)
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CACHE_DIR": str(tmp_path / "c"),
            **({"PIP_CERT": ca} if ca else {})}


def pip_sources() -> list[str]:
    args = [a for u in LOCAL_INDEXES for a in ("--extra-index-url", u)]
    return args + (["--find-links", str(WHEELS)] if WHEELS.is_dir() else [])


def plan(py: str, env: dict, tmp_path: Path, *extra: str) -> dict[str, str]:
    """{name: version} that ``pip install -e <project>`` would install or replace (pip's --dry-run --report)."""
    report = tmp_path / "plan.json"
    subprocess.run([py, "-m", "pip", "install", "-q", *pip_sources(), "--dry-run", "--report", str(report),
                    "-e", str(ROOT), *extra], check=True, env=env, cwd=tmp_path)
    return {canon(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_pip_install_into_an_environment_with_torch_2_13_keeps_that_torch(tmp_path):
    """A fresh venv with torch 2.13.0 (the CPU wheel in /opt/wheels), as a cluster image ships its own build.

    With only torch there, pip would take the newest torchvision, which pins torch 2.14.1, and replace torch:
    the README's constraint (torch==<the installed version>) keeps it and takes the torchvision paired with it.
    With torch and its torchvision there (the usual image), plain `pip install -e .` replaces neither.
    No demo or test tool comes with the plain install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, env = str(venv / "bin" / "python"), clean_pip_env(tmp_path)
    subprocess.run([py, "-m", "pip", "install", "-q", *pip_sources(), "torch==2.13.0"], check=True, env=env)
    version = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], check=True, capture_output=True,
                             text=True).stdout.strip()
    assert version.startswith("2.13.0")
    keep = tmp_path / "keep-torch.txt"
    keep.write_text(f"torch=={version}\n")  # the README's recipe
    kept = plan(py, env, tmp_path, "-c", str(keep))
    assert "torch" not in kept and kept["torchvision"].startswith("0.28."), kept.get("torchvision")
    assert not {"gradio", "pytest", "selenium", "pip-audit"} & set(kept) and "lightning" in kept
    subprocess.run([py, "-m", "pip", "install", "-q", *pip_sources(), "torchvision==0.28.0"], check=True, env=env)
    image = plan(py, env, tmp_path)
    assert not {"torch", "torchvision"} & set(image), f"pip would replace {image.get('torch')} {image.get('torchvision')}"
    assert canon("instaflow-train") in image
