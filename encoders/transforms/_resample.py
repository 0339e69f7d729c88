"""Band-limited resampling, numerically the same as torchaudio's default ``resample``.

torchaudio cannot be installed beside this CPU torch, so its default method is reimplemented
here from its documented algorithm: the rates are reduced by their gcd to ``orig`` and ``new``;
each of the ``new`` output phases gets its own FIR filter, a sinc low-pass at
``rolloff * min(orig, new)`` (in reduced units) that spans ``lowpass_filter_width`` zero
crossings on each side, tapered by a Hann window (cos² of the scaled time); the input is padded
with ``width`` zeros on the left and ``width + orig`` on the right, and one strided ``conv1d``
(stride ``orig``) computes every phase at once. The output keeps ``ceil(new * n / orig)``
samples.

The kernel is built in the waveform's dtype with the same sequence of float32 operations, so
results match torchaudio to the last bits (the parity tests measure how close).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resample"]

LOWPASS_FILTER_WIDTH = 6  # zero crossings of the sinc on each side (torchaudio's default)
ROLLOFF = 0.99  # cut-off as a fraction of the lower Nyquist rate (torchaudio's default)

# Above this many kernel values the output phases are filtered in groups. Odd rate pairs
# (e.g. 44056 -> 16000, gcd 8) need one filter per output phase, and building all of them at
# once would take gigabytes; grouping changes nothing but peak memory.
_MAX_KERNEL_VALUES = 1 << 22


def resample(wave: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """Resample (..., N) float audio from ``orig_sr`` to ``new_sr`` Hz: (..., ceil(N * new / orig)).

    Returns the input itself when the rates are equal, as torchaudio does.
    """
    if not wave.is_floating_point():
        raise TypeError(f"resample needs a floating-point waveform, got {wave.dtype}")
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    _, width = _cutoff_and_width(orig, new)

    shape = wave.shape
    flat = wave.reshape(-1, shape[-1])  # (W, N): every channel is filtered alike
    n = flat.shape[-1]
    padded = F.pad(flat, (width, width + orig))[:, None]  # (W, 1, N + 2*width + orig)
    group = max(1, _MAX_KERNEL_VALUES // (2 * width + orig))
    if group >= new:  # the usual case: one small kernel, kept for the next file
        parts = [F.conv1d(padded, _cached_kernel(orig, new, wave.dtype), stride=orig)]
    else:
        kernels = (
            _sinc_kernel(orig, new, p, min(p + group, new), wave.dtype)
            for p in range(0, new, group)
        )
        parts = [F.conv1d(padded, k, stride=orig) for k in kernels]  # each (W, phases, L)
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (W, new, L)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)  # (W, L*new): phases interleave in time
    target = math.ceil(new * n / orig)
    return out[:, :target].reshape(*shape[:-1], -1)


def _cutoff_and_width(orig: int, new: int) -> tuple[float, int]:
    """The cut-off (reduced-rate units) and each filter's half-length in input taps."""
    base = min(orig, new) * ROLLOFF
    return base, math.ceil(LOWPASS_FILTER_WIDTH * orig / base)


@lru_cache(maxsize=8)
def _cached_kernel(orig: int, new: int, dtype: torch.dtype) -> Tensor:
    # A normal tensor even when first built under inference_mode, so later callers can use it.
    with torch.inference_mode(False):
        return _sinc_kernel(orig, new, 0, new, dtype)


def _sinc_kernel(orig: int, new: int, first: int, stop: int, dtype: torch.dtype) -> Tensor:
    """FIR filters of output phases ``first..stop-1``: (stop - first, 1, 2*width + orig).

    Every step runs in ``dtype`` in torchaudio's order (divide, add, scale, clamp), since the
    float32 rounding of the tap times is part of what the reference computes.
    """
    base, width = _cutoff_and_width(orig, new)
    taps = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig  # (1, 1, K)
    phase = torch.arange(-first, -stop, -1, dtype=dtype)[:, None, None] / new  # (P, 1, 1)
    t = (phase + taps) * base  # (P, 1, K): tap time minus output time, in cut-off periods
    t = t.clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2  # Hann taper over +-width
    t = t * math.pi
    sinc = torch.where(t == 0, torch.tensor(1.0, dtype=dtype), t.sin() / t)
    return sinc * (window * (base / orig))  # gain base/orig keeps a unit DC response
