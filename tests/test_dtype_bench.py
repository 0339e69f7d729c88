"""``bench.dtypes`` on the tiny preset: every number it reports is there, and consistent."""

from __future__ import annotations

import json
from pathlib import Path

from bench import dtypes as bench


def test_dtype_bench_reports_speedups_cosines_and_the_machine(tmp_path: Path) -> None:
    out = tmp_path / "dtypes_cpu.json"
    result = bench.run(
        preset="imagebind_test",
        towers=("audio", "text"),
        batch=2,
        reps=1,
        matmul_n=64,
        overlap_n=0,
        out=out,
    )
    assert json.loads(out.read_text(encoding="utf-8"))["towers"] == result["towers"]
    assert result["default_dtype"] in ("float32", "bfloat16")
    assert "cpu_flags" in result["machine"] and "native_bf16_flags" in result
    assert set(result["matmul"]) == {"float32", "bfloat16"}
    assert result["matmul"]["float32"]["over_fp32"] == 1.0
    for row in result["towers"]:
        assert set(row["dtypes"]) == {"bfloat16", "int8"}
        for name, d in row["dtypes"].items():
            assert d["speedup_over_fp32"] > 0
            assert d["min_cosine"] >= {"bfloat16": 0.999, "int8": 0.99}[name]
            assert len(d["fp32"]["times_s"]) == len(d["reduced"]["times_s"]) == 1
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    assert md.count("| audio | 2 |") == 2 and md.count("| text | 2 |") == 2
    assert "CPU flags:" in md and "bf16/fp32 matmul rate" in md


def test_dtype_bench_lists_where_the_time_goes_and_what_stays_fp32(tmp_path: Path) -> None:
    out = tmp_path / "dtypes_cpu.json"
    result = bench.run(
        preset="imagebind_test",
        towers=("audio",),
        batch=2,
        reps=1,
        matmul_n=64,
        overlap_n=0,
        out=out,
    )
    (row,) = result["breakdown"]
    assert row["tower"] == "audio" and set(row["dtypes"]) == {"float32", "bfloat16", "int8"}
    for d in row["dtypes"].values():
        parts = d["parts"]
        assert tuple(parts) == bench.PARTS
        assert all(p["seconds"] >= 0 for p in parts.values())
        assert abs(sum(p["share"] for p in parts.values()) - 1.0) < 1e-6
        # The input transform is CPU code: fp32 whatever the model runs in.
        assert parts["preprocess"]["runs_in"] == "float32"
    bf16 = row["dtypes"]["bfloat16"]["parts"]
    assert {bf16[p]["runs_in"] for p in ("stem", "attention", "mlp", "layernorm", "head")} == {
        "bfloat16"
    }
    assert row["dtypes"]["bfloat16"]["fp32_parts"] == ["preprocess"]
    int8 = row["dtypes"]["int8"]
    # Dynamic int8 covers the trunk's linear layers only: LayerNorm, stem and head stay fp32.
    assert int8["parts"]["attention"]["runs_in"] == int8["parts"]["mlp"]["runs_in"] == "int8"
    assert {"preprocess", "stem", "layernorm", "head"} <= set(int8["fp32_parts"])
    expected = sum(int8["parts"][p]["share"] for p in int8["fp32_parts"])
    assert abs(int8["fp32_share"] - expected) < 1e-9
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "Where the time goes" in md and md.count("| audio | ") >= 5
