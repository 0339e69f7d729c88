"""The benchmark suite's aggregation on small fake results: table, pass/miss, plots (no timing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import suite
from bench.suite import INFO, MISS, MISSING, PASS, Target, collect, summarise, table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(d: Path, name: str, data: dict[str, Any]) -> None:
    (d / name).write_text(json.dumps(data), encoding="utf-8")


def _case(label: str, ratio: float, speedup: float, match: bool = True) -> dict[str, Any]:
    path = {"ratio": ratio, "gflop_per_s": 60.0}
    return {
        "tower": label,
        "input": label,
        "shape": [2, 3, 224, 224],
        "matmul_gflop_per_s": 80.0,
        "paths": {"ours": path, "eager": {**path, "ratio": ratio / speedup}},
        "speedup_ours_over_eager": speedup,
        "min_cosine": 1.0 if match else 0.5,
        "match": match,
    }


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    _write(
        d,
        "encoders_cpu.json",
        {
            "preset": "imagebind_huge",
            "dtype": "float32",
            "cases": [_case("vision", 0.72, 1.1), _case("audio", 0.41, 1.3, match=False)],
        },
    )
    _write(
        d,
        "service_demo_vision.json",
        {
            "kind": "embed",
            "config": "demo",
            "modality": "vision",
            "latency_ratio": 1.1,
            "throughput_ratio": 0.6,
            "http_latency_ms": 11.0,
            "raw_latency_ms": 10.0,
            "concurrency": [
                {"clients": c, "p50_ms": 10.0 * c, "p95_ms": 12.0 * c} for c in (1, 4, 16)
            ],
        },
    )
    _write(
        d,
        "service_demo_text.json",
        {
            "config": "demo",
            "modality": "text",
            "latency_ratio": 3.0,
            "throughput_ratio": 0.9,
        },
    )
    _write(
        d,
        "service_gpu_vision.json",
        {
            "device": "cuda",
            "config": "huge",
            "modality": "vision",
            "latency_ratio": 1.0,
        },
    )
    _write(d, "service_search.json", {"kind": "search", "n": 100, "dim": 8, "search_ratio": 0.9})
    _write(d, "service_search_cuda.json", {"kind": "search", "search_ratio": 0.1})
    _write(
        d,
        "build_cpu.json",
        {
            "builds": [
                {"corpus": "images", "workers": 1, "overlap": 0.9, "decode_keeps_up": True},
                {"corpus": "audio", "workers": 1, "overlap": 0.3, "decode_keeps_up": False},
            ]
        },
    )
    _write(
        d,
        "inputs_cpu.json",
        {
            "preset": "p",
            "rows": [
                {
                    "modality": "vision",
                    "ratio": 0.25,
                    "decode_items_per_s": 10.0,
                    "model_items_per_s": 40.0,
                },
            ],
        },
    )
    _write(
        d,
        "index_cpu.json",
        {
            "vectors": 1000,
            "dim": 16,
            "bandwidth_gb_per_s": 10.0,
            "flat": {"ratio": 0.4, "qps": 4.0, "bound_qps": 10.0, "batch_qps": 100.0},
            "best_ann": {
                "recipe": "IVF8,Flat",
                "param": "nprobe=2",
                "recall": 0.97,
                "speedup": 12.0,
            },
            "ivfpq": {
                "recipe": "IVF8,PQ4np",
                "compression": 16.0,
                "bytes": 1e5,
                "flat_bytes": 1.6e6,
                "best_recall": 0.5,
            },
            "curves": {
                "IVF8,Flat": [{"qps": 1000.0, "recall": 0.97}, {"qps": 500.0, "recall": 1.0}]
            },
        },
    )
    _write(
        d,
        "memory_cpu.json",
        {
            "model": "m",
            "weights_bytes": 1000,
            "rss": {
                "safetensors": {
                    "ratio": 1.1,
                    "ratio_total": 1.5,
                    "peak_rss_bytes": 1500,
                    "base_rss_bytes": 400,
                }
            },
            "ready": {"ratio": 0.5, "safetensors_s": 0.1, "torch_s": 0.2},
        },
    )
    _write(
        d,
        "throughput_cpu.json",
        {
            "preset": "demo",
            "dtype": "float32",
            "modalities": {
                "vision": [{"batch": 1, "items_per_s": 10.0}, {"batch": 4, "items_per_s": 30.0}],
                "text": [{"batch": 1, "items_per_s": 100.0}, {"batch": 4, "items_per_s": 300.0}],
            },
        },
    )
    return d


def _by(rows: list[suite.Ratio], number: str) -> list[suite.Ratio]:
    return [r for r in rows if r.number == number]


def test_target_checks_each_direction() -> None:
    assert Target(">=", 0.6).check(0.6) == PASS
    assert Target(">=", 0.6).check(0.59) == MISS
    assert Target("<=", 1.2).check(1.3) == MISS
    assert Target(">", 1.0).check(1.0) == MISS
    assert Target(">", 1.0).check(None) == MISSING
    assert Target("<=", 1.2).check(float("nan")) == MISSING


def test_collect_applies_the_targets(results: Path) -> None:
    rows = collect(results, "cpu")
    enc = _by(rows, "1")
    assert [r.status for r in enc] == [PASS, MISS]  # 0.72 and 0.41 against >= 0.6
    speed = _by(rows, "2")
    assert [r.status for r in speed] == [PASS, MISS]  # the audio outputs differ: a miss
    assert "outputs differ" in speed[1].note
    lat = _by(rows, "3")
    assert sorted((r.detail, r.status) for r in lat) == [("demo text", MISS), ("demo vision", PASS)]
    assert {r.status for r in _by(rows, "4")} == {PASS, MISS}
    assert [r.status for r in _by(rows, "6")] == [PASS]  # the _cuda file is not a cpu row
    assert [r.status for r in _by(rows, "5a")] == [PASS, INFO]  # decode-bound: no verdict
    five_b = _by(rows, "5b")[0]
    assert five_b.status == INFO and "4 decode workers" in five_b.note
    assert _by(rows, "7")[0].status == MISS
    assert _by(rows, "8a")[0].status == PASS and _by(rows, "8a")[0].value == 12.0
    assert _by(rows, "8b")[0].value == 16.0
    assert _by(rows, "9a")[0].status == PASS
    assert _by(rows, "9b")[0].status == PASS
    # In the order, and the cuda-only service file is not among the cpu rows.
    numbers = [r.number for r in rows]
    assert numbers == sorted(numbers, key=lambda n: (int(n[0]), n))
    assert all("huge" not in r.detail for r in lat)


def test_cuda_rows_come_from_cuda_files(results: Path) -> None:
    rows = collect(results, "cuda")
    assert [(r.detail, r.status) for r in _by(rows, "3")] == [("huge vision", PASS)]
    assert [r.status for r in _by(rows, "6")] == [MISS]  # service_search_cuda.json: 0.1
    assert [r.status for r in _by(rows, "1")] == [MISSING]  # no encoders_cuda.json


def test_ann_below_the_recall_target_is_a_miss(results: Path) -> None:
    data = json.loads((results / "index_cpu.json").read_text())
    data["best_ann"]["recall"] = 0.9
    _write(results, "index_cpu.json", data)
    assert _by(collect(results, "cpu"), "8a")[0].status == MISS


def test_missing_results_are_reported_not_dropped(tmp_path: Path) -> None:
    rows = collect(tmp_path, "cuda")
    assert {r.status for r in rows} == {MISSING}
    numbers = {r.number.rstrip("ab") for r in rows}
    assert numbers == {str(i) for i in range(1, 10)}
    text = table(rows)
    assert text.count("MISSING") == len(rows)


def test_table_lists_every_ratio_with_target(results: Path) -> None:
    rows = collect(results, "cpu")
    lines = table(rows).splitlines()
    assert lines[0].split()[:2] == ["#", "ratio"]
    assert len(lines) == len(rows) + 2  # header and rule
    assert any(">= 0.6" in line and "PASS" in line for line in lines)
    md = suite.markdown_table(rows, "test box")
    assert md.count("\n") == len(rows) + 1 and "| test box |" in md


def test_summarise_writes_summary_and_plots(results: Path) -> None:
    out = summarise(
        results, "cpu", {"cpu_model": "fake"}, {"index": {"status": "ok"}}, mode="quick"
    )
    saved = json.loads((results / "summary_cpu.json").read_text())
    assert saved["machine"] == {"cpu_model": "fake"} and saved["mode"] == "quick"
    assert saved["counts"] == out["counts"]
    assert sum(saved["counts"].values()) == len(saved["ratios"])
    for name in ("plot_throughput", "plot_latency", "plot_recall"):
        path = results / saved["plots"][name]  # relative to the results folder
        assert path.parent == results / "plots"
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_skip_what_has_no_data(tmp_path: Path) -> None:
    _write(tmp_path, "service_x_text.json", {"latency_ratio": 1.0})  # no concurrency sweep
    made = suite.make_plots(tmp_path, "cpu", tmp_path / "plots")
    assert made == {"plot_throughput": None, "plot_latency": None, "plot_recall": None}


def test_cli_summarise_only(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    assert main(["--summarise-only", "--only", "index", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "issue 10 ratios" in out and "IVF8,Flat" in out
    assert (results / "summary_cpu.md").read_text().startswith("| # |")


def test_cli_rejects_unknown_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--only", "nope"])
    assert e.value.code == 2
    assert "unknown benchmark(s) nope" in capsys.readouterr().err


def test_a_failing_or_hanging_benchmark_is_reported(tmp_path: Path) -> None:
    import io
    import sys

    from bench.__main__ import _run_streamed

    log = io.StringIO()
    code = "import sys; print('partial'); sys.exit(3)"
    assert _run_streamed([sys.executable, "-c", code], 60, log) == 3
    assert "partial" in log.getvalue()
    hang = "import time; print('started', flush=True); time.sleep(60)"
    assert _run_streamed([sys.executable, "-c", hang], 1, log) == "timeout"
    assert "started" in log.getvalue()


def test_rows_from_an_earlier_run_say_so(results: Path) -> None:
    import os
    import time

    old = time.time() - 3600
    os.utime(results / "memory_cpu.json", (old, old))
    rows = collect(results, "cpu", since=time.time() - 60)
    assert all("earlier run" in r.note for r in _by(rows, "9a") + _by(rows, "9b"))
    assert not any("earlier run" in r.note for r in _by(rows, "7"))
