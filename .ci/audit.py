"""pip-audit of the pinned set: a known vulnerability fails; a pin the service could not check is counted.

    python .ci/audit.py requirements/constraints.txt [--strict]

Runs ``pip-audit -r FILE -s pypi --no-deps --disable-pip`` (no resolution, no install: the pins are
checked as written) and reads its JSON report. A vulnerability fails unless its ID is listed with a
reason in requirements/audit-ignore.txt. A pin that PyPI's advisory service does not know (pip-audit
skips it) is counted and named; ``--strict`` fails on it too. Without network the audit fails: an audit
that did not run is not a pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

IGNORE = Path(__file__).resolve().parent.parent / "requirements" / "audit-ignore.txt"
SYSTEM_CA = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")  # Debian/Ubuntu, RHEL


def audit_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for pip-audit: its HTTP client (requests) trusts certifi's bundle only, so behind a
    TLS-inspecting proxy it fails where pip (which reads the system's or PIP_CERT's store) succeeds; without
    REQUESTS_CA_BUNDLE it is pointed at PIP_CERT, SSL_CERT_FILE or the system's CA bundle, the first that exists."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("REQUESTS_CA_BUNDLE"):
        found = next((c for c in (env.get("PIP_CERT"), env.get("SSL_CERT_FILE"), *SYSTEM_CA) if c and Path(c).is_file()),
                     None)
        if found:
            env["REQUESTS_CA_BUNDLE"] = found
    return env


def ignored(path: Path = IGNORE) -> dict[str, str]:
    """{vulnerability id: reason} from the ignore file; an id without a reason is an error."""
    out = {}
    lines = path.read_text().splitlines() if path.exists() else []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        vid, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{n}: {vid} has no reason: write '<ID> <why it is accepted>'")
        out[vid] = reason.strip()
    return out


def verdict(report: dict, strict: bool, accepted: dict[str, str]) -> tuple[int, list[str]]:
    """(exit code, lines to print) for a pip-audit JSON report."""
    deps = report.get("dependencies", [])
    found = [(d["name"], d["version"], v) for d in deps for v in d.get("vulns", []) if v["id"] not in accepted]
    skipped = [d for d in deps if d.get("skip_reason")]
    lines = [f"VULNERABLE {name}=={ver}: {v['id']} (fixed in {', '.join(v.get('fix_versions') or []) or 'no release'})"
             for name, ver, v in found]
    lines += [f"accepted {d['name']}=={d['version']}: {v['id']} ({accepted[v['id']]})"
              for d in deps for v in d.get("vulns", []) if v["id"] in accepted]
    if skipped:
        lines.append(f"NOT CHECKED: {len(skipped)} of {len(deps)} pins ({', '.join(d['name'] for d in skipped[:5])}"
                     f"{', ...' if len(skipped) > 5 else ''}), e.g. {skipped[0]['skip_reason']}")
    if skipped and len(skipped) == len(deps):
        lines.append("the advisory service knew none of the pins: PyPI's per-version JSON "
                     "(https://pypi.org/pypi/NAME/VERSION/json) is not served to this machine; the audit checked nothing")
    lines.append(f"audit: {len(deps) - len(skipped)} pins checked, {len(found)} known vulnerabilities, "
                 f"{len(skipped)} not checked")
    return (1 if found or (strict and skipped) else 0), lines


def run_pip_audit(requirements: str, accepted: dict[str, str]) -> dict:
    """pip-audit's JSON report for the pinned file (raises SystemExit when it could not run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip_audit", "-r", requirements, "-s", "pypi", "--no-deps", "--disable-pip",
               "--progress-spinner", "off", "-f", "json", "-o", str(out)]
        for vid in accepted:
            cmd += ["--ignore-vuln", vid]
        r = subprocess.run(cmd, capture_output=True, text=True, env=audit_env())
        if not out.exists():  # no report: it did not run (no network, no pip-audit)
            raise SystemExit(f"audit did not run (pip-audit exit {r.returncode}):\n{r.stderr.strip()[-2000:]}\n"
                             "install it with pip install -e '.[test]' and check that pypi.org is reachable")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("requirements", help="a file of exact pins (requirements/constraints.txt)")
    p.add_argument("--strict", action="store_true", help="also fail when a pin could not be checked")
    a = p.parse_args(argv)
    accepted = ignored()
    rc, lines = verdict(run_pip_audit(a.requirements, accepted), a.strict, accepted)
    print("\n".join(lines))
    return rc


if __name__ == "__main__":
    sys.exit(main())
