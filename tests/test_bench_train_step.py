"""bench.train_step on the tiny test preset: one timed step, every field, what learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import train_step

FIELDS = {
    "seconds_per_step",
    "samples_per_s",
    "flops_per_step",
    "flops_per_sample",
    "achieved_flop_per_s",
    "matmul_fp32_flop_per_s",
    "ratio_to_matmul",
    "seconds_per_1000_samples",
    "trainable_params",
    "tower_params",
    "peak_rss_mb",
    "rss_after_build_mb",
    "anchor_flops_per_image",
    "anchor_seconds_per_image",
}


def _run(out: Path, *extra: str) -> None:
    argv = ["--preset", "imagebind_test", "--reps", "1", "--matmul-n", "128", "--out", str(out)]
    assert train_step.main([*argv, *extra]) == 0


def test_one_step_writes_every_field_and_trains_only_the_tower(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    _run(out)
    _run(out, "--grad-checkpointing")
    _run(out, "--lora-rank", "4")
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["preset"] == "imagebind_test"
    assert set(result["runs"]) == {
        "audio/full/b2",
        "audio/full/b2+ckpt",
        "audio/lora4/b2",
    }  # merged

    full = result["runs"]["audio/full/b2"]
    assert FIELDS <= set(full)
    assert full["input_shape"] == [2, 3, 1, 128, 204]  # real shape: 3 clips per sample
    assert full["flops_per_step"] > 0 and full["anchor_flops_per_image"] > 0
    assert full["flops_per_sample"] * 2 == full["flops_per_step"]
    assert full["seconds_per_step"] > 0 and full["peak_rss_mb"] > 0
    check = full["check"]
    # every weight of the audio tower learned; the frozen vision tower did not move
    assert check["trained_params_changed"] == check["trainable_tensors"] > 0
    assert check["tower_frozen_tensors"] == 0
    assert check["vision_tensors"] > 0 and check["vision_changed"] == 0
    assert full["trainable_params"] == full["tower_params"]

    lora = result["runs"]["audio/lora4/b2"]
    check = lora["check"]
    # the adapters (and norms, biases) learned; the base projections and vision did not
    assert check["trained_params_changed"] == check["trainable_tensors"] > 0
    assert check["tower_frozen_tensors"] > 0 and check["tower_frozen_changed"] == 0
    assert check["vision_changed"] == 0
    assert lora["trainable_params"] < lora["tower_params"] == full["tower_params"]

    # checkpointing recomputes the trunk's forward in the backward pass: counted as work done
    ckpt = result["runs"]["audio/full/b2+ckpt"]
    assert ckpt["check"]["trained_params_changed"] == full["check"]["trained_params_changed"]
    assert ckpt["flops_per_step"] > full["flops_per_step"]


def test_an_unknown_tower_is_refused() -> None:
    with pytest.raises(ValueError, match="accepted: audio, depth, thermal, imu"):
        train_step.bench_step("imagebind_test", tower="vision", reps=1)


# docs/training.md's cost table: its label of each committed run of bench.train_step
DOC_ROWS = {
    "audio/full/b2+ckpt": "audio, full fine-tune (batch 2)",
    "audio/lora8/b2+ckpt": "audio, `--lora-rank 8` (batch 2)",
    "audio/full/b2": "audio, full fine-tune, `--no-grad-checkpointing` (batch 2)",
    "imu/full/b4+ckpt": "IMU, full fine-tune or `--reinit` (batch 4)",
}


def test_the_docs_cost_table_is_the_committed_bench_result() -> None:
    # every row's measured figures, and its GPU estimate: GFLOP per pair over the audio
    # tower's bf16 batch-64 forward rate in the committed H100 result, as the doc says
    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "bench/results/train_step_cpu.json").read_text())
    h100 = json.loads((root / "bench/results/encoders_cuda_h100.json").read_text())
    rate = next(
        r["tflops"] * 1e12
        for r in h100["rows"]
        if (r["tower"], r["dtype"], r["batch"], r["attention"])
        == ("audio", "torch.bfloat16", 64, "sdpa")
    )
    assert f"{rate / 1e12:.0f} TFLOP/s" in (root / "docs/training.md").read_text()
    docs = (root / "docs/training.md").read_text().splitlines()
    assert set(result["runs"]) == set(DOC_ROWS)
    for key, label in DOC_ROWS.items():
        run = result["runs"][key]
        row = next(ln for ln in docs if ln.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{run['trainable_params']:,}", row
        assert cells[2] == f"{run['flops_per_sample'] / 1e9:.0f}", row
        assert cells[3] == f"{run['seconds_per_step']:.1f}", row
        assert cells[4] == f"{run['samples_per_s']:.3f}", row
        assert cells[6] == f"{run['ratio_to_matmul']:.2f}", row
        assert cells[7] == f"{run['peak_rss_mb'] / 1024:.1f} GB", row
        gpu = 1000 * run["flops_per_sample"] / rate
        assert cells[8] in (f"{gpu:.1f} s", f"{gpu:.2f} s"), (row, gpu)
