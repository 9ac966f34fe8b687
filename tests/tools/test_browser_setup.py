"""`make test`'s browser step (.ci/browser): installs Chromium where it can, else stops with the command."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / ".ci" / "browser"


def stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def world(tmp_path: Path, uid: int, sudo: str | None, apt: bool = True, apt_fails: bool = False) -> dict:
    """A PATH of stand-ins: id (the uid), sudo (none, 'ok' without a password, 'password'), apt-get (logs, installs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    chromium, driver, log = tmp_path / "usr" / "chromium", tmp_path / "usr" / "chromedriver", tmp_path / "apt.log"
    stand_in(bin_dir, "id", f"echo {uid}")
    stand_in(bin_dir, "env", 'while [[ "$1" == *=* ]]; do export "$1"; shift; done; exec "$@"')
    if sudo == "ok":
        stand_in(bin_dir, "sudo", f'[ "$1" = -n ] && shift; echo "sudo $*" >> {log}; export SUDO_USED=1; "$@"')
    elif sudo == "password":
        stand_in(bin_dir, "sudo", 'echo "sudo: a password is required" >&2; exit 1')
    if apt:
        install = "exit 100" if apt_fails else (f"/bin/mkdir -p {chromium.parent}; printf '#!/bin/sh\\n' > {chromium}; "
                                                f"/bin/cp {chromium} {driver}; /bin/chmod +x {chromium} {driver}")
        stand_in(bin_dir, "apt-get", f'echo "apt-get $* sudo=${{SUDO_USED:-0}} frontend=${{DEBIAN_FRONTEND:-}}" >> {log}\n'
                                     f'if [ "$1" = install ]; then {install}; fi')
    return {"PATH": str(bin_dir), "CHECK_CHROMIUM": str(chromium), "CHECK_CHROMEDRIVER": str(driver)}


def run(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def apt_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt.log"
    return [ln for ln in log.read_text().splitlines() if ln.startswith("apt-get")] if log.exists() else []


def test_root_installs_with_apt_get(tmp_path):
    r = run(world(tmp_path, uid=0, sudo=None))
    assert r.returncode == 0, r.stderr
    calls = apt_calls(tmp_path)
    assert [c.split()[1] for c in calls] == ["update", "install"] and "sudo=0" in calls[1]
    assert "-y -qq chromium chromium-driver" in calls[1] and "frontend=noninteractive" in calls[1]
    assert (tmp_path / "usr" / "chromedriver").exists()


def test_a_user_with_passwordless_sudo_installs_through_sudo(tmp_path):
    r = run(world(tmp_path, uid=1000, sudo="ok"))
    assert r.returncode == 0, r.stderr
    assert [c.split()[1] for c in apt_calls(tmp_path)] == ["update", "install"]
    assert all("sudo=1" in c for c in apt_calls(tmp_path))


@pytest.mark.parametrize("sudo", [None, "password"])
def test_without_root_or_sudo_it_stops_with_the_install_command(tmp_path, sudo):
    r = run(world(tmp_path, uid=1000, sudo=sudo))
    assert r.returncode == 1 and apt_calls(tmp_path) == []
    assert "sudo sh -c 'apt-get update && apt-get install -y chromium chromium-driver'" in r.stderr
    assert "make test BROWSER=0" in r.stderr and str(tmp_path / "usr" / "chromium") in r.stderr


def test_nothing_to_do_when_both_are_there(tmp_path):
    env = world(tmp_path, uid=1000, sudo=None)
    for key in ("CHECK_CHROMIUM", "CHECK_CHROMEDRIVER"):
        Path(env[key]).parent.mkdir(exist_ok=True)
        Path(env[key]).write_text("#!/bin/sh\n")
        Path(env[key]).chmod(0o755)
    r = run(env)
    assert r.returncode == 0 and r.stderr == "" and apt_calls(tmp_path) == []


def test_a_failed_install_or_no_apt_get_stops_with_a_message(tmp_path):
    r = run(world(tmp_path, uid=0, sudo=None, apt_fails=True))
    assert r.returncode == 1 and "apt-get could not install them" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    r = run(world(other, uid=0, sudo=None, apt=False))
    assert r.returncode == 1 and "has no apt-get" in r.stderr


def test_make_test_runs_the_browser_step_first_and_browser_0_deselects_the_test():
    def dry(*args):
        return subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "test", *args], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.splitlines()

    lines = dry()
    assert lines[0] == "bash .ci/browser" and "pytest" in lines[1] and "--deselect" not in lines[1]
    off = dry("BROWSER=0")
    assert "bash .ci/browser" not in off
    assert "--deselect tests/tools/test_demo.py::test_demo_in_a_real_browser" in off[-1]
