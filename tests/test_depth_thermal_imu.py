"""Depth, thermal and IMU loaders: every accepted format, every refused input, the tiny model."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import load_encoder
from encoders.config import PreprocessConfig
from encoders.errors import EncoderError
from encoders.transforms.depth import (
    DISPARITY_MAX,
    DISPARITY_MEAN,
    DISPARITY_STD,
    depth_to_disparity,
    load_depth,
)
from encoders.transforms.errors import InvalidInput
from encoders.transforms.imu import load_imu
from encoders.transforms.thermal import load_thermal

CFG = PreprocessConfig()
S = CFG.depth_size
N = CFG.imu_samples


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def scene_depth_m(h: int = 120, w: int = 160) -> np.ndarray:
    """A floor receding from 0.8 m to 5 m, with a box at 1.5 m."""
    rows = np.linspace(5.0, 0.8, h)[:, None] * np.ones((1, w))
    rows[40:80, 60:100] = 1.5
    return rows.astype(np.float32)


# ----------------------------------------------------------------------------- depth


def test_depth_png_mm_with_zero_holes(tmp_path: Path) -> None:
    depth_mm = np.round(scene_depth_m() * 1000).astype(np.uint16)
    depth_mm[:5] = 0  # missing measurements
    path = tmp_path / "depth.png"
    path.write_bytes(png_bytes(depth_mm))
    x = load_depth(path, CFG)
    assert x.shape == (1, S, S) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # Holes become disparity 0 -> the DepthNorm minimum (far away).
    floor = (0.01 / DISPARITY_MAX - DISPARITY_MEAN) / DISPARITY_STD
    assert x[0, 0].max().item() == pytest.approx(floor, abs=1e-4)
    # A path, its bytes and the metres array agree.
    from_bytes = load_depth(path.read_bytes(), CFG)
    assert torch.equal(x, from_bytes)


def test_depth_npy_metres_with_nan_matches_mm_png() -> None:
    metres = scene_depth_m()
    mm = np.round(metres * 1000).astype(np.uint16)
    a = load_depth(png_bytes(mm), CFG)
    b = load_depth(npy_bytes(mm.astype(np.float32) / 1000), CFG)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with_nan = metres.copy()
    with_nan[0, :] = np.nan
    with_nan[1, :] = np.inf
    out = load_depth(npy_bytes(with_nan), CFG, units="m")
    assert torch.isfinite(out).all()


def test_depth_formula_focal_baseline_and_training_scale() -> None:
    z = np.full((480, 640), 2.0, np.float32)  # at 640 px, focal_px is used as given
    d = depth_to_disparity(z, "m", focal_px=500.0, baseline_m=0.1, match_training_scale=False)
    assert d[0, 0] == pytest.approx(500 * 0.1 / 2.0)
    d8 = depth_to_disparity(z, "m", focal_px=500.0, baseline_m=0.1)
    assert d8[0, 0] == pytest.approx(500 * 0.1 / (8 * 2.0))
    # Default camera: Kinect fx and baseline, whatever the map's size.
    d_default = depth_to_disparity(np.full((48, 64), 2.0), "m", match_training_scale=False)
    assert d_default[0, 0] == pytest.approx(518.857901 * 0.075 / 2.0, rel=1e-5)
    # The same camera at twice the resolution (twice the focal in px) gives the same input.
    big = depth_to_disparity(np.full((960, 1280), 2.0), "m", focal_px=1000.0, baseline_m=0.1)
    assert big[0, 0] == pytest.approx(d8[0, 0])
    # A typical indoor scene lands near the training distribution (mean 0) only at 1/8 scale.
    assert abs(load_depth(scene_depth_m(), CFG).mean().item()) < 1.0
    assert load_depth(scene_depth_m(), CFG, match_training_scale=False).mean().item() > 3.0


def test_depth_sunrgbd_bit_rotation() -> None:
    mm = np.round(scene_depth_m() * 1000).astype(np.uint16)
    rotated = (mm << 3) | (mm >> 13)  # how the SUN RGB-D toolbox stores millimetres
    a = load_depth(png_bytes(rotated), CFG, units="sunrgbd")
    b = load_depth(png_bytes(mm), CFG, units="mm")
    assert torch.equal(a, b)


def test_depth_8bit_disparity_png() -> None:
    inv = 1.0 / scene_depth_m()
    disp8 = np.round(255 * inv / inv.max()).astype(np.uint8)
    x = load_depth(png_bytes(disp8), CFG)  # auto: uint8 = relative disparity
    assert x.shape == (1, S, S) and torch.isfinite(x).all()
    # Relative disparity is scaled so that its median sits on the training mean (z = 0).
    assert abs(x.median().item()) < 0.1
    # With a known scale it follows the metric path.
    scaled = load_depth(png_bytes(disp8), CFG, units="disparity", disparity_scale=0.5)
    assert not torch.equal(scaled, x)


def test_depth_rgb_photo_is_refused() -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(InvalidInput, match="colour PNG"):
        load_depth(png_bytes(photo), CFG)
    # The same pixels as JPEG: not an accepted container at all.
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG")
    with pytest.raises(InvalidInput, match="JPEG"):
        load_depth(buf.getvalue(), CFG)


def test_depth_all_invalid_and_implausible_units() -> None:
    with pytest.raises(InvalidInput, match="no valid pixels"):
        load_depth(np.zeros((32, 32), np.uint16), CFG)
    with pytest.raises(InvalidInput, match="no valid pixels"):
        load_depth(npy_bytes(np.full((32, 32), np.nan, np.float32)), CFG)
    with pytest.raises(InvalidInput, match="units='mm'"):
        load_depth(scene_depth_m() * 1000, CFG)  # float millimetres, auto says metres


# ----------------------------------------------------------------------------- thermal


def test_thermal_8bit_png_is_unit_scaled(tmp_path: Path) -> None:
    frame = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    path = tmp_path / "t.png"
    path.write_bytes(png_bytes(frame))
    x = load_thermal(path, CFG)
    assert x.shape == (1, S, S) and x.dtype == torch.float32
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    # An LLVIP-style export: grey stored in three equal channels.
    rgb = np.repeat(frame[..., None], 3, axis=2)
    torch.testing.assert_close(load_thermal(png_bytes(rgb), CFG), x)
    y = load_thermal(path, CFG, mean=0.5, std=0.5)
    torch.testing.assert_close(y, (x - 0.5) / 0.5)


def test_thermal_16bit_png_and_float_npy_are_stretched() -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(27000, 31000, (120, 160)).astype(np.uint16)
    x16 = load_thermal(png_bytes(raw), CFG)
    assert x16.shape == (1, S, S)
    assert x16.min().item() >= 0 and x16.max().item() <= 1 and x16.std().item() > 0.05
    celsius = raw.astype(np.float32) / 100 - 250  # same frame as temperatures
    xf = load_thermal(npy_bytes(celsius), CFG)
    torch.testing.assert_close(xf, x16, atol=1e-3, rtol=0)
    unit = rng.uniform(0, 1, (64, 64)).astype(np.float32)
    assert load_thermal(unit, CFG).shape == (1, S, S)
    with pytest.raises(InvalidInput, match="stretch"):
        load_thermal(celsius, CFG, scaling="fixed")


def test_thermal_refuses_colour_and_nan() -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(InvalidInput, match="colour PNG"):
        load_thermal(png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), CFG)
    bad = rng.uniform(0, 1, (32, 32)).astype(np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        load_thermal(npy_bytes(bad), CFG)


# ----------------------------------------------------------------------------- IMU


def imu_trace(n: int, rate: float) -> np.ndarray:
    t = np.arange(n) / rate
    acc = np.stack([np.sin(2 * np.pi * t), np.cos(2 * np.pi * t), 9.81 + 0 * t], 1)
    gyr = np.stack([0.1 * t, -0.1 * t, np.sin(t)], 1)
    return np.concatenate([acc, gyr], 1)  # (n, 6)


def test_imu_npy_both_layouts() -> None:
    trace = imu_trace(2000, 200.0)
    a = load_imu(npy_bytes(trace), CFG)
    b = load_imu(npy_bytes(trace.T.copy()), CFG)
    assert a.shape == (6, N) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, torch.from_numpy(trace.T.astype(np.float32)))


def test_imu_csv_with_and_without_header(tmp_path: Path) -> None:
    trace = imu_trace(600, 100.0)
    t = np.arange(600) / 100.0
    body = "\n".join(
        ",".join(f"{v:.6f}" for v in [ti, *row]) for ti, row in zip(t, trace, strict=True)
    )
    with_header = tmp_path / "imu.csv"
    with_header.write_text("t,ax,ay,az,gx,gy,gz\n" + body + "\n")
    no_header = ("\n".join(",".join(f"{v:.6f}" for v in row) for row in trace)).encode()
    a = load_imu(with_header, CFG)
    b = load_imu(no_header, CFG, rate_hz=100.0)
    assert a.shape == b.shape == (6, N)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # Ego4D's layout: ms timestamps, gyro columns before accel ones.
    ego = (
        "component_idx,component_timestamp_ms,canonical_timestamp_ms,"
        "gyro_x,gyro_y,gyro_z,accl_x,accl_y,accl_z\n"
    )
    ego += "\n".join(
        f"0,{ti * 1000:.3f},{ti * 1000:.3f},{r[3]},{r[4]},{r[5]},{r[0]},{r[1]},{r[2]}"
        for ti, r in zip(t, trace, strict=True)
    )
    torch.testing.assert_close(load_imu(ego.encode(), CFG), a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rate", [50.0, 200.0, 400.0, 1000.0])
def test_imu_resampled_to_model_rate(rate: float) -> None:
    # 12 s at any rate -> the centred 10 s at 200 Hz, the same signal each time.
    n = int(12 * rate)
    t = np.arange(n) / rate
    sig = np.sin(2 * np.pi * 0.5 * t)
    trace = np.stack([sig] * 6, 1)
    x = load_imu(trace, CFG, rate_hz=rate)
    assert x.shape == (6, N)
    start = ((n - 1) / rate - (N - 1) / 200.0) / 2  # the centred window
    grid = start + np.arange(N) / 200.0
    expected = np.sin(2 * np.pi * 0.5 * grid)
    np.testing.assert_allclose(x[0].numpy(), expected, atol=5e-3)


def test_imu_short_trace_is_edge_padded_and_units_convert() -> None:
    trace = np.ones((100, 6))  # 0.5 s at 200 Hz
    x = load_imu(trace, CFG, accel_units="g", gyro_units="deg/s")
    assert x.shape == (6, N)
    torch.testing.assert_close(x[0], torch.full((N,), 9.80665))
    torch.testing.assert_close(x[5], torch.full((N,), np.pi / 180))


# ----------------------------------------------------------------------------- bad inputs

LOADERS: dict[str, Callable[..., torch.Tensor]] = {
    "depth": load_depth,
    "thermal": load_thermal,
    "imu": load_imu,
}


def truncated_png() -> bytes:
    return png_bytes(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))[:-40]


def bomb_png() -> bytes:
    """A valid 100000 x 100000 greyscale PNG header over a tiny compressed stream."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (Path("/nonexistent-never-created").touch, ())  # must never run


def pickle_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Boom(), 1], dtype=object), allow_pickle=True)
    assert b"touch" in buf.getvalue()  # the payload really carries the call
    return buf.getvalue()


def npy_header_bomb() -> bytes:
    """A .npy header promising 10^10 float32 elements, followed by 16 bytes of data."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }"
    header += b" " * (118 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(16)


BAD_BYTES = {
    "npy header bomb": npy_header_bomb(),
    "zero bytes": b"",
    "random bytes": np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "truncated png": truncated_png(),
    "png bomb": bomb_png(),
    "object npy": pickle_npy(),
    "truncated npy": npy_bytes(np.zeros((64, 64), np.float32))[:-100],
    "bad npy header": b"\x93NUMPY\x01\x00\x10\x00{'descr': <oops>}    \n",
    "wav file": b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64),
}


# A hang (e.g. a bomb decoded in full) fails through pytest-timeout, not a wall-clock assertion:
# timings on these shared machines are noise.
@pytest.mark.timeout(30)
@pytest.mark.parametrize("modality", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(BAD_BYTES))
def test_bad_inputs_raise_invalid_input(modality: str, case: str) -> None:
    with pytest.raises(InvalidInput) as info:
        LOADERS[modality](BAD_BYTES[case], CFG)
    message = str(info.value)
    assert "\n" not in message and modality in message
    assert isinstance(info.value, EncoderError) and isinstance(info.value, ValueError)
    assert not Path("/nonexistent-never-created").exists()


def test_wrong_shapes_and_modalities() -> None:
    rng = np.random.default_rng(4)
    trace = imu_trace(2000, 200.0)
    with pytest.raises(InvalidInput, match="not an image"):
        load_depth(npy_bytes(trace), CFG)  # an IMU trace handed to depth
    with pytest.raises(InvalidInput, match="not an image"):
        load_thermal(trace, CFG)
    with pytest.raises(InvalidInput, match="PNG"):
        load_imu(png_bytes(rng.integers(0, 256, (32, 32), dtype=np.uint8)), CFG)
    with pytest.raises(InvalidInput, match="single-channel"):
        load_depth(np.zeros((3, 32, 32, 2), np.float32), CFG)
    with pytest.raises(InvalidInput, match="axis of 6 or 7"):
        load_imu(np.zeros((100, 5)), CFG)
    with pytest.raises(InvalidInput, match="ambiguous"):
        load_imu(np.zeros((6, 6)), CFG)
    with pytest.raises(InvalidInput, match="not numeric"):
        load_imu(np.zeros((100, 6), dtype=np.complex64), CFG)


def test_imu_refuses_nan_inf_and_ragged_csv() -> None:
    trace = imu_trace(400, 200.0)
    trace[10, 2] = np.inf
    with pytest.raises(InvalidInput, match="NaN or inf"):
        load_imu(npy_bytes(trace), CFG)
    nan = imu_trace(400, 200.0)
    nan[5, 0] = np.nan
    with pytest.raises(InvalidInput, match="NaN or inf"):
        load_imu(nan, CFG)
    with pytest.raises(InvalidInput, match="line 3 has 5 fields"):
        load_imu(b"t,ax,ay,az,gx,gy,gz\n0,1,2,3,4,5,6\n0.01,1,2,3,4\n", CFG)
    with pytest.raises(InvalidInput, match="non-numeric"):
        load_imu(b"1,2,3,4,5,6\n1,2,x,4,5,6\n", CFG)
    with pytest.raises(InvalidInput, match="header"):
        load_imu(b"foo,bar\n1,2\n", CFG)
    for empty in (np.zeros((0, 6), np.float32), np.zeros((6, 0), np.float32)):
        with pytest.raises(InvalidInput, match="0 sample"):
            load_imu(npy_bytes(empty), CFG)


def test_imu_csv_row_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import encoders.transforms.imu as imu_module

    monkeypatch.setattr(imu_module, "MAX_ROWS", 10)
    rows = "\n".join("1,2,3,4,5,6" for _ in range(50)).encode()
    with pytest.raises(InvalidInput, match="over the limit"):
        load_imu(rows, CFG)


def test_common_entry_point_passes_options() -> None:
    from encoders.inputs import preprocess

    depth_mm = np.round(scene_depth_m() * 1000).astype(np.uint16)
    batch = preprocess("depth", [png_bytes(depth_mm)] * 2, CFG, focal_px=300.0)
    assert batch.shape == (2, 1, S, S)
    with pytest.raises(InvalidInput, match=r"<bytes #0>: depth"):
        preprocess("depth", [b"not a depth map"], CFG)
    imu = preprocess("imu", [npy_bytes(imu_trace(500, 100.0))], CFG, rate_hz=100.0)
    assert imu.shape == (1, 6, N)


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_encoder():  # type: ignore[no-untyped-def]
    return load_encoder(config="imagebind_test", modalities=["depth", "thermal", "imu"])


def test_outputs_embed_with_tiny_model(tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    depth_mm = np.round(scene_depth_m() * 1000).astype(np.uint16)
    frame = np.tile(np.arange(200, dtype=np.uint8), (150, 1))
    cases = {
        "depth": load_depth(png_bytes(depth_mm), CFG),
        "thermal": load_thermal(png_bytes(frame), CFG),
        "imu": load_imu(imu_trace(3000, 300.0), CFG, rate_hz=300.0),
    }
    for modality, x in cases.items():
        y = tiny_encoder.embed(modality, x[None])
        assert y.shape == (1, tiny_encoder.dim)
        assert np.isfinite(y).all()
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
