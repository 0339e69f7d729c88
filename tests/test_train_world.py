"""The demo world: seeded, sliceable, and its files read back as the tensors we train on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from encoders.config import resolve_config
from encoders.model import ImageBind, init_weights
from encoders.transforms.audio import load_audio
from encoders.transforms.depth import load_depth
from encoders.transforms.imu import load_imu
from encoders.transforms.thermal import load_thermal
from encoders.transforms.video import load_video
from encoders.transforms.vision import load_image
from world.world import (
    HELD_OUT,
    IMU_RATE_HZ,
    audio_batch,
    generate,
    sample_factors,
    to_model_inputs,
    write_world,
)

CFG = resolve_config("imagebind_demo")
P = CFG.preprocess


def test_generate_is_seeded_and_sliceable() -> None:
    a = generate(30, P, seed=3, chunk=10)
    b = generate(30, P, seed=3, chunk=10)
    part = generate(30, P, seed=3, chunk=10, start=10, stop=20)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.audio, b.audio)
    np.testing.assert_array_equal(a.image[10:20], part.image)
    np.testing.assert_array_equal(a.imu[10:20], part.imu)
    assert a.captions[10:20] == part.captions
    c = generate(30, P, seed=4, chunk=10)
    assert not np.array_equal(a.image, c.image)


def test_train_split_never_shows_held_out_pairs() -> None:
    f = sample_factors(3000, np.random.default_rng(0), "train")
    pairs = set(zip(f["class"].tolist(), f["scene"].tolist(), strict=True))
    assert not pairs & HELD_OUT
    g = sample_factors(3000, np.random.default_rng(0), "test")
    assert HELD_OUT <= set(zip(g["class"].tolist(), g["scene"].tolist(), strict=True))


def test_shapes_and_captions() -> None:
    w = generate(12, P, seed=0, video_frames=P.video_frames)
    x = to_model_inputs(w, P)
    assert x["vision"].shape == (12, 3, 64, 64)
    assert x["video"].shape == (12, 1, 3, P.video_frames, 64, 64)
    assert x["audio"].shape == (12, P.audio_clips, 1, P.audio_mel_bins, P.audio_target_length)
    assert x["depth"].shape == x["thermal"].shape == (12, 1, 64, 64)
    assert x["imu"].shape == (12, 6, P.imu_samples)
    assert x["text"].shape == (12, P.context_length)
    assert all(torch.isfinite(v.float()).all() for v in x.values())
    assert "moving" in " ".join(w.video_captions) or "rising" in " ".join(w.video_captions)


def test_batched_audio_matches_load_audio() -> None:
    w = generate(4, P, seed=1)
    got = audio_batch(w.audio, P)
    ref = torch.stack([load_audio((a, P.audio_sample_rate), P) for a in w.audio])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("world")
    manifest = write_world(root, 4, P, seed=5, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    return root, rows


def test_files_read_back_as_the_in_memory_inputs(written: tuple[Path, list[dict]]) -> None:
    root, rows = written
    w = generate(4, P, seed=5, split="test")
    x = to_model_inputs(w, P)
    for i, r in enumerate(rows):
        # Lossless formats: exactly the same tensors.
        torch.testing.assert_close(load_image(root / r["image"], P), x["vision"][i], rtol=0, atol=0)
        torch.testing.assert_close(load_depth(root / r["depth"], P), x["depth"][i], rtol=0, atol=0)
        torch.testing.assert_close(
            load_thermal(root / r["thermal"], P), x["thermal"][i], rtol=0, atol=0
        )
        # 16-bit PCM, 5-decimal CSV: equal up to quantisation.
        torch.testing.assert_close(
            load_audio(root / r["audio"], P), x["audio"][i], atol=2e-2, rtol=0
        )
        torch.testing.assert_close(load_imu(root / r["imu"], P), x["imu"][i], atol=1e-4, rtol=0)
        # H.264 is lossy: close, not equal.
        vid = load_video(root / r["video"], P)
        assert vid.shape[1:] == x["video"][i].shape[1:]
        assert (vid[0] - x["video"][i][0]).abs().mean() < 0.15
        assert r["factors"]["class"] in r["text"]


def test_files_embed_close_to_in_memory(written: tuple[Path, list[dict]]) -> None:
    root, rows = written
    model = ImageBind(CFG, ["vision", "audio", "imu"])
    init_weights(model, seed=0)
    model.eval()
    w = generate(4, P, seed=5, split="test")
    x = to_model_inputs(w, P, ["vision", "video", "audio", "imu"])
    with torch.no_grad():
        files = {
            "vision": torch.stack([load_image(root / r["image"], P) for r in rows]),
            "video": torch.stack([load_video(root / r["video"], P) for r in rows]),
            "audio": torch.stack([load_audio(root / r["audio"], P) for r in rows]),
            "imu": torch.stack([load_imu(root / r["imu"], P, rate_hz=IMU_RATE_HZ) for r in rows]),
        }
        for key, tower in (
            ("vision", "vision"),
            ("video", "vision"),
            ("audio", "audio"),
            ("imu", "imu"),
        ):
            a = model.embed_one(tower, files[key], scaled=False)
            b = model.embed_one(tower, x[key], scaled=False)
            assert (a * b).sum(-1).min() > 0.99, key


def test_demo_world_cli(tmp_path: Path) -> None:
    from bindsearch.cli import app

    res = CliRunner().invoke(app, ["demo", "world", "-o", str(tmp_path), "--n", "2"])
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert len(rows) == 2
    for key in ("image", "depth", "thermal", "audio", "video", "imu"):
        assert (tmp_path / json.loads(rows[0])[key]).stat().st_size > 0
    bad = CliRunner().invoke(app, ["demo", "world", "-o", str(tmp_path), "--n", "0"])
    assert bad.exit_code == 1
