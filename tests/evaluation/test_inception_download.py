"""clean-fid's Inception weights on a fresh node (issue #24): every rank asks at once, one downloads.

A local HTTP server thread stands in for the CDN: slow (the body in chunks, with pauses), counting
requests, and able to cut a transfer half way. Four real processes call ``ensure_inception_weights``
at the same moment (they wait on a start file after their imports).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

BODY = os.urandom(256 * 1024)
CHUNKS = 8

WORKER = r"""
import hashlib, sys, time
from pathlib import Path
from cleanfid import downloads_helper
from instaflow.evaluation import fid

root, server, rank = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for phase in ("ok", "cut"):  # a good download, then one cut half way (fresh targets each)
    target = root / phase / "cache" / "inception-2015-12-05.pt"
    target.parent.mkdir(parents=True, exist_ok=True)  # as /tmp is
    downloads_helper.inception_url = f"{server}/{phase}/inception-2015-12-05.pt"  # the CDN -> the local server
    fid.inception_weights_path = lambda: target                                  # clean-fid's /tmp file -> here
    (root / f"ready-{phase}-{rank}").touch()
    while not (root / f"go-{phase}").exists():
        time.sleep(0.01)
    try:
        data = fid.ensure_inception_weights(download=True).read_bytes()
        line = f"OK {len(data)} {hashlib.sha256(data).hexdigest()}"
    except fid.InceptionWeightsMissing as exn:
        line = f"MISSING {exn}"
    print(f"{phase}: {line}", flush=True)
    (root / f"done-{phase}-{rank}").touch()
"""


class Server(http.server.ThreadingHTTPServer):
    """Serves BODY slowly under /ok/...; under /cut/... announces it whole but stops after half. Counts requests."""

    daemon_threads = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.requests = {"ok": 0, "cut": 0}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        phase = self.path.split("/")[1]
        self.server.requests[phase] += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        step = len(BODY) // CHUNKS
        for i in range(CHUNKS // 2 if phase == "cut" else CHUNKS):
            self.wfile.write(BODY[i * step:(i + 1) * step])
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, *args) -> None:
        pass


def wait_for(root: Path, pattern: str, n: int, procs: list, watch: Path | None = None) -> list[int]:
    """Wait until ``n`` files match ``pattern``; the sizes ``watch`` had meanwhile (what any reader could see)."""
    sizes, deadline = [], time.monotonic() + 120
    while len(list(root.glob(pattern))) < n:
        # a worker that finished its last phase may exit before the others touch their files: only a failure counts
        assert time.monotonic() < deadline and all(p.poll() in (None, 0) for p in procs), "a worker died or hung"
        if watch is not None and watch.exists():
            sizes.append(watch.stat().st_size)
        time.sleep(0.005)
    return sizes


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> dict:
    """Four processes of one node, released together twice: a good download, then a cut one."""
    root = tmp_path_factory.mktemp("node")
    srv = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), f"http://127.0.0.1:{srv.server_port}", str(r)],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(4)]
    try:
        out = {"root": root, "sizes": {}}
        for phase in ("ok", "cut"):
            wait_for(root, f"ready-{phase}-*", 4, procs)
            (root / f"go-{phase}").touch()
            target = root / phase / "cache" / "inception-2015-12-05.pt"
            out["sizes"][phase] = wait_for(root, f"done-{phase}-*", 4, procs, watch=target)
        text = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        srv.shutdown()
        srv.server_close()
    out["lines"] = {phase: [next(line[len(phase) + 2:] for line in t.splitlines() if line.startswith(phase + ": "))
                            for t in text] for phase in ("ok", "cut")}
    out["requests"] = srv.requests
    out["url"] = f"http://127.0.0.1:{srv.server_port}/cut/inception-2015-12-05.pt"
    return out


def test_four_ranks_on_a_fresh_node_download_once_and_all_read_the_whole_file(node):
    target = node["root"] / "ok" / "cache" / "inception-2015-12-05.pt"
    assert node["requests"]["ok"] == 1  # one download; the others waited for the lock and found the file
    assert node["lines"]["ok"] == [f"OK {len(BODY)} {hashlib.sha256(BODY).hexdigest()}"] * 4, node["lines"]["ok"]
    assert set(node["sizes"]["ok"]) <= {len(BODY)}  # the path never held a part of the file
    assert target.read_bytes() == BODY
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".lock"]


def test_a_failed_download_leaves_no_file_and_every_rank_raises_the_named_cause(node):
    target = node["root"] / "cut" / "cache" / "inception-2015-12-05.pt"
    assert not node["sizes"]["cut"] and not target.exists()
    for line in node["lines"]["cut"]:
        assert line.startswith("MISSING clean-fid's Inception weights are missing"), node["lines"]["cut"]
        assert f"inception-2015-12-05.pt at {target}" in line and node["url"] in line and "download failed" in line
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name + ".lock"]  # no partial or temporary file
