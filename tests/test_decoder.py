"""The demo decoder: shipped weights judged on held-out data, training, the generator contract.

The shipped decoder is evaluated as ``bindsearch demo eval-generate`` does (no retraining):
images generated from held-out AUDIO embeddings must show the scene (>= 0.8) and the class
(>= 3x chance) to the demo's own vision tower, judged by the nearest text prompt per factor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from encoders.checkpoint import sha256_file
from encoders.errors import CheckpointError, EncoderError
from encoders.models import resolve_model
from generate import ImageGenerator, load_generator
from generate.decoder import (
    DecoderConfig,
    DemoDecoder,
    ImageDecoder,
    demo_decoder_path,
    load_demo_decoder,
    save_decoder,
)
from train.decoder import decoder_bars, evaluate_decoder, train_decoder
from world.world import FACTORS

CARD = demo_decoder_path().parent / "MODEL_CARD_imagebind_demo.md"


@pytest.fixture(scope="module")
def shipped() -> DemoDecoder:
    return load_demo_decoder()


@pytest.fixture(scope="module")
def report(shipped: DemoDecoder) -> dict[str, Any]:
    return evaluate_decoder(shipped, n=160, seed=4321, sources=("audio", "thermal", "depth"))


def test_shipped_decoder_is_small_and_paired_with_the_shipped_encoder(
    shipped: DemoDecoder,
) -> None:
    assert demo_decoder_path().stat().st_size <= 3 * 1024 * 1024
    assert isinstance(shipped, ImageGenerator)
    info = shipped.info
    assert (info.name, info.dim, info.image_size, info.default_steps) == ("demo", 64, 64, 1)
    assert info.licence == "Apache-2.0 (trained by bindsearch)"
    # A decoder trained against other encoder weights decodes from a space it never saw.
    ref = resolve_model("imagebind_demo")
    encoder = ref.weights
    assert encoder is not None and ref.decoder == demo_decoder_path()
    assert shipped.trained_for == sha256_file(encoder) == ref.sha256 == info.model_sha256
    load_demo_decoder(encoder=encoder)  # the check passes for the shipped pair
    assert "bindsearch train-decoder" in CARD.read_text()


def test_generated_from_audio_shows_scene_and_class(report: dict[str, Any]) -> None:
    assert report["paired"], "the shipped decoder was trained against other encoder weights"
    audio = report["generated"]["audio"]["accuracy"]
    assert report["chance"]["class"] == pytest.approx(1 / 6)
    assert audio["scene"] >= 0.8, audio
    assert audio["class"] >= 3 * report["chance"]["class"], audio
    assert decoder_bars(report) == []


def test_generated_from_thermal_and_depth_show_what_they_perceive(report: dict[str, Any]) -> None:
    # Thermal perceives scene (ambient temperature) well, class (object temperature) weakly;
    # depth perceives distance well, class (silhouette) weakly. Floors at multiples of chance
    # well below the model card's numbers.
    def chance(k: str) -> float:
        return 1 / len(FACTORS[k])

    thermal, depth = (report["generated"][m]["accuracy"] for m in ("thermal", "depth"))
    assert thermal["scene"] >= 3 * chance("scene"), thermal
    assert depth["distance"] >= 2 * chance("distance"), depth
    assert thermal["class"] >= 1.2 * chance("class"), thermal
    assert depth["class"] >= 1.2 * chance("class"), depth


def test_generate_is_deterministic_and_makes_images(shipped: DemoDecoder) -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 64)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    a = shipped.generate(z, seed=0)
    b = shipped.generate(z, seed=5, steps=3)  # one-shot: seed and steps change nothing
    assert [im.size for im in a] == [(64, 64)] * 3 and all(im.mode == "RGB" for im in a)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # different vectors differ
    [one] = shipped.generate(z[0])  # a single (dim,) vector is one image
    assert np.array_equal(np.asarray(one), np.asarray(a[0]))
    # via the registry of generators
    gen = load_generator("demo")
    assert np.array_equal(np.asarray(gen.generate(z[:1])[0]), np.asarray(a[0]))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((2, 32), np.float32), r"\(batch, 64\) embeddings; got shape \(2, 32\)"),
        (np.zeros((0, 64), np.float32), r"got shape \(0, 64\)"),
        (np.zeros((2, 3, 64), np.float32), r"got shape \(2, 3, 64\)"),
        (np.full((1, 64), np.nan, np.float32), "NaN or infinity"),
        (np.zeros((1, 64), np.float32), "all zeros"),
    ],
)
def test_generate_rejects_bad_embeddings(shipped: DemoDecoder, bad: np.ndarray, match: str) -> None:
    with pytest.raises(EncoderError, match=match):
        shipped.generate(bad)


def test_generate_rejects_zero_steps(shipped: DemoDecoder) -> None:
    with pytest.raises(EncoderError, match="steps must be >= 1"):
        shipped.generate(np.eye(64, dtype=np.float32)[:1], steps=0)


def test_load_checks_dim_encoder_and_file(tmp_path: Path) -> None:
    cfg = DecoderConfig(dim=8, image_size=16, channels=(16, 8))
    path = save_decoder(ImageDecoder(cfg), tmp_path / "d.safetensors", trained_for="ab" * 32)
    dec = load_demo_decoder(path, dim=8)
    assert (dec.info.dim, dec.info.image_size, dec.trained_for) == (8, 16, "ab" * 32)
    with pytest.raises(EncoderError, match="takes 8-d embeddings; the encoder gives 64"):
        load_demo_decoder(path, dim=64)
    other = tmp_path / "enc.safetensors"
    other.write_bytes(b"not the encoder it was trained on")
    with pytest.raises(EncoderError, match="trained against encoder weights with sha256 ababab"):
        load_demo_decoder(path, encoder=other)
    with pytest.raises(CheckpointError, match="do not exist"):
        load_demo_decoder(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="cannot read decoder weights"):
        load_demo_decoder(other)
    with pytest.raises(ValueError, match="needs 2 channel widths"):
        DecoderConfig(dim=8, image_size=16, channels=(16,))


TINY: dict[str, Any] = dict(
    world_size=64,
    steps=40,
    batch=16,
    lr=1e-2,
    seed=0,
    threads=1,
    image_size=32,
    channels=(32, 16, 8),
    consistency=0.1,
    progress=False,
)


def test_train_decoder_tiny_run_loss_falls(tmp_path: Path) -> None:
    out = tmp_path / "dec.safetensors"
    log = train_decoder(None, out, **TINY)
    first = {k: np.mean(v[:5]) for k, v in log["losses"].items()}
    last = {k: np.mean(v[-5:]) for k, v in log["losses"].items()}
    assert last["total"] < 0.85 * first["total"], log["losses"]["total"]
    assert last["pixel"] < first["pixel"] and last["consistency"] < first["consistency"]
    dec = load_demo_decoder(out)
    assert dec.info.image_size == 32 and dec.trained_for == log["encoder_sha256"]
    assert out.with_suffix(".json").is_file()
    # same seed, same decoder
    again = train_decoder(None, tmp_path / "again.safetensors", **TINY)
    assert again["losses"]["total"] == log["losses"]["total"]


def test_train_decoder_rejects_bad_budget(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="world_size >= batch"):
        train_decoder(None, tmp_path / "x.safetensors", world_size=4, steps=1, batch=8)


def test_cli_eval_generate_and_train_decoder_errors(tmp_path: Path) -> None:
    from bindsearch.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["demo", "eval-generate", "--n", "40", "--json"])
    assert res.exit_code == 0, res.output
    assert '"generated"' in res.output and '"audio"' in res.output
    res = runner.invoke(
        app, ["demo", "eval-generate", "--decoder", str(tmp_path / "none.safetensors")]
    )
    assert res.exit_code == 1 and "do not exist" in res.output
    res = runner.invoke(
        app,
        ["train-decoder", "-o", str(tmp_path / "d.safetensors"), "--world", "4", "--batch", "8"],
    )
    assert res.exit_code == 1 and "world_size >= batch" in res.output
