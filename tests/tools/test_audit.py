"""`make audit` (.ci/audit.py): a known vulnerability fails, an accepted one needs a reason, unchecked pins are counted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / ".ci" / "audit.py"


def load():
    spec = importlib.util.spec_from_file_location("ci_audit", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


VULN = {"id": "PYSEC-2099-1", "fix_versions": ["2.0.1"], "aliases": [], "description": "x"}
REPORT = {"dependencies": [{"name": "a", "version": "2.0.0", "vulns": [VULN]},
                           {"name": "b", "version": "1.0", "vulns": []},
                           {"name": "c", "version": "3.0", "skip_reason": "Dependency not found on PyPI"}]}


def fake_pip_audit(tmp_path, report: dict) -> dict:
    """An importable stand-in `pip_audit` that records its argv and writes ``report`` to -o."""
    pkg = tmp_path / "fake" / "pip_audit"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        "import json, sys\n"
        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"open(sys.argv[sys.argv.index('-o') + 1], 'w').write({json.dumps(report)!r})\n"
        "sys.exit(1)\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}


def test_a_known_vulnerability_fails_naming_the_pin_the_id_and_the_fix(tmp_path):
    env = fake_pip_audit(tmp_path, REPORT)
    r = subprocess.run([sys.executable, str(SCRIPT), "requirements/constraints.txt"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "VULNERABLE a==2.0.0: PYSEC-2099-1 (fixed in 2.0.1)" in r.stdout
    assert "audit: 2 pins checked, 1 known vulnerabilities, 1 not checked" in r.stdout
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:8] == ["-r", "requirements/constraints.txt", "-s", "pypi", "--no-deps", "--disable-pip",
                        "--progress-spinner", "off"]


def test_unchecked_pins_are_counted_and_fail_only_when_strict():
    audit = load()
    clean = {"dependencies": REPORT["dependencies"][1:]}
    rc, lines = audit.verdict(clean, strict=False, accepted={})
    assert rc == 0 and "NOT CHECKED: 1 of 2 pins (c), e.g. Dependency not found on PyPI" in lines
    assert audit.verdict(clean, strict=True, accepted={})[0] == 1
    rc, lines = audit.verdict({"dependencies": REPORT["dependencies"][2:]}, strict=False, accepted={})
    assert any("checked nothing" in ln for ln in lines)


def test_an_accepted_vulnerability_passes_with_its_reason_and_one_without_a_reason_is_refused(tmp_path):
    audit = load()
    rc, lines = audit.verdict(REPORT, strict=False, accepted={"PYSEC-2099-1": "only in a code path we never call"})
    assert rc == 0 and "accepted a==2.0.0: PYSEC-2099-1 (only in a code path we never call)" in lines
    ign = tmp_path / "ignore.txt"
    ign.write_text("# comment\nPYSEC-2099-1 only in a code path we never call\n")
    assert audit.ignored(ign) == {"PYSEC-2099-1": "only in a code path we never call"}
    ign.write_text("PYSEC-2099-2\n")
    with pytest.raises(SystemExit, match="PYSEC-2099-2 has no reason"):
        audit.ignored(ign)
    assert audit.ignored() == {}  # the committed list: none accepted at present


def test_no_report_means_the_audit_did_not_run_and_fails(tmp_path):
    pkg = tmp_path / "fake" / "pip_audit"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import sys\nprint('ConnectionError: pypi.org', file=sys.stderr)\nsys.exit(1)\n")
    r = subprocess.run([sys.executable, str(SCRIPT), "requirements/constraints.txt"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")}, capture_output=True, text=True)
    assert r.returncode == 1 and "audit did not run" in r.stderr and "ConnectionError" in r.stderr


def test_pip_audit_trusts_the_systems_ca_store_when_no_bundle_is_given(tmp_path):
    """pip-audit's client trusts certifi's bundle only: behind a TLS-inspecting proxy (this project's build
    machines) it failed with CERTIFICATE_VERIFY_FAILED in a clean environment where pip itself worked."""
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    audit = load()
    assert audit.audit_env({"PIP_CERT": str(ca)})["REQUESTS_CA_BUNDLE"] == str(ca)
    assert audit.audit_env({"REQUESTS_CA_BUNDLE": "/given.crt", "PIP_CERT": str(ca)})["REQUESTS_CA_BUNDLE"] == "/given.crt"
    system = next((c for c in audit.SYSTEM_CA if os.path.isfile(c)), None)
    assert audit.audit_env({"PIP_CERT": str(tmp_path / "absent.crt")}).get("REQUESTS_CA_BUNDLE") == system
