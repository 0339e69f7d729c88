"""Video transform: clip arithmetic, parity with the official loader, decoding, bad input."""

from __future__ import annotations

import hashlib
import io
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.video.stream
import numpy as np
import pytest
import torch

from encoders import load_encoder
from encoders.config import PreprocessConfig
from encoders.transforms._clips import ClipSpan, clip_spans
from encoders.transforms.errors import InvalidInput
from encoders.transforms.video import extract_audio, load_video, probe_video

CFG = PreprocessConfig()
SMALL = PreprocessConfig(image_size=32)  # real clip geometry, tiny frames: fast tests
VIDEO_CASES = [
    "video/vid_lossless_rgb_176x132_10fps_3.3s.mp4",
    "video/vid_yuv420p_portrait_120x160_12fps_4.5s.mp4",
]


# --- the clip sampler -------------------------------------------------------------------------


def test_clip_spans_official_arithmetic() -> None:
    # 3.3 s video: max start is the float 3.3 - 2.0 (= 1.2999999999999998), made exact.
    spans = clip_spans(3.3, 2.0, 5)
    step = Fraction(3.3 - 2.0) / 4
    assert spans == [(i * step, i * step + 2) for i in range(5)]
    assert all(isinstance(s.start, Fraction) for s in spans)


def test_clip_spans_audio_table() -> None:
    # The fixture README's 22.05 kHz case: 52800 samples at 16 kHz, 3 clips of 2 s.
    got = [[int(s.start * 16000), int(s.end * 16000)] for s in clip_spans(52800 / 16000, 2, 3)]
    assert got == [[0, 32000], [10399, 42399], [20799, 52799]]


def test_clip_spans_short_file_repeats_one_clip() -> None:
    assert clip_spans(1.2, 2.0, 5) == [ClipSpan(Fraction(0), Fraction(2))] * 5
    # One clip: the step is divided by max(1 - 1, 1), so it starts at 0.
    assert clip_spans(7.0, 2.0, 1) == [ClipSpan(Fraction(0), Fraction(2))]


@pytest.mark.parametrize("bad", [(1.0, 2.0, 0), (1.0, 0.0, 3), (float("nan"), 2.0, 3)])
def test_clip_spans_rejects_bad_arguments(bad: tuple[float, float, int]) -> None:
    with pytest.raises(ValueError):
        clip_spans(*bad)


# --- parity with the official loader (golden fixtures) ----------------------------------------


@pytest.fixture(scope="module")
def manifest(parity_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((parity_dir / "manifest.json").read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def loaded(parity_dir: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our load_video output for each fixture video (computed once: the model tests reuse it)."""
    cases = {c["id"]: c for c in manifest["preprocessing_cases"]}
    return {
        cid: load_video(parity_dir / cases[cid]["inputs"][0], CFG, official=True)
        for cid in VIDEO_CASES
    }


@pytest.mark.parametrize("case_id", VIDEO_CASES)
def test_preprocessing_matches_official(
    case_id: str, parity_dir: Path, manifest: dict[str, Any], loaded: dict[str, torch.Tensor]
) -> None:
    case = next(c for c in manifest["preprocessing_cases"] if c["id"] == case_id)
    exp, tol = case["expected"], case["tolerance"]
    full = loaded[case_id][None].numpy()  # (1, 15, 3, 2, 224, 224)
    assert list(full.shape) == exp["full_shape"]
    assert full.dtype == np.float32
    sub = np.load(parity_dir / exp["subsample"]["file"])
    np.testing.assert_allclose(full[..., 3::7, 5::7], sub, rtol=0, atol=tol["subsample_atol"])
    means = np.load(parity_dir / exp["per_frame_mean"]["file"])
    got_means = full.astype(np.float64).mean(axis=(-1, -2))
    np.testing.assert_allclose(got_means, means, rtol=0, atol=tol["per_frame_mean_atol"])
    if case["input_info"]["lossless_rgb"]:
        # RGB-coded H.264 decodes identically everywhere: the whole tensor is bit-exact.
        digest = hashlib.sha256(np.ascontiguousarray(full).tobytes()).hexdigest()
        assert digest == exp["full_sha256"]


def test_default_mode_and_bytes_input_equal_official(
    parity_dir: Path, loaded: dict[str, torch.Tensor]
) -> None:
    path = parity_dir / "inputs" / VIDEO_CASES[1].removeprefix("video/")
    assert torch.equal(load_video(path, CFG), loaded[VIDEO_CASES[1]])
    assert torch.equal(load_video(path.read_bytes(), CFG), loaded[VIDEO_CASES[1]])


def test_probe_fixture(parity_dir: Path, manifest: dict[str, Any]) -> None:
    for case_id in VIDEO_CASES:
        case = next(c for c in manifest["preprocessing_cases"] if c["id"] == case_id)
        info, want = probe_video(parity_dir / case["inputs"][0]), case["input_info"]
        assert (info.width, info.height) == (want["width"], want["height"])
        assert info.frames == want["decord_num_frames"]
        assert info.fps == want["decord_avg_fps"]
        assert info.duration == want["decord_num_frames"] / want["decord_avg_fps"]
        assert not info.has_audio
        assert info.rotation == 0


@pytest.mark.parametrize("case_id", VIDEO_CASES)
def test_model_on_loaded_video_matches_official(
    case_id: str, parity_dir: Path, manifest: dict[str, Any], loaded: dict[str, torch.Tensor]
) -> None:
    name = case_id.removeprefix("video/").removesuffix(".mp4")
    case = next(c for c in manifest["model_cases"] if c["id"] == f"vision/video_mp4_{name}")
    enc = load_encoder(
        parity_dir / "checkpoint.pth", config=parity_dir / "config.json", modalities=["vision"]
    )
    x = loaded[case_id]  # (15, 3, 2, 224, 224)
    out = enc.forward({"vision": x[None]})["vision"]
    with torch.inference_mode():
        head = enc.model.head_features("vision", x)
    for key, got in (("final", out), ("head", head)):
        want = np.load(parity_dir / case["outputs"][key]["file"])
        tol = case["tolerance"][key]
        np.testing.assert_allclose(got.numpy(), want, atol=tol["atol"], rtol=tol["rtol"])


# --- generated videos ---------------------------------------------------------------------------


def _frame(i: int, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: red = 7 * i (the frame number), green marks the top-left quarter."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (7 * i) % 256
    img[: h // 2, : w // 2, 1] = 200
    return img


def _make_video(
    fmt: str,
    codec: str,
    w: int,
    h: int,
    n: int,
    fps: int | Fraction = 10,
    pix_fmt: str = "yuv420p",
    rotation: int | None = None,
    pts_ms: list[int] | None = None,
    audio_s: float = 0.0,
    frames: list[np.ndarray] | None = None,
    options: dict[str, str] | None = None,
) -> bytes:
    """Encode a tiny video in memory with PyAV (and an AAC soundtrack if ``audio_s``)."""
    buf = io.BytesIO()
    options = {**({"qp": "0"} if codec == "libx264rgb" else {}), **(options or {})}
    with av.open(buf, "w", format=fmt) as out:
        vs = out.add_stream(codec, rate=fps, options=options)
        assert isinstance(vs, av.video.stream.VideoStream)
        vs.width, vs.height, vs.pix_fmt = w, h, pix_fmt
        if pts_ms is not None:  # millisecond timestamps, for variable frame rates
            vs.time_base = vs.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            vs.set_display_rotation(rotation)
        aus = out.add_stream("aac", rate=16000, layout="mono") if audio_s else None
        for i in range(n):
            img = frames[i] if frames is not None else _frame(i, w, h)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(vs.encode(frame))
        out.mux(vs.encode())
        if aus is not None:
            t = np.arange(int(16000 * audio_s)) / 16000
            wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # (1, N)
            for k in range(0, wave.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(wave[:, k : k + 1024]), format="fltp", layout="mono"
                )
                af.sample_rate = 16000
                out.mux(aus.encode(af))
            out.mux(aus.encode())
    return buf.getvalue()


def _frame_numbers(x: torch.Tensor, cfg: PreprocessConfig) -> list[list[int]]:
    """Undo normalisation on the red channel of uniform frames -> frame number per (clip, t)."""
    red = x[::3, 0].mean(dim=(-1, -2)) * cfg.image_std[0] + cfg.image_mean[0]  # (clips, T)
    numbers: list[list[int]] = (red * 255).round().div(7).round().long().tolist()
    return numbers


def _uniform(i: int, w: int, h: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 7 * i
    return img


def test_frame_indices_follow_the_official_rule() -> None:
    # 33 frames at 10 fps (3.3 s), lossless: clips start at 0, .325, .65, .975, 1.3 s.
    data = _make_video(
        "mp4", "libx264rgb", 32, 24, 33, pix_fmt="rgb24",
        frames=[_uniform(i, 32, 24) for i in range(33)],
    )  # fmt: skip
    x = load_video(data, SMALL)
    assert x.shape == (15, 3, 2, 32, 32)
    assert _frame_numbers(x, SMALL) == [[0, 19], [4, 23], [7, 26], [10, 29], [13, 32]]


def test_seeking_across_keyframes_and_b_frames() -> None:
    # 8 s at 10 fps, a keyframe every 6 frames and B-frames: frames are found by seeking.
    n = 80
    data = _make_video(
        "mp4", "libx264", 32, 24, n, pix_fmt="yuv444p",
        frames=[_uniform(i % 36, 32, 24) for i in range(n)],
        options={"g": "6", "bf": "2", "qp": "4"},
    )  # fmt: skip
    # Starts at 0, 1.5, 3, 4.5, 6 s: frames [0, 19], [15, 34], [30, 49], [45, 64], [60, 79].
    want = [[a % 36, b % 36] for a, b in ([0, 19], [15, 34], [30, 49], [45, 64], [60, 79])]
    assert _frame_numbers(load_video(data, SMALL), SMALL) == want


def test_variable_frame_rate_picks_by_index() -> None:
    # decord's rule is by frame index at the *average* rate, whatever the timestamps say.
    pts = [0, 50, 100, 400, 450, 500, 900, 1000, 1100, 1500, 1550, 1600, 1900, 2000, 2500]
    data = _make_video(
        "mp4", "libx264rgb", 32, 24, len(pts), pix_fmt="rgb24", pts_ms=pts,
        frames=[_uniform(i, 32, 24) for i in range(len(pts))],
    )  # fmt: skip
    info = probe_video(data)
    assert info.frames == len(pts)
    spans = clip_spans(info.duration, 2.0, 5)
    want = []
    for s in spans:
        first = int(np.ceil(info.fps * float(s.start)))
        stop = min(int(np.ceil(info.fps * float(s.end))), info.frames)
        want.append([first, stop - 1])
    assert _frame_numbers(load_video(data, SMALL), SMALL) == want


def test_short_video_gives_identical_clips() -> None:
    data = _make_video(
        "mp4", "libx264rgb", 32, 24, 10, pix_fmt="rgb24",
        frames=[_uniform(i, 32, 24) for i in range(10)],
    )  # fmt: skip
    assert probe_video(data).duration == 1.0
    x = load_video(data, SMALL)  # (15, 3, 2, 32, 32)
    assert _frame_numbers(x, SMALL) == [[0, 9]] * 5
    assert all(torch.equal(x[:3], x[i : i + 3]) for i in range(3, 15, 3))


def test_webm_vp9() -> None:
    data = _make_video("webm", "libvpx-vp9", 64, 48, 15)
    info = probe_video(data)
    assert (info.width, info.height, info.frames, info.fps) == (64, 48, 15, 10.0)
    x = load_video(data, SMALL)
    assert x.shape == (15, 3, 2, 32, 32) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_portrait_mov_crops_top_centre_bottom(tmp_path: Path) -> None:
    path = tmp_path / "portrait.mov"
    path.write_bytes(_make_video("mov", "libx264", 48, 96, 12))
    x = load_video(path, SMALL)  # frames scale to 32 x 64: crops at y = 0, 16, 32
    assert x.shape == (15, 3, 2, 32, 32)
    green = x[:3, 1, 0]  # (crops, 32, 32) of the first clip
    # The marked top-left quarter (scaled: rows 0..31, cols 0..15) fills the top crop's left
    # half, half of the centre crop's, and none of the bottom crop's.
    assert green[0, :, :12].mean() > 1.0 and green[0, :, 20:].mean() < 0.0
    assert green[2].max() < 0.0


def test_display_rotation_is_applied() -> None:
    frames = [_frame(i, 32, 24) for i in range(12)]
    rotated = _make_video("mov", "libx264rgb", 32, 24, 12, pix_fmt="rgb24", rotation=90,
                          frames=frames)  # fmt: skip
    assert probe_video(rotated).rotation == 90
    upright = _make_video("mov", "libx264rgb", 24, 32, 12, pix_fmt="rgb24",
                          frames=[np.ascontiguousarray(np.rot90(f)) for f in frames])  # fmt: skip
    plain = _make_video("mov", "libx264rgb", 32, 24, 12, pix_fmt="rgb24", frames=frames)
    assert probe_video(rotated).width == 32  # the coded size
    # decord turns frames upright too, so both modes do.
    assert torch.equal(load_video(rotated, SMALL), load_video(upright, SMALL))
    assert torch.equal(load_video(rotated, SMALL, official=True), load_video(upright, SMALL))
    assert not torch.equal(load_video(rotated, SMALL), load_video(plain, SMALL))


def test_config_geometry_is_read() -> None:
    cfg = PreprocessConfig(image_size=16, video_clips=2, video_frames=4, video_clip_duration=1.0)
    x = load_video(_make_video("mp4", "libx264", 40, 30, 25), cfg)
    assert x.shape == (6, 3, 4, 16, 16)


def test_extract_audio_from_mp4_with_aac() -> None:
    data = _make_video("mp4", "libx264", 32, 24, 20, audio_s=2.0)
    assert probe_video(data).has_audio
    got = extract_audio(data)
    assert got is not None
    wave, rate = got
    assert rate == 16000 and wave.dtype == np.float32 and wave.shape[0] == 1
    assert 32000 <= wave.shape[1] <= 32000 + 2048  # AAC pads to whole 1024-sample frames
    spectrum = np.abs(np.fft.rfft(wave[0, 4000:20000]))
    assert abs(np.argmax(spectrum) * rate / 16000 - 440) <= 2  # the 440 Hz tone survives
    first = extract_audio(data, max_seconds=0.5)
    assert first is not None and first[0].shape == (1, 8000)


def test_extract_audio_none_without_soundtrack() -> None:
    assert extract_audio(_make_video("mp4", "libx264", 32, 24, 5)) is None


def _audio_only_m4a() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        aus = out.add_stream("aac", rate=16000, layout="mono")
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), "fltp", "mono")
        af.sample_rate = 16000
        out.mux(aus.encode(af))
        out.mux(aus.encode())
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not a recognised video container"),
        (b"this is not a video at all, just some text", "not a recognised video container"),
        (b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8, "not a readable video"),
        (b"#EXTM3U\n#EXT-X-VERSION:3\nfile:///etc/passwd\n", "not a recognised video container"),
    ],
    ids=["empty", "text", "corrupt-mp4", "hls-playlist"],
)
def test_bad_input_is_invalid_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_video(data, SMALL)


def test_truncated_and_audio_only_files_are_invalid_input() -> None:
    data = _make_video("mp4", "libx264", 32, 24, 20)
    with pytest.raises(InvalidInput):
        load_video(data[: len(data) // 2], SMALL)  # the index (moov) is at the end
    with pytest.raises(InvalidInput, match="no video stream"):
        load_video(_audio_only_m4a(), SMALL)
    assert issubclass(InvalidInput, ValueError)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_video(tmp_path / "nope.mp4", SMALL)


def test_clip_without_frames_takes_nearest_frame_by_default() -> None:
    # 3 frames at 0.25 fps (12 s): clips 2 and 4 fall between frames ([2, 2) and [3, 3)).
    data = _make_video(
        "mp4", "libx264rgb", 32, 24, 3, fps=Fraction(1, 4), pix_fmt="rgb24",
        frames=[_uniform(i, 32, 24) for i in range(3)],
    )  # fmt: skip
    assert probe_video(data).duration == 12.0
    got = _frame_numbers(load_video(data, SMALL), SMALL)
    assert got == [[0, 0], [1, 1], [2, 2], [2, 2], [2, 2]]
    with pytest.raises(InvalidInput, match="holds no frame"):
        load_video(data, SMALL, official=True)
