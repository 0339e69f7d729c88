"""Still-image transform: golden parity in official mode, every Pillow mode, bad input."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import EncoderError, PreprocessConfig
from encoders.transforms.errors import InvalidInput
from encoders.transforms.vision import load_image

CFG = PreprocessConfig()
S = CFG.image_size


def _image_cases() -> list[dict[str, Any]]:
    from .conftest import shared_dir

    manifest = shared_dir() / "fixtures" / "imagebind-parity" / "manifest.json"
    if not manifest.is_file():
        return []
    cases = json.loads(manifest.read_text("utf-8"))["preprocessing_cases"]
    return [c for c in cases if c["id"].startswith("image/")]


def _encode(im: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to 0..255 (float)."""
    mean = torch.tensor(CFG.image_mean).view(3, 1, 1)
    std = torch.tensor(CFG.image_std).view(3, 1, 1)
    return (x * std + mean) * 255


def _uniform(rgb: tuple[int, int, int], size: tuple[int, int] = (300, 240)) -> torch.Tensor:
    return load_image(Image.new("RGB", size, rgb), CFG, official=True)


@pytest.mark.parametrize("case", _image_cases(), ids=lambda c: c["id"])
def test_official_mode_matches_golden(parity_dir: Path, case: dict[str, Any]) -> None:
    expected = np.load(parity_dir / case["expected"]["file"])[0]
    got = load_image(parity_dir / case["inputs"][0], CFG, official=True)
    assert got.dtype == torch.float32 and got.shape == (3, S, S)
    tol = case["tolerance"]
    np.testing.assert_allclose(got.numpy(), expected, atol=tol["atol"], rtol=tol["rtol"])


def test_sources_agree(parity_dir: Path) -> None:
    path = parity_dir / "inputs" / "img_portrait_300x500.jpg"
    by_path = load_image(path, CFG)
    torch.testing.assert_close(load_image(str(path), CFG), by_path, atol=0, rtol=0)
    torch.testing.assert_close(load_image(path.read_bytes(), CFG), by_path, atol=0, rtol=0)
    with Image.open(path) as im:
        torch.testing.assert_close(load_image(im, CFG), by_path, atol=0, rtol=0)


def test_default_mode_applies_exif_orientation(parity_dir: Path) -> None:
    path = parity_dir / "inputs" / "img_exif_orient6_400x300.jpg"
    with Image.open(path) as im:
        upright = im.transpose(Image.Transpose.ROTATE_270)  # orientation 6 = turn 90° clockwise
    assert upright.size == (300, 400)
    expected = load_image(upright, CFG, official=True)
    torch.testing.assert_close(load_image(path, CFG), expected, atol=0, rtol=0)
    assert not torch.equal(load_image(path, CFG, official=True), expected)


def test_alpha_composited_over_white_by_default() -> None:
    im = Image.new("RGBA", (260, 240), (0, 0, 0, 0))  # black under full transparency
    im.paste((200, 10, 10, 255), (100, 100, 160, 140))
    data = _encode(im, "PNG")
    default, official = load_image(data, CFG), load_image(data, CFG, official=True)
    torch.testing.assert_close(default[:, 0, 0], _uniform((255, 255, 255))[:, 0, 0])
    torch.testing.assert_close(official[:, 0, 0], _uniform((0, 0, 0))[:, 0, 0])
    # Opaque pixels are untouched by the compositing.
    torch.testing.assert_close(default[:, S // 2, S // 2], official[:, S // 2, S // 2])


def test_palette_with_byte_transparency() -> None:
    im = Image.new("P", (240, 240), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    im.paste(1, (0, 0, 120, 240))
    im.info["transparency"] = bytes([0, 255] + [255] * 254)  # index 0 fully transparent
    official = load_image(im, CFG, official=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the official convert("RGB") warns about
        reference = load_image(im.convert("RGB"), CFG, official=True)
    torch.testing.assert_close(official, reference, atol=0, rtol=0)
    default = _pixels(load_image(im, CFG))
    torch.testing.assert_close(default[:, 5, -5], torch.full((3,), 255.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(default[:, 5, 5], torch.tensor([200.0, 100, 50]), atol=1e-3, rtol=0)


def test_16bit_png_is_scaled_not_clipped() -> None:
    grey16 = Image.fromarray(np.full((200, 260), 128 * 257, dtype=np.uint16))
    data = _encode(grey16, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16"
    expected = _uniform((128, 128, 128))
    torch.testing.assert_close(load_image(data, CFG), expected, atol=0, rtol=0)
    # The official loader clips 16-bit values at 255: the image turns white.
    torch.testing.assert_close(load_image(data, CFG, official=True), _uniform((255, 255, 255)))
    grey32 = Image.fromarray(np.full((200, 260), 128 * 257, dtype=np.int32))
    assert grey32.mode == "I"
    torch.testing.assert_close(load_image(grey32, CFG), expected, atol=0, rtol=0)


def test_cmyk_jpeg() -> None:
    data = _encode(Image.new("CMYK", (320, 240), (0, 255, 255, 0)), "JPEG", quality=95)
    px = _pixels(load_image(data, CFG))
    assert px.shape == (3, S, S)
    torch.testing.assert_close(px.mean(dim=(1, 2)), torch.tensor([255.0, 0, 0]), atol=3, rtol=0)


def test_one_bit_png() -> None:
    im = Image.new("1", (S, S), 0)
    im.paste(1, (0, 0, S // 2, S))
    px = _pixels(load_image(_encode(im, "PNG"), CFG))  # already S x S: no resampling
    torch.testing.assert_close(px[:, :, 0], torch.full((3, S), 255.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(px[:, :, -1], torch.zeros(3, S), atol=1e-3, rtol=0)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (250, 230), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    px = _pixels(load_image(buf.getvalue(), CFG))
    torch.testing.assert_close(px.mean(dim=(1, 2)), torch.tensor([255.0, 0, 0]), atol=1, rtol=0)


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("JPEG", {"progressive": True})],
)
def test_other_formats(fmt: str, kwargs: dict[str, Any]) -> None:
    gradient = np.tile(np.arange(256, dtype=np.uint8), (200, 1))
    im = Image.fromarray(np.stack([gradient, gradient[:, ::-1], np.full_like(gradient, 90)], -1))
    got = load_image(_encode(im, fmt, **kwargs), CFG)
    ref = load_image(im, CFG)
    assert got.shape == (3, S, S) and got.dtype == torch.float32
    atol = 0.0 if fmt != "JPEG" else 0.1  # lossy: a few grey levels
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)


def test_image_size_comes_from_config() -> None:
    cfg = PreprocessConfig(image_size=32)
    assert load_image(Image.new("RGB", (50, 90)), cfg).shape == (3, 32, 32)


@pytest.mark.parametrize(
    "data",
    [
        b"this is not an image",
        b"",
        _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:60],  # truncated
        _encode(Image.new("RGB", (8, 8)), "PPM"),  # a format Pillow reads but we do not take
    ],
    ids=["garbage", "empty", "truncated", "ppm"],
)
def test_undecodable_input_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidInput, match=r"cannot decode image.*accepted: JPEG, PNG"):
        load_image(data, CFG)


@pytest.mark.parametrize("pixels", [1000, 700], ids=["over-limit", "over-twice-limit"])
def test_decompression_bomb_is_invalid(monkeypatch: pytest.MonkeyPatch, pixels: int) -> None:
    data = _encode(Image.new("RGB", (40, 40)), "PNG")  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(InvalidInput, match=r"too large|over the limit"):
        load_image(data, CFG)


def test_invalid_input_is_a_domain_value_error() -> None:
    assert issubclass(InvalidInput, EncoderError) and issubclass(InvalidInput, ValueError)
    with pytest.raises(TypeError):
        load_image(123, CFG)  # type: ignore[arg-type]
