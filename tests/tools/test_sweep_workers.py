"""Many workers on one Optuna study: no trial lost or run twice (SQLite, PostgreSQL, journal file); a worker killed
with -9 mid-trial leaves a trial that is failed and run again (RDB heartbeat; the journal's dead-pid rule).

The trials' "training" is ``tests/tools/sweep_standin.py`` (a curve reported through the sweep's TrialReporter,
no model), so the tests measure the study machinery, not training. The PostgreSQL server is a real one, started
on a temporary folder and a free port with initdb/pg_ctl (as the ``postgres`` user when the tests run as root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port


def _pg_bin() -> Path | None:
    """The folder of initdb/pg_ctl/postgres: on PATH, /usr/local/bin, or Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    dirs = ([Path(found).parent] if found else []) + [Path("/usr/local/bin")] + sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((d for d in dirs if all((d / b).exists() for b in ("initdb", "pg_ctl", "postgres"))), None)


PG_BIN = _pg_bin()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def standin_sweep(tmp_path: Path, storage: str, xs: list[float], **fixed) -> Path:
    spec = {"configs": ["experiments/base/default.yaml"], "metric": "val/loss", "entry": "tests.tools.sweep_standin",
            "save_dir": str(tmp_path / "save"), "grid": {"x": xs}, "storage": storage,
            "heartbeat": {"interval": 1, "grace": 3, "max_retry": 2},
            "fixed": {"steps": 3, "log": str(tmp_path / "calls.jsonl"), **fixed}}
    path = tmp_path / "standin.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study_of(path: Path):
    from instaflow.tools.sweep import Sweep, open_study

    return open_study(Sweep.load(path), create=False)


def calls(tmp_path: Path) -> list[dict]:
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _pg_run(cmd: list[str], user: str | None) -> None:
    if user:  # initdb and postgres refuse to run as root
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own: initdb on a temporary folder, pg_ctl start on a free port, stopped after."""
    if PG_BIN is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl/postgres are not on PATH, in /usr/local/bin or "
                    "/usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)")
    user = "postgres" if os.geteuid() == 0 else None
    if user and shutil.which("setpriv") is None:
        pytest.skip("running as root, and setpriv (util-linux) is missing to start PostgreSQL as the postgres user")
    root = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    if user:
        shutil.chown(root, user, user)
    data, port = root / "data", free_port()
    _pg_run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], user)
    _pg_run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
             f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], user)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        _pg_run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], user)
        shutil.rmtree(root, ignore_errors=True)


def _url(kind: str, tmp_path: Path, request) -> str:
    if kind == "postgresql":
        return request.getfixturevalue("postgres_url")
    return {"sqlite": f"sqlite:///{tmp_path}/study.db", "journal": f"journal://{tmp_path}/study.log"}[kind]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "journal"])
def test_two_workers_on_one_study_run_every_trial_exactly_once(kind, tmp_path, request):
    from optuna.trial import TrialState

    xs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    path = standin_sweep(tmp_path, _url(kind, tmp_path, request), xs)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "instaflow.tools.sweep", str(path), "--workers", "2"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = study_of(path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(xs)
    assert sorted(t.params["x"] for t in trials) == xs  # every grid point once
    for t in trials:
        assert t.value == pytest.approx((t.params["x"] - 0.3) ** 2 + 1 / 3) and t.last_step == 3
    started = calls(tmp_path)
    assert sorted(c["trial_id"] for c in started) == sorted(t._trial_id for t in trials)  # each run started once
    # both workers took trials: the queue was shared, not run twice by one and idle in the other
    workers = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(workers) == 2, out.stdout
    print(f"{kind}: 2 workers, {len(xs)} trials in {time.time() - t0:.1f} s")


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_worker_killed_mid_trial_leaves_a_failed_trial_that_runs_again(kind, tmp_path):
    """kill -9 of a worker while its trial runs: the trial is FAIL (heartbeat stale on SQLite; its pid gone on the
    journal), queued again with its values, and the next worker runs the retry to COMPLETE in the same folder."""
    from optuna.trial import TrialState

    url = {"sqlite": f"sqlite:///{tmp_path}/study.db", "journal": f"journal://{tmp_path}/study.log"}[kind]
    path = standin_sweep(tmp_path, url, [0.1, 0.2], steps=6, sleep=0.5)
    a = subprocess.Popen([sys.executable, "-m", "instaflow.tools.sweep", str(path), "--worker"], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not calls(tmp_path):  # the first trial's run has started
        assert time.time() < deadline and a.poll() is None, a.stdout.read() if a.poll() is not None else "no start"
        time.sleep(0.2)
    time.sleep(1.0)  # mid-trial: a beat or two recorded, some steps reported
    a.send_signal(signal.SIGKILL)
    a.wait()
    run_pid = calls(tmp_path)[0]["pid"]
    deadline = time.time() + 30
    while Path(f"/proc/{run_pid}").exists() and time.time() < deadline:  # its run follows it (PDEATHSIG)
        time.sleep(0.2)
    assert not Path(f"/proc/{run_pid}").exists(), "the killed worker's run is still going"
    killed = study_of(path).get_trials()[0]
    assert killed.state == TrialState.RUNNING  # what a dead worker leaves behind
    b = subprocess.run([sys.executable, "-m", "instaflow.tools.sweep", str(path), "--worker"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=240)
    assert b.returncode == 0, b.stdout + b.stderr
    assert "trial 0: its worker is gone; failed and queued again" in b.stdout
    trials = study_of(path).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == trials[0].params == {"x": 0.1}
    assert retry.user_attrs["version"] == trials[0].user_attrs["version"] == "000-x=0.1"  # resumes in its folder
    assert retry.value == pytest.approx((0.1 - 0.3) ** 2 + 1 / 6)
    if kind == "journal":
        assert trials[0].user_attrs["reason"].endswith(f":{killed.user_attrs['worker']['pid']} is gone")
    # started: trial 0 once (killed), trial 1 once, the retry once
    assert sorted(c["trial_id"] for c in calls(tmp_path)) == sorted(t._trial_id for t in trials)
