"""benchmarks/roofline.py (the machine's measured limit, each stage's FLOP/s against it) and benchmarks/ab.py's
aggregation. Tiny sizes, one torch thread (conftest)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import ab, roofline


def test_peak_is_positive_and_finite_with_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    tiny = dict(seconds=0.02, sizes=(64, 128), conv_shape=(2, 16, 8, 8))
    peak = roofline.measure_peak(cpu, **tiny)
    assert ("bf16" in peak) == roofline.native_bf16(cpu)
    for p in peak.values():
        for key in ("gemm", "conv", "limit"):
            assert math.isfinite(p[key]) and p[key] > 0
        assert p["limit"] == max(p["gemm"], p["conv"]) and p["gemm_size"] in (64, 128)
    monkeypatch.setattr(roofline, "native_bf16", lambda device: False)
    assert list(roofline.measure_peak(cpu, **tiny)) == ["fp32"]
    monkeypatch.setattr(roofline, "native_bf16", lambda device: True)
    assert list(roofline.measure_peak(cpu, **tiny)) == ["fp32", "bf16"]


def test_flop_counter_matches_the_analytic_rules_the_peak_uses():
    m, n, k = 8, 24, 40
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert roofline.count_flops(lambda: torch.mm(a, b)) == roofline.gemm_flops(m, n, k) == 2 * m * n * k
    x, w = torch.randn(2, 16, 8, 8), torch.randn(32, 16, 3, 3)
    conv = roofline.count_flops(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    assert conv == roofline.conv_flops(2, 16, 32, 8, 8, 3, 3) == 2 * (2 * 8 * 8) * 32 * (16 * 9)
    # a Linear's forward and backward: y = x W^T, then dL/dx and dL/dW, each one GEMM of the same size
    lin = torch.nn.Linear(k, n)
    xi = torch.randn(m, k, requires_grad=True)
    assert roofline.count_flops(lambda: lin(xi).sum().backward()) == 3 * roofline.gemm_flops(m, n, k)


def test_set_values_are_yaml_and_checked():
    sets = roofline.parse_sets(["reflow.lr=1e-4", "reflow.activation_checkpointing=true", "onestep.bf16=true",
                                "couplings.resolution=null"])
    assert sets == {"reflow": {"lr": 1e-4, "activation_checkpointing": True}, "onestep": {"bf16": True},
                    "couplings": {"resolution": None}}
    for bad in ("reflow.lr", "lr=1", "nostage.lr=1", "reflow.=1"):
        with pytest.raises(ValueError):
            roofline.parse_sets([bad])


def test_a_set_reaches_the_module_constructor():
    # passed as a constructor kwarg: a key the module lacks fails in its constructor (before any weight is read)
    with pytest.raises(TypeError, match="no_such_setting"):
        roofline.build_reflow(str(roofline.EMBEDDED), 2, "32", torch.device("cpu"), {"no_such_setting": 1})


def test_script_writes_rows_read_against_the_limit(tmp_path):
    out = tmp_path / "roofline.json"
    roofline.main(["--stages", "onestep,reflow", "--seconds", "0.2", "--min-calls", "2", "--batch", "4",
                   "--peak-seconds", "0.02", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    m = result["machine"]
    assert m["torch_threads"] == 1 and m["logical_cpus"] >= 1 and len(m["load_average_after"]) == 3
    assert result["peak"]["fp32"]["limit"] > 0
    rows = {r["part"]: r for r in result["rows"]}
    assert [r["stage"] for r in result["rows"]] == ["onestep"] * 4 + ["reflow"]
    for r in rows.values():
        assert r["flops_per_call"] > 0 and r["seconds_per_call"] > 0 and r["calls"] >= 2
        assert r["gflops_per_s"] == pytest.approx(r["flops_per_call"] / r["seconds_per_call"] / 1e9)
        assert 0 < r["fraction_of_peak"] <= 1.5 and r["peak_dtype"] == "fp32"
        assert r["fraction_of_peak"] == pytest.approx(r["gflops_per_s"] / r["peak_gflops_per_s"])
    unet = rows["one-step: UNet (1 Euler step)"]
    assert unet["throughput_unit"] == "ms latency" and unet["throughput"] == pytest.approx(
        1e3 * unet["seconds_per_call"])
    step = rows["reflow step (32)"]
    assert step["throughput_unit"] == "steps/s" and step["batch"] == 4
    # the step's backward is counted: between 2x and 3x the forward of 4 samples (no gradient into the input)
    assert 2 < step["flops_per_call"] / (4 * unet["flops_per_call"]) < 3
    parts = [rows[f"one-step: {p}"]["flops_per_call"] for p in ("text encoder", "UNet (1 Euler step)", "VAE decoder")]
    assert rows["one-step: end to end"]["flops_per_call"] == sum(parts)


def _result(seconds: dict) -> dict:
    return {"rows": [{"part": k, "stage": k.split()[0], "seconds_per_call": s, "fraction_of_peak": 0.1}
                     for k, s in seconds.items()]}


def test_ab_aggregates_per_round_ratios_and_medians():
    rounds = [{"A": _result({"reflow step": 1.0, "couplings": 4.0}), "B": _result({"reflow step": 0.5, "couplings": 4.4})},
              {"A": _result({"reflow step": 2.0, "couplings": 4.0}), "B": _result({"reflow step": 0.8})},
              {"A": _result({"reflow step": 1.0, "couplings": 5.0}), "B": _result({"reflow step": 0.6, "couplings": 4.0})}]
    agg = ab.aggregate(rounds)
    r = agg["reflow step"]
    assert r["a_seconds"] == [1.0, 2.0, 1.0] and r["ratios"] == pytest.approx([0.5, 0.4, 0.6])
    assert r["a_median"] == 1.0 and r["b_median"] == 0.6 and r["ratio_median"] == pytest.approx(0.5)
    c = agg["couplings"]  # a row only one side measured in a round is left out of that round
    assert c["ratios"] == pytest.approx([1.1, 0.8]) and c["ratio_median"] == pytest.approx(0.95)
    assert "**0.500**" in ab.to_markdown(agg)


def test_ab_arguments():
    with pytest.raises(SystemExit):
        ab.parse([])  # --base is required: A against itself measures nothing
    args = ab.parse(["--base", "main~1", "--b-set", "reflow.lr=1e-3", "--", "--stages", "reflow", "--seconds", "2"])
    assert args.rounds == 3 and not args.cold_cache and args.head is None
    assert ab.side_args(args.roofline_args, args.b_set, "/x.json") == [
        "--stages", "reflow", "--seconds", "2", "--set", "reflow.lr=1e-3", "--json", "/x.json"]
    assert ab.side_args(args.roofline_args, args.a_set, "/y.json")[-4:] == ["--seconds", "2", "--json", "/y.json"]
    with pytest.raises(SystemExit):
        ab.parse(["--base", "x", "--rounds", "0"])
    with pytest.raises(SystemExit):
        ab.parse(["--base", "x", "--", "--json", "y"])


def test_the_limit_is_the_better_of_before_and_after():
    before = {"fp32": {"gemm": 40e9, "gemm_size": 512, "conv": 30e9, "limit": 40e9},
              "bf16": {"gemm": 90e9, "gemm_size": 1024, "conv": 50e9, "limit": 90e9}}
    after = {"fp32": {"gemm": 80e9, "gemm_size": 1024, "conv": 60e9, "limit": 80e9},
             "bf16": {"gemm": 70e9, "gemm_size": 1024, "conv": 50e9, "limit": 70e9}}
    peak = roofline.combine_peaks(before, after)
    assert peak["fp32"]["limit"] == 80e9 and peak["fp32"]["gemm_size"] == 1024 and peak["fp32"]["limit_before"] == 40e9
    assert peak["bf16"]["limit"] == 90e9 and peak["bf16"]["limit_after"] == 70e9
    row = roofline.read_against({"gflops_per_s": 45.0}, True, peak)
    assert row["peak_dtype"] == "bf16" and row["fraction_of_peak"] == pytest.approx(0.5)
    assert roofline.read_against({"gflops_per_s": 40.0}, True, {"fp32": peak["fp32"]})["peak_dtype"] == \
        "fp32 (bf16 not native)"
