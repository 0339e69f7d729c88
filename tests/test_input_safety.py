"""Hostile inputs: playlists that would make FFmpeg open other files, and the input limits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from encoders import InputLimits, InvalidInput, PreprocessConfig, preprocess
from encoders.transforms.audio import load_audio

CFG = PreprocessConfig()


def _wav_bytes(seconds: float, sr: int = 8000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), np.float32), sr, format="WAV")
    return buf.getvalue()


@pytest.mark.parametrize("as_path", [False, True])
def test_hls_playlist_is_not_followed(tmp_path: Path, as_path: bool) -> None:
    secret = tmp_path / "secret.wav"
    secret.write_bytes(_wav_bytes(1.0))
    playlist = (
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{secret}\n#EXT-X-ENDLIST\n"
    ).encode()
    source: bytes | str = playlist
    if as_path:
        p = tmp_path / "list.m3u8"
        p.write_bytes(playlist)
        source = str(p)
    with pytest.raises(InvalidInput, match="cannot decode audio"):
        load_audio(source, CFG)


def test_audio_duration_limit_before_decoding() -> None:
    limits = InputLimits(max_audio_seconds=2.0)
    with pytest.raises(InvalidInput, match=r"3 s of audio is over the limit of 2 s"):
        preprocess("audio", [_wav_bytes(3.0)], CFG, limits=limits)
    assert preprocess("audio", [_wav_bytes(1.0)], CFG, limits=limits).shape == (1, 3, 1, 128, 204)


def test_pixel_limit_before_decoding() -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG")
    with pytest.raises(InvalidInput, match="90000 pixels is over the limit of 50000"):
        preprocess("vision", [buf.getvalue()], CFG, limits=InputLimits(max_pixels=50_000))


def test_text_and_byte_limits(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="has 30 characters; the limit is 10"):
        preprocess("text", ["x" * 30], CFG, limits=InputLimits(max_text_chars=10))
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * 200)
    with pytest.raises(InvalidInput, match=r"big\.png: 204 bytes is over the limit of 100"):
        preprocess("vision", [str(big)], CFG, limits=InputLimits(max_bytes=100))
    with pytest.raises(InvalidInput, match="no such file"):
        preprocess("vision", [str(tmp_path / "missing.png")], CFG)
