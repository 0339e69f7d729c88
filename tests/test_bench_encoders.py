"""bench/encoders.py: the analytic FLOP count, and a smoke run on the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.encoders import attention_path, main, tower_flops
from encoders import Encoder, Modality, load_encoder

PRESET = "imagebind_test"


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return load_encoder(config=PRESET, dtype=torch.float32)


def _input(enc: Encoder, modality: Modality, batch: int, clips: int) -> torch.Tensor:
    p = enc.preprocess_cfg
    g = torch.Generator().manual_seed(0)
    lead = (batch, clips) if clips > 1 else (batch,)
    shapes = {
        Modality.VISION: (3, p.image_size, p.image_size),
        Modality.VIDEO: (3, p.video_frames, p.image_size, p.image_size),
        Modality.AUDIO: (1, p.audio_mel_bins, p.audio_target_length),
        Modality.DEPTH: (1, p.depth_size, p.depth_size),
        Modality.THERMAL: (1, p.thermal_size, p.thermal_size),
        Modality.IMU: (p.imu_channels, p.imu_samples),
    }
    if modality is Modality.TEXT:
        return torch.randint(0, p.vocab_size, (*lead, p.context_length), generator=g)
    return torch.randn(*lead, *shapes[modality], generator=g)


@pytest.mark.parametrize(
    ("modality", "clips"),
    [
        (Modality.VISION, 1),
        (Modality.VIDEO, 2),  # a clip pays for the full temporal kernel
        (Modality.AUDIO, 1),
        (Modality.AUDIO, 3),
        (Modality.DEPTH, 1),
        (Modality.THERMAL, 1),
        (Modality.IMU, 1),
        (Modality.TEXT, 1),
    ],
)
def test_tower_flops_matches_flop_counter(encoder: Encoder, modality: Modality, clips: int) -> None:
    batch = 2
    x = _input(encoder, modality, batch, clips)
    # FlopCounterMode does not count the CPU flash-attention kernel: count the eager path.
    with torch.inference_mode(), attention_path(fused=False), FlopCounterMode(display=False) as fc:
        encoder.model.embed_one(modality, x)
    counted = fc.get_total_flops()
    ours = tower_flops(encoder.config, modality, batch, clips=clips)
    assert ours == pytest.approx(counted, rel=0.02)


def test_main_smoke_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "encoders.json"
    argv = [
        "--preset",
        PRESET,
        "--batch",
        "2",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--matmul-n",
        "128",
        "--no-plot",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["preset"] == PRESET
    assert [c["input"] for c in result["cases"]] == ["vision", "audio", "audio x3 clips"]
    for case in result["cases"]:
        assert case["match"]
        assert set(case["paths"]) == {"ours", "eager"}
        assert all(p["ratio"] > 0 and len(p["times_s"]) == 1 for p in case["paths"].values())
    assert {e["variant"] for e in result["experiments"]} >= {"ours", "ours, bf16 weights"}
    assert result["stem_variants"][0]["max_abs_diff"] == 0.0
    assert result["machine"]["torch_version"] == torch.__version__
