"""Audio -> (clips, 1, mel_bins, target_length) log-mel clips, as ImageBind's audio tower expects.

The official pipeline (``imagebind.data.load_and_transform_audio_data``), step by step:

1. decode to float32 channels-first (C, N); integer PCM is scaled to [-1, 1) (PCM16 / 32768);
2. resample every channel to ``cfg.audio_sample_rate`` with torchaudio's default windowed-sinc
   resampler (reimplemented in ``_resample``);
3. pick ``cfg.audio_clips`` equally spaced clips of ``cfg.audio_clip_duration`` seconds
   (``_clips``, exact fractions) and cut samples ``int(start * rate):int(end * rate)``,
   clamped at the end of the signal;
4. subtract each clip's mean (over all channels) *in place on the shared waveform*, clip by
   clip, so a later clip that overlaps an earlier one sees samples already shifted by the
   earlier clip's mean;
5. Kaldi-compatible log-mel filterbank of the first channel only (``waveform_to_fbank``);
6. transpose to (mel_bins, frames), zero-pad on the right or cut to ``cfg.audio_target_length``
   frames, then normalise ``(x - cfg.audio_mean) / cfg.audio_std`` (padding included).

With ``official=True`` all of this is reproduced, step 4's mutation included; see the parity
tests for how close it comes (the 16 kHz cases match to float32 rounding).

Departures from the official loader
-----------------------------------
Made by the default mode (``official=False``), and only these:

1. Each clip's mean is subtracted from its own copy, not in place on the shared waveform.
   The in-place version only differs where clips overlap (audio between one and
   ``clips * clip_duration`` seconds long): there the earlier clip's mean has already been
   removed from the overlap but not from the rest of the later clip, which puts a step into
   the later clip. With a DC offset that step leaks into the spectrum and changes the
   normalised features by more than 1.0 in the frames around it. A clip-wide constant is
   otherwise irrelevant (every frame has its own DC removed), so the copy gives the features
   of the audio as it is; embeddings of audio without a DC offset are unchanged.
2. A clip shorter than one 25 ms analysis window (400 samples at 16 kHz: audio shorter than
   that) is zero-padded at the end to one window, giving one frame of real content followed by
   the usual padding. The official loader divides by the frame count, 0, and crashes; with
   ``official=True`` such audio raises ``InvalidInput`` instead.

Both modes: sources are decoded with soundfile (WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, ...)
and, where it cannot, with PyAV (FFmpeg: AAC/M4A, WMA, the soundtrack of a video file, ...).
Lossy formats may therefore differ slightly from the official FFmpeg decode. Audio with no
samples, with non-finite samples (which the official loader turns into NaN features) or that
neither decoder reads raises ``InvalidInput``. The official "n_frames far from target_length"
log warning is not emitted.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PreprocessConfig
from ..formats import HEAD_BYTES, audio_demuxer
from ._clips import clip_spans
from ._resample import resample
from .errors import InvalidInput

__all__ = ["kaldi_fbank", "load_audio", "read_audio", "waveform_to_fbank"]

_ACCEPTED_TEXT = (
    "accepted: audio files readable by libsndfile (WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, ...) "
    "or FFmpeg (AAC/M4A, WMA, video soundtracks, ...)"
)

# Kaldi framing, fixed by the official loader (not part of the stored preprocessing config).
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
# log(max(energy, eps)): float32 machine epsilon, so digital silence gives log(eps) = -15.94.
_LOG_FLOOR = torch.finfo(torch.float32).eps

AudioSource = str | Path | bytes | tuple[np.ndarray | Tensor, int]


def load_audio(source: AudioSource, cfg: PreprocessConfig, official: bool = False) -> Tensor:
    """An audio file, its bytes, or ``(samples, rate)`` -> (clips, 1, mel_bins, target_length).

    Args:
        source: a path (str or Path), the encoded bytes, or a ``(samples, sample_rate)`` pair
            with samples float (or int16/int32 PCM) of shape (N,) or channels-first (C, N).
        official: reproduce the official loader (see the module docstring for what the
            default mode does differently).
    """
    wave, sr = read_audio(source)  # (C, N) float32
    rate = cfg.audio_sample_rate
    if sr != rate:
        wave = resample(wave, sr, rate)  # (C, ceil(N * rate / sr))
    window = _window_size(rate)
    # The official duration is a float (samples / rate); the sampler makes it exact.
    spans = clip_spans(wave.shape[1] / rate, cfg.audio_clip_duration, cfg.audio_clips)
    mels = []
    for span in spans:
        # Fraction * int -> exact; int() truncates, as the official slice bounds do.
        clip = wave[:, int(span.start * rate) : int(span.end * rate)]  # a view: (C, n)
        if official:
            clip -= clip.mean()  # mutates `wave`: later overlapping clips see the shift
        else:
            clip = clip - clip.mean()
        n = clip.shape[1]
        if n < window:
            if official:
                raise InvalidInput(
                    f"audio too short: a clip has {n} samples at {rate} Hz, the official "
                    f"loader needs at least {window} (one {FRAME_LENGTH_MS:g} ms frame); "
                    "the default mode zero-pads such audio"
                )
            clip = F.pad(clip, (0, window - n))
        fbank = waveform_to_fbank(clip, rate, cfg)  # (frames, mel_bins)
        mels.append(_fit_length(fbank.T, cfg.audio_target_length))  # (mel_bins, T)
    x = torch.stack(mels)[:, None]  # (clips, 1, mel_bins, T)
    # torchvision's Normalize: subtract then divide, by float32 constants.
    mean = torch.tensor(cfg.audio_mean, dtype=torch.float32)
    std = torch.tensor(cfg.audio_std, dtype=torch.float32)
    return (x - mean) / std


def waveform_to_fbank(wave: Tensor, sr: int, cfg: PreprocessConfig) -> Tensor:
    """Kaldi-compatible log-mel filterbank of the first channel: (frames, ``cfg.audio_mel_bins``).

    Same settings as the official loader's ``torchaudio.compliance.kaldi.fbank`` call: 25 ms
    frames every 10 ms with ``snip_edges`` (frames = 1 + (n - window) // shift), per-frame DC
    removal, pre-emphasis 0.97, symmetric Hann window, zero-padding to the next power of two,
    power spectrum, HTK-style mel filters from 20 Hz to sr / 2, natural log floored at float32
    epsilon; no dither, no energy term.

    Args:
        wave: (N,) or channels-first (C, N) float samples; channels after the first are ignored.
    """
    x = wave if wave.ndim == 1 else wave[0]  # (N,)
    x = x.to(torch.float32)
    size = _window_size(sr)
    if x.shape[0] < size:
        raise InvalidInput(
            f"audio too short for a filterbank: {x.shape[0]} samples, need at least {size} "
            f"(one {FRAME_LENGTH_MS:g} ms frame at {sr} Hz)"
        )
    return kaldi_fbank(x, sr, cfg.audio_mel_bins)


def kaldi_fbank(x: Tensor, sr: int, bins: int) -> Tensor:
    """The Kaldi filterbank of ``waveform_to_fbank`` on float32 rows: (..., N) -> (..., M, bins).

    No checks: every row must hold at least one frame. The demo world calls it on a batch.
    """
    size, shift = _window_size(sr), int(sr * FRAME_SHIFT_MS * 0.001)
    frames = x.unfold(-1, size, shift)  # (..., M, size), M = 1 + (N - size) // shift
    frames = frames - frames.mean(dim=-1, keepdim=True)  # per-frame DC removal
    # Pre-emphasis inside each frame; the first sample is its own predecessor (Kaldi).
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # (..., M, size)
    frames = frames - PREEMPHASIS * previous
    frames = frames * torch.hann_window(size, periodic=False, dtype=torch.float32)
    n_fft = 1 << (size - 1).bit_length()  # next power of two: 400 -> 512
    frames = F.pad(frames, (0, n_fft - size))  # (..., M, n_fft)
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (..., M, n_fft // 2 + 1)
    banks = _mel_banks(bins, n_fft, float(sr))  # (bins, n_fft // 2 + 1)
    mel = torch.matmul(power, banks.T)  # (..., M, bins); 2-D: the same kernel as torch.mm
    return mel.clamp_min(_LOG_FLOOR).log()


def read_audio(source: AudioSource) -> tuple[Tensor, int]:
    """Decode a source to float32 channels-first samples (C, N) and its sample rate."""
    if isinstance(source, tuple):
        return _from_array(source)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        wave, sr = _decode(lambda: io.BytesIO(data))
    elif isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():  # a missing file is the caller's error, not bad input
            raise FileNotFoundError(f"no such audio file: {path}")
        wave, sr = _decode(lambda: str(path))
    else:
        raise TypeError(
            "audio source must be a path, bytes or a (samples, sample_rate) tuple, "
            f"got {type(source).__name__}"
        )
    return _checked(wave, sr)


def _window_size(sr: int) -> int:
    return int(sr * FRAME_LENGTH_MS * 0.001)  # 400 at 16 kHz


def _fit_length(mel: Tensor, target: int) -> Tensor:
    """(bins, frames) -> (bins, target): zero-pad on the right (before normalisation) or cut."""
    frames = mel.shape[1]
    if frames < target:
        return F.pad(mel, (0, target - frames))
    return mel[:, :target]


@lru_cache(maxsize=8)
def _mel_banks(bins: int, n_fft: int, sr: float) -> Tensor:
    """Kaldi's triangular mel filters, (bins, n_fft // 2 + 1); the Nyquist bin gets weight 0.

    Built in float32 in the same order as torchaudio's ``kaldi.get_mel_banks`` (HTK mel scale
    1127 ln(1 + f/700), triangles spaced evenly in mel between 20 Hz and sr / 2, evaluated at
    the FFT bin frequencies), because the float32 rounding of the edges is part of the result.
    """
    with torch.inference_mode(False):  # cached: must stay usable outside inference_mode
        return _build_mel_banks(bins, n_fft, sr)


def _build_mel_banks(bins: int, n_fft: int, sr: float) -> Tensor:
    high = 0.5 * sr
    low_mel, high_mel = _mel(LOW_FREQ_HZ), _mel(high)
    delta = (high_mel - low_mel) / (bins + 1)
    b = torch.arange(bins)[:, None]  # (bins, 1)
    left = low_mel + b * delta
    centre = low_mel + (b + 1.0) * delta
    right = low_mel + (b + 2.0) * delta
    freqs = (sr / n_fft) * torch.arange(n_fft // 2, dtype=torch.float32)  # (n_fft/2,)
    mel = (1127.0 * (1.0 + freqs / 700.0).log())[None]  # (1, n_fft/2)
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    banks = torch.clamp_min(torch.minimum(up, down), 0.0)  # (bins, n_fft/2)
    return F.pad(banks, (0, 1))  # the Nyquist bin is outside every triangle


def _mel(freq: float) -> float:
    return 1127.0 * math.log(1.0 + freq / 700.0)


# --- decoding -------------------------------------------------------------------------------


def _decode(opener: Callable[[], Any]) -> tuple[np.ndarray, int]:
    """soundfile first (exact for PCM formats), then PyAV for what libsndfile cannot read."""
    import soundfile as sf

    try:
        data, sr = sf.read(opener(), dtype="float32", always_2d=True)  # (N, C)
        return np.ascontiguousarray(data.T), int(sr)
    except (sf.LibsndfileError, sf.SoundFileError, RuntimeError, TypeError, ValueError):
        pass  # not a libsndfile format (or a broken file): let FFmpeg try
    try:
        return _decode_av(opener())
    except InvalidInput as e:
        # The caller names the file (embed, the index, an upload): the path is not repeated here.
        raise InvalidInput(f"cannot decode audio: {e}; {_ACCEPTED_TEXT}") from None


# PyAV sample formats -> the divisor that maps integer PCM to [-1, 1) and the zero offset.
_PCM_SCALE = {"s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _decode_av(file: Any) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg: (C, N) float32 and the rate."""
    import av

    # Paths are opened here, not by FFmpeg, so a path is never read as a URL or protocol.
    fp = open(file, "rb") if isinstance(file, str) else file
    try:
        fmt = audio_demuxer(fp.read(HEAD_BYTES))
        fp.seek(0)
        if fmt is None:
            raise InvalidInput("not a recognised audio container")
        with av.open(fp, mode="r", format=fmt) as container:
            if not container.streams.audio:
                raise InvalidInput("no audio stream")
            stream = container.streams.audio[0]
            chunks: list[np.ndarray] = []
            rate = channels = 0
            for frame in container.decode(stream):
                c = len(frame.layout.channels)
                if not chunks:
                    rate, channels = frame.sample_rate, c
                elif (frame.sample_rate, c) != (rate, channels):
                    raise InvalidInput("sample rate or channel count changes mid-stream")
                chunks.append(_frame_to_float(frame, c))
    except av.FFmpegError as e:
        raise InvalidInput(f"FFmpeg: {getattr(e, 'strerror', None) or e}") from None
    finally:
        fp.close()
    if not chunks:
        raise InvalidInput("no audio samples")
    return np.concatenate(chunks, axis=1), int(rate)


def _frame_to_float(frame: Any, channels: int) -> np.ndarray:
    """One decoded frame -> (C, n) float32, integer PCM scaled as the official loader does."""
    fmt = frame.format
    arr: np.ndarray = frame.to_ndarray()
    if not fmt.is_planar:  # packed: (1, n * C) interleaved
        arr = arr.reshape(-1, channels).T
    base = fmt.name.rstrip("p")
    if base in _PCM_SCALE:
        return (arr.astype(np.float64) / _PCM_SCALE[base]).astype(np.float32)
    if base == "u8":
        return ((arr.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if base in ("flt", "dbl"):
        return arr.astype(np.float32)
    raise InvalidInput(f"unsupported sample format {fmt.name}")


def _from_array(source: tuple[Any, ...]) -> tuple[Tensor, int]:
    if len(source) != 2:
        raise InvalidInput("an audio tuple must be (samples, sample_rate)")
    samples, sr = source
    arr = samples.detach().cpu().numpy() if isinstance(samples, Tensor) else np.asarray(samples)
    if isinstance(sr, bool) or not isinstance(sr, int | np.integer):
        raise InvalidInput(f"sample_rate must be an int, got {sr!r}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise InvalidInput(f"samples must be (N,) or channels-first (C, N), got {arr.shape}")
    if arr.dtype == np.int16:
        arr = arr / np.float32(32768.0)
    elif arr.dtype == np.int32:
        arr = (arr / 2147483648.0).astype(np.float32)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInput(f"samples must be float, int16 or int32, got {arr.dtype}")
    # Always a private copy: official mode mutates the waveform in place, and the caller's
    # array must not change.
    return _checked(np.array(arr, dtype=np.float32, copy=True), int(sr))


def _checked(arr: np.ndarray, sr: int) -> tuple[Tensor, int]:
    """Validate decoded samples and hand them over as a float32 (C, N) tensor.

    Messages do not name the source: the caller does (embed, the index, an upload).
    """
    if sr <= 0:
        raise InvalidInput(f"the sample rate must be positive, got {sr}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInput(f"the audio has no samples (shape {arr.shape})")
    wave = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(wave).all():
        raise InvalidInput("the audio has NaN or infinite samples")
    return wave, sr
