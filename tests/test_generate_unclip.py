"""Stable unCLIP behind ``ImageGenerator``, on a tiny random pipeline built offline.

The pipeline is saved with ``save_pretrained`` and loaded back through ``load_unclip`` (the
real loading path, with the placeholder image encoder), once for the module.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers", reason="the generate extra is not installed")

from encoders import PRESETS, EncoderError, load_encoder
from generate import ImageGenerator, load_generator
from generate.unclip import (
    DEFAULT_EMBEDDING_SCALE,
    UNCLIP_LICENCE,
    UnCLIPGenerator,
    calibrate_embedding_scale,
    load_unclip,
)

from .unclip_tiny import build_tiny_unclip

DIM = PRESETS["imagebind_test"].embed_dim


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_unclip(tmp_path_factory.mktemp("unclip") / "pipe", DIM)


@pytest.fixture(scope="module")
def gen(pipe_dir: Path) -> UnCLIPGenerator:
    return load_unclip(pipe_dir, local_files_only=True)


def _unit(seed: int, n: int = 1) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_loads_as_an_image_generator(gen: UnCLIPGenerator, pipe_dir: Path) -> None:
    assert isinstance(gen, ImageGenerator)
    info = gen.info
    assert (info.dim, info.image_size, info.default_steps) == (DIM, 16, 20)
    assert info.licence == UNCLIP_LICENCE and "RAIL++-M" in info.licence
    assert info.name == f"unclip:{pipe_dir}"
    # The repository's image encoder is replaced by the placeholder (a few hundred parameters).
    n_params = sum(p.numel() for p in gen.pipeline.image_encoder.parameters())
    assert n_params < 1000
    assert gen.embedding_scale == DEFAULT_EMBEDDING_SCALE


def test_generates_png_deterministically(gen: UnCLIPGenerator) -> None:
    x = _unit(0)
    [a] = gen.generate(x, seed=3, steps=2)
    [b] = gen.generate(x, seed=3, steps=2)
    [c] = gen.generate(x, seed=4, steps=2)
    [d] = gen.generate(_unit(1), seed=3, steps=2)
    assert a.mode == "RGB" and a.size == (16, 16)
    buf = io.BytesIO()
    a.save(buf, "PNG")
    again = Image.open(io.BytesIO(buf.getvalue()))
    assert again.format == "PNG" and np.array_equal(_pixels(again), _pixels(a))
    assert np.array_equal(_pixels(a), _pixels(b))  # same seed, same image
    assert np.abs(_pixels(a) - _pixels(c)).max() > 0  # another seed
    assert np.abs(_pixels(a) - _pixels(d)).max() > 0  # another embedding


def test_rows_do_not_depend_on_their_batch(gen: UnCLIPGenerator) -> None:
    x = _unit(5, 2)
    both = gen.generate(x, seed=1, steps=2)
    [second] = gen.generate(x[1:], seed=1, steps=2)
    assert len(both) == 2
    assert np.array_equal(_pixels(both[1]), _pixels(second))


def test_unit_vectors_reach_the_unet_scaled(gen: UnCLIPGenerator) -> None:
    """The class embedding sees [scale * x | noise-level code], and all zeros (unconditional)."""
    seen: list[torch.Tensor] = []
    hook = gen.pipeline.unet.class_embedding.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().clone())
    )
    try:
        gen.generate(_unit(2) * 7.0, seed=0, steps=1)  # any norm in, unit x scale used
    finally:
        hook.remove()
    (labels,) = seen  # (2, 2D): guidance runs the unconditional and conditional rows together
    assert torch.count_nonzero(labels[0]) == 0
    # noise_level 0 still mixes in sqrt(1 - alphas_cumprod[0]) of noise: a tiny fraction.
    direction = torch.from_numpy(_unit(2)[0])
    torch.testing.assert_close(
        labels[1, :DIM], direction * DEFAULT_EMBEDDING_SCALE, rtol=0, atol=0.2
    )
    # The sinusoidal code of noise level 0: cos(0) = 1 then sin(0) = 0.
    code = torch.cat([torch.ones(DIM // 2), torch.zeros(DIM // 2)])
    torch.testing.assert_close(labels[1, DIM:], code)


def test_settings(pipe_dir: Path, gen: UnCLIPGenerator) -> None:
    x = _unit(0)
    [base] = gen.generate(x, seed=0, steps=2)
    noisy = load_unclip(pipe_dir, noise_level=500, local_files_only=True)
    [a] = noisy.generate(x, seed=0, steps=2)
    assert np.abs(_pixels(a) - _pixels(base)).max() > 0
    scaled = load_unclip(pipe_dir, embedding_scale=1.0, local_files_only=True)
    assert scaled.embedding_scale == 1.0
    [b] = scaled.generate(x, seed=0, steps=2)
    assert np.abs(_pixels(b) - _pixels(base)).max() > 0
    via_name = load_generator("unclip", model=pipe_dir, local_files_only=True)
    [c] = via_name.generate(x, seed=0, steps=2)
    assert np.array_equal(_pixels(c), _pixels(base))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"dim": 64},
            r"takes 16-d image embeddings but the encoder makes 64-d ones: .*imagebind_huge",
        ),
        ({"noise_level": 1000}, r"noise_level must be in 0\.\.999"),
        ({"noise_level": -1}, r"noise_level must be in 0\.\.999"),
        ({"embedding_scale": 0.0}, r"embedding_scale must be a positive number"),
    ],
)
def test_bad_settings(pipe_dir: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(EncoderError, match=message):
        load_unclip(pipe_dir, local_files_only=True, **kwargs)  # type: ignore[arg-type]


def test_bad_embeddings_and_steps(gen: UnCLIPGenerator) -> None:
    with pytest.raises(EncoderError, match=r"takes \(batch, 16\) embeddings; got shape \(1, 64\)"):
        gen.generate(np.ones((1, 64), np.float32))
    with pytest.raises(EncoderError, match="NaN"):
        gen.generate(np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(EncoderError, match="steps must be at least 1"):
        gen.generate(_unit(0), steps=0)


def test_missing_weights_and_missing_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EncoderError, match=r"^cannot load Stable unCLIP from .*save_pretrained\)$"):
        load_unclip(tmp_path / "nothing-here", local_files_only=True)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(EncoderError, match=r"pip install 'bindsearch\[generate\]'"):
        load_unclip(tmp_path / "nothing-here", local_files_only=True)


def test_calibrated_scale_is_the_median_raw_vision_norm() -> None:
    enc = load_encoder(None, config="imagebind_test", modalities=["vision"])
    rng = np.random.default_rng(0)
    images = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    s1 = calibrate_embedding_scale(enc, images, batch_size=2)
    assert s1 > 0
    before = enc.embed_items("vision", images)
    with torch.no_grad():  # the head's last Linear: raw norms triple, unit vectors do not move
        enc.model.modality_heads["vision"][-1].weight.mul_(3.0)
    assert calibrate_embedding_scale(enc, images) == pytest.approx(3 * s1, rel=1e-4)
    np.testing.assert_allclose(enc.embed_items("vision", images), before, atol=1e-5)
    with pytest.raises(EncoderError, match="at least one image"):
        calibrate_embedding_scale(enc, [])
