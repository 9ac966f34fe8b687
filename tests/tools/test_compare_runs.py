"""compare_runs: identical runs pass; a changed score, shard or weight file is named and fails."""

from __future__ import annotations

import json
import shutil

from instaflow.tools.compare_runs import main


def _run(root, fid=27.5, shard=b"x1", weights=b"w", alignment=0.6):
    (root / "results").mkdir(parents=True)
    rows = {"instaflow_1": {"fid": fid, "fid_low": 25.0, "fid_high": 30.0, "alignment": alignment,
                            "alignment_stderr": 0.01, "latency_s": 0.04, "eval_wall_s": 3.0}}
    (root / "results" / "results.json").write_text(json.dumps({"rows": rows, "total_wall_s": 100.0}))
    (root / "pairs" / "teacher").mkdir(parents=True)
    (root / "pairs" / "teacher" / "00000.tar").write_bytes(shard)
    (root / "models" / "instaflow" / "unet").mkdir(parents=True)
    (root / "models" / "instaflow" / "unet" / "model.safetensors").write_bytes(weights)
    return root


def test_identical_runs_pass_and_differences_are_named(tmp_path, capsys):
    a = _run(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    rows = json.loads((b / "results" / "results.json").read_text())
    rows["rows"]["instaflow_1"]["latency_s"] = 0.09  # timings are not compared
    (b / "results" / "results.json").write_text(json.dumps(rows))
    assert main([str(a), str(b)]) == 0 and "IDENTICAL" in capsys.readouterr().out

    assert main([str(a), str(_run(tmp_path / "c", fid=27.6))]) == 1
    out = capsys.readouterr().out
    assert "instaflow_1" in out and "instaflow_1 fid: within A's interval" in out
    assert main([str(a), str(_run(tmp_path / "c2", fid=31.0, alignment=0.63))]) == 1  # 31 > 30; 0.03 > 1.96 * 0.01
    out = capsys.readouterr().out
    assert "instaflow_1 fid: OUTSIDE A's interval" in out and "instaflow_1 alignment: OUTSIDE A's interval" in out
    assert main([str(a), str(_run(tmp_path / "d", shard=b"other"))]) == 1
    assert "couplings pairs/teacher: DIFFER" in capsys.readouterr().out
    assert main([str(a), str(_run(tmp_path / "e", weights=b"other"))]) == 1
    assert "unet_weights instaflow: DIFFER" in capsys.readouterr().out
