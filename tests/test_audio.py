"""Audio transform: golden parity (official mode), the model on it, formats, departures, errors."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from encoders import EncoderError, PreprocessConfig, load_encoder
from encoders.transforms import _resample
from encoders.transforms.audio import load_audio, read_audio, waveform_to_fbank
from encoders.transforms.errors import InvalidInput

CFG = PreprocessConfig()
SR = CFG.audio_sample_rate
SHAPE = (CFG.audio_clips, 1, CFG.audio_mel_bins, CFG.audio_target_length)
LOG_EPS = math.log(torch.finfo(torch.float32).eps)  # -15.942385: digital silence
# Zero-padded frames after normalisation, in float32 as the pipeline computes it (0.46706063).
PADDED = (0 - torch.tensor(CFG.audio_mean)) / torch.tensor(CFG.audio_std)


def _manifest() -> dict[str, Any]:
    from .conftest import shared_dir

    path = shared_dir() / "fixtures" / "imagebind-parity" / "manifest.json"
    data: dict[str, Any] = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    return data


def _audio_cases() -> list[dict[str, Any]]:
    cases = _manifest().get("preprocessing_cases", [])
    return [c for c in cases if c["id"].startswith("audio/")]


def _signal(seconds: float, sr: int = SR, dc: float = 0.0, seed: int = 0) -> np.ndarray:
    """A tone, a chirp and some noise: (N,) float32 with energy across the mel range."""
    t = np.arange(round(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = (
        0.3 * np.sin(2 * np.pi * 440 * t)
        + 0.2 * np.sin(2 * np.pi * (200 + 1000 * t) * t)
        + 0.05 * rng.standard_normal(t.size)
        + dc
    )
    return x.astype(np.float32)


def _encode_sf(wave: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave.T, sr, format=fmt, subtype=subtype)  # soundfile wants (N, C)
    return buf.getvalue()


def _check_within(got: np.ndarray, expected: np.ndarray, tol: dict[str, float]) -> None:
    """The manifest's three-part criterion: quantile within atol, all within max_abs, mean."""
    assert got.shape == expected.shape
    err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    q = float(np.quantile(err, tol["quantile"]))
    assert q <= tol["atol"], f"q{tol['quantile']} |diff| {q:.3g} > atol {tol['atol']}"
    assert err.max() <= tol["max_abs"], f"max |diff| {err.max():.3g} > {tol['max_abs']}"
    assert err.mean() <= tol["mean_abs"], f"mean |diff| {err.mean():.3g} > {tol['mean_abs']}"


# --- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _audio_cases(), ids=lambda c: c["id"])
def test_official_mode_matches_golden(parity_dir: Path, case: dict[str, Any]) -> None:
    expected = np.load(parity_dir / case["expected"]["file"])[0]  # (clips, 1, F, T)
    got = load_audio(parity_dir / case["inputs"][0], CFG, official=True)
    assert got.dtype == torch.float32 and got.shape == SHAPE
    _check_within(got.numpy(), expected, case["tolerance"])


def test_model_on_our_preprocessing_matches_golden(parity_dir: Path) -> None:
    case = next(c for c in _manifest()["model_cases"] if c["id"] == "audio/all")
    # The model case's batch is the preprocessing cases' outputs: rebuild each from its input.
    source = {c["expected"]["file"]: c["inputs"][0] for c in _audio_cases()}
    files = [parity_dir / source[f] for f in case["input"]["files"]]
    batch = torch.stack([load_audio(f, CFG, official=True) for f in files])  # (B, 3, 1, F, T)
    enc = load_encoder(
        parity_dir / "checkpoint.pth", config=parity_dir / "config.json", modalities=["audio"]
    )
    got = enc({"audio": batch})["audio"].numpy()
    expected = np.load(parity_dir / case["outputs"]["final"]["file"])
    tol = case["tolerance"]["final"]
    np.testing.assert_allclose(got, expected, atol=tol["atol"], rtol=tol["rtol"])


def test_default_mode_equals_official_without_overlap(parity_dir: Path) -> None:
    # 12.3 s: the three clips are disjoint, so the in-place mean subtraction changes nothing.
    path = parity_dir / "inputs" / "aud_16k_stereo_pcm16_12.3s.wav"
    torch.testing.assert_close(load_audio(path, CFG), load_audio(path, CFG, official=True))


def test_sources_agree(parity_dir: Path) -> None:
    path = parity_dir / "inputs" / "aud_44k1_stereo_pcm16_5s.wav"
    by_path = load_audio(path, CFG)
    torch.testing.assert_close(load_audio(str(path), CFG), by_path, atol=0, rtol=0)
    torch.testing.assert_close(load_audio(path.read_bytes(), CFG), by_path, atol=0, rtol=0)
    samples, sr = sf.read(path, dtype="int16", always_2d=True)
    torch.testing.assert_close(load_audio((samples.T, sr), CFG), by_path, atol=0, rtol=0)


# --- the in-place mean subtraction (departure 1) --------------------------------------------


def test_default_mode_ignores_dc_offset_official_mode_does_not() -> None:
    # 3 s: clips [0, 2], [0.5, 2.5], [1, 3] overlap, so official mode puts a DC step in clips 2, 3.
    clean, offset = _signal(3.0), _signal(3.0, dc=0.25)
    default_gap = (load_audio((offset, SR), CFG) - load_audio((clean, SR), CFG)).abs().max()
    assert default_gap < 2e-3
    official = load_audio((offset, SR), CFG, official=True)
    assert (official - load_audio((clean, SR), CFG, official=True)).abs().max() > 0.1
    # The first clip is cut before any mutation: official and default agree there.
    torch.testing.assert_close(official[0], load_audio((offset, SR), CFG)[0])


def test_official_mode_does_not_mutate_the_callers_array() -> None:
    x = _signal(3.0, dc=0.25)
    before = x.copy()
    load_audio((x, SR), CFG, official=True)
    load_audio((torch.from_numpy(x), SR), CFG, official=True)
    np.testing.assert_array_equal(x, before)


# --- formats, channels, rates ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stereo() -> np.ndarray:
    x = _signal(2.5)
    return np.stack([x, 0.5 * x[::-1]])  # (2, N): different channels


@pytest.fixture(scope="module")
def reference(stereo: np.ndarray) -> torch.Tensor:
    return load_audio((stereo, SR), CFG)


def test_flac_is_lossless(stereo: np.ndarray) -> None:
    pcm = np.clip(np.round(stereo * 32768), -32768, 32767) / 32768  # what PCM16 holds
    flac = _encode_sf(stereo, SR, "FLAC", "PCM_16")
    wave, sr = read_audio(flac)
    assert sr == SR and wave.shape == stereo.shape
    np.testing.assert_array_equal(wave.numpy(), pcm.astype(np.float32))


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")], ids=["ogg", "mp3"]
)
def test_lossy_formats_decode_close(
    stereo: np.ndarray, reference: torch.Tensor, fmt: str, subtype: str
) -> None:
    got = load_audio(_encode_sf(stereo, SR, fmt, subtype), CFG)
    assert got.shape == SHAPE
    # Lossy codecs drop near-silent high bins; the bulk of the spectrogram stays put.
    assert (got - reference).abs().mean() < 0.15


def test_opus_at_48k(stereo: np.ndarray, reference: torch.Tensor) -> None:
    up = _resample.resample(torch.from_numpy(stereo), SR, 48000).numpy()
    wave, sr = read_audio(_encode_sf(up, 48000, "OGG", "OPUS"))
    assert sr == 48000 and wave.shape[0] == 2
    assert abs(wave.shape[1] - up.shape[1]) < 48000 * 0.03  # codec pre-skip/padding only


def test_aac_in_mp4_falls_back_to_pyav(stereo: np.ndarray) -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=SR, layout="stereo")
        frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
        frame.sample_rate = SR
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(sf.LibsndfileError):
        sf.info(io.BytesIO(buf.getvalue()))  # libsndfile cannot: the PyAV path is exercised
    wave, sr = read_audio(buf.getvalue())
    assert sr == SR and wave.shape[0] == 2
    assert wave.shape[1] >= stereo.shape[1]  # plus the encoder's priming samples
    assert load_audio(buf.getvalue(), CFG).shape == SHAPE


def test_only_first_channel_is_analysed(stereo: np.ndarray, reference: torch.Tensor) -> None:
    other = np.stack([stereo[0], _signal(2.5, seed=7)])
    # The second channel only moves the clip mean, which per-frame DC removal cancels.
    torch.testing.assert_close(load_audio((other, SR), CFG), reference, atol=2e-3, rtol=0)
    torch.testing.assert_close(load_audio((stereo[0], SR), CFG), reference, atol=2e-3, rtol=0)


def test_8k_input_is_resampled(parity_dir: Path) -> None:
    path = parity_dir / "inputs" / "aud_8k_mono_pcm16_0.5s.wav"
    samples, sr = sf.read(path, dtype="float32")
    assert sr == 8000
    got = load_audio((samples, sr), CFG)
    torch.testing.assert_close(got, load_audio(path, CFG), atol=0, rtol=0)
    # 0.5 s -> 8000 samples at 16 kHz -> 1 + (8000 - 400) // 160 = 48 frames, then padding.
    assert torch.all(got[..., 48:] == PADDED)
    assert not torch.any(got[..., 47] == PADDED)


# --- resampler ------------------------------------------------------------------------------


def test_resample_length_and_tone() -> None:
    t = np.arange(8000) / 8000
    tone = torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    up = _resample.resample(tone, 8000, 16000)
    assert up.shape == (16000,)
    t16 = torch.arange(16000, dtype=torch.float64) / 16000
    exact = torch.sin(2 * math.pi * 1000 * t16)
    assert (up[200:-200].double() - exact[200:-200]).abs().max() < 1e-3  # edges see the padding
    down = _resample.resample(torch.ones(2, 44101), 44100, 16000)
    assert down.shape == (2, math.ceil(16000 * 44101 / 44100))


def test_resample_phase_groups_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.from_numpy(_signal(0.05, sr=44056))  # gcd(44056, 16000) = 8: 2000 phases
    grouped = _resample.resample(x, 44056, 16000)
    monkeypatch.setattr(_resample, "_MAX_KERNEL_VALUES", 1 << 40)
    torch.testing.assert_close(grouped, _resample.resample(x, 44056, 16000), atol=1e-6, rtol=0)


# --- fbank ----------------------------------------------------------------------------------


def test_fbank_frames_and_silence() -> None:
    fb = waveform_to_fbank(torch.zeros(1, 32000), SR, CFG)
    assert fb.shape == (1 + (32000 - 400) // 160, CFG.audio_mel_bins)  # 198 frames
    torch.testing.assert_close(fb, torch.full_like(fb, LOG_EPS))


def test_fbank_puts_a_tone_in_the_right_bin() -> None:
    t = torch.arange(16000, dtype=torch.float32) / SR
    fb = waveform_to_fbank(torch.sin(2 * math.pi * 1000 * t), SR, CFG)
    mel = 1127 * np.log(1 + np.array([20.0, 1000.0, 8000.0]) / 700)
    expected_bin = (mel[1] - mel[0]) / ((mel[2] - mel[0]) / 129) - 1  # centre of bin b is b+1
    assert abs(int(fb.mean(0).argmax()) - expected_bin) <= 1


# --- short and bad input --------------------------------------------------------------------


def test_10ms_clip_is_padded_by_default_and_rejected_officially() -> None:
    x = _signal(0.01)  # 160 samples, under one 400-sample frame
    got = load_audio((x, SR), CFG)
    assert got.shape == SHAPE and torch.isfinite(got).all()
    assert torch.all(got[..., 1:] == PADDED) and not torch.any(got[..., 0] == PADDED)
    with pytest.raises(InvalidInput, match=r"too short.*160 samples.*at least 400"):
        load_audio((x, SR), CFG, official=True)


@pytest.mark.parametrize(
    "data",
    [b"definitely not audio", np.random.default_rng(0).bytes(4096), b"", b"RIFF\x00\x00"],
    ids=["text", "random", "empty", "truncated-riff"],
)
def test_garbage_bytes_are_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput, match=r"cannot decode audio.*accepted"):
        load_audio(data, CFG)


@pytest.mark.parametrize(
    "source",
    [
        (np.zeros(0, np.float32), SR),
        (np.full(1000, np.nan, np.float32), SR),
        (np.zeros((2, 3, 100), np.float32), SR),
        (np.zeros(1000, np.float32), 0),
        (np.zeros(1000, np.float32), 16000.0),
        (np.zeros(1000, np.uint8), SR),
    ],
    ids=["empty", "nan", "3d", "zero-rate", "float-rate", "uint8"],
)
def test_bad_arrays_are_invalid_input(source: tuple[np.ndarray, Any]) -> None:
    with pytest.raises(InvalidInput):
        load_audio(source, CFG)


def test_invalid_input_is_an_encoder_error_and_missing_file_is_not(tmp_path: Path) -> None:
    assert issubclass(InvalidInput, EncoderError) and issubclass(InvalidInput, ValueError)
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "missing.wav", CFG)
    with pytest.raises(TypeError):
        load_audio(12345, CFG)  # type: ignore[arg-type]
