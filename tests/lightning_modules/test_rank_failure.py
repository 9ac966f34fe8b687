"""A rank that raises alone does not leave the others in a collective (issue 24, the scale review).

The stream guard (``data.stream_guard``) raises on each rank by itself: with every shard empty all ranks
raise, but a stream with a usable sample only every ~100k could stop one rank while the others train on
into their next all-reduce. Under torchrun the agent then stops the other workers (as ``srun
--kill-on-bad-exit=1``, which the SLURM launcher passes, and Lightning's own launcher do): here rank 1's
stream is empty while rank 0's is not, and the whole job ends at once naming the cause.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.data.test_laion import _jpg
from tests.data.test_laion import _write_tar as _tar

SCRIPT = r"""
import os, sys
import lightning as L
import torch
from torch.utils.data import DataLoader
from data.laion import LaionStream

root, rank = sys.argv[1], int(os.environ["RANK"])
spec = f"{root}/good.tar" if rank == 0 else f"{root}/empty_{{0..3}}.tar"  # rank 1: nothing usable, ever

def collate(samples):
    return torch.tensor([[float(len(s["caption"]))] for s in samples])

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 1)
    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

stream = LaionStream(spec, resampled=True, captions_only=True)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=50, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Tiny(), DataLoader(stream, batch_size=2, num_workers=0, collate_fn=collate))
"""


def test_one_rank_whose_stream_can_never_yield_ends_the_whole_torchrun_job_naming_it(tmp_path):
    _tar(tmp_path / "good.tar", [(f"g{i}.jpg", _jpg(i)) for i in range(4)] +
         [(f"g{i}.txt", b"a red circle on a white background") for i in range(4)])
    for i in range(4):
        (tmp_path / f"empty_{i}.tar").write_bytes(b"")
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", str(tmp_path / "job.py"), str(tmp_path)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "EmptyStreamError" in out and "yields no usable sample" in out, out[-3000:]
    assert took < 60, f"the job took {took:.0f} s to end: a rank was left waiting in a collective"
