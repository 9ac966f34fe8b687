"""`make ablation` never deletes a coupling stage's unfinished shards: the rerun resumes them."""

from __future__ import annotations

import dataclasses
import json
import sys

from studies.ablation.run import Ablation


def test_a_rerun_keeps_the_complete_shards_and_runs_the_stage_command(tmp_path, monkeypatch, capsys):
    abl = Ablation(str(tmp_path / "abl"), str(tmp_path / "results" / "ablation"))
    stage, = [s for s in abl.stages() if s.name == "pairs_teacher"]
    out = stage.partial
    assert out == tmp_path / "abl" / "pairs" / "teacher" and stage.done == out / ".done"
    out.mkdir(parents=True)
    shard = out / "00000.tar"
    shard.write_bytes(b"a complete shard, renamed into place by the writer")
    seen = tmp_path / "seen.json"
    # the stand-in for the coupling stage: what the writer finds when it starts (it would skip 00000.tar)
    probe = f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(sorted(os.listdir({str(out)!r}))))"
    stub = dataclasses.replace(stage, command=lambda: [sys.executable, "-c", probe])
    monkeypatch.setattr(abl, "stages", lambda: [stub])
    abl.run()
    assert json.loads(seen.read_text()) == ["00000.tar"]  # the stage ran and found its shard
    assert shard.read_bytes().startswith(b"a complete shard") and stage.done.exists()
    assert "continuing the unfinished output" in capsys.readouterr().out
    assert (tmp_path / "abl" / "timings").is_dir()


def test_a_failed_stage_keeps_its_shards_and_stays_unfinished(tmp_path, monkeypatch):
    import pytest

    abl = Ablation(str(tmp_path / "abl"), str(tmp_path / "results" / "ablation"))
    stage, = [s for s in abl.stages() if s.name == "pairs_rf2"]
    stage.partial.mkdir(parents=True)
    (stage.partial / "00003.tar").write_bytes(b"x")
    monkeypatch.setattr(abl, "stages", lambda: [dataclasses.replace(stage, command=lambda: [sys.executable, "-c",
                                                                                            "raise SystemExit(3)"])])
    with pytest.raises(SystemExit, match="stage pairs_rf2 failed \\(exit 3\\); rerun to continue from it"):
        abl.run()
    assert (stage.partial / "00003.tar").exists() and not stage.done.exists()
