"""Thermal frames -> (1, S, S) float32 tensors for ImageBind's thermal tower.

The official ImageBind code ships no thermal loader. The tower was trained on LLVIP, whose
infrared frames are 8-bit greyscale images (the camera's own contrast mapping applied), as a
one-channel image. Our pipeline (docs/modalities.md has the sources and the reasoning):

1. Intensities to [0, 1]:
   - 8-bit: ``v / 255``, exactly as an 8-bit LLVIP frame would be read.
   - 16-bit (raw radiometric counts) and float (e.g. temperatures): no fixed scale exists,
     so a per-frame robust stretch, ``(v - p1) / (p99 - p1)`` clipped to [0, 1], with p1/p99
     the 1st/99th percentiles: what a thermal camera's automatic gain control does when it
     writes 8-bit frames like LLVIP's. Floats already within [0, 1] are used as they are.
2. Resize the short side to S (bicubic, antialiased, as for images), centre crop S x S,
   clamp to [0, 1].
3. ``(x - mean) / std`` with mean 0, std 1 by default: no normalisation, the choice that a
   user measured closest to the paper's LLVIP numbers (ImageBind PR #73); both can be set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import PreprocessConfig
from . import _arrays
from .errors import InvalidInput

__all__ = ["ThermalScaling", "load_thermal", "thermal_to_unit"]

ThermalScaling = Literal["auto", "fixed", "stretch"]

DEFAULT_PERCENTILES = (1.0, 99.0)

_ACCEPTED = "accepted: 8- or 16-bit greyscale PNG, or .npy of shape (H, W) (uint8, uint16 or float)"


def load_thermal(
    source: str | Path | bytes | np.ndarray,
    cfg: PreprocessConfig,
    *,
    scaling: ThermalScaling = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    mean: float = 0.0,
    std: float = 1.0,
    official: bool = False,
) -> torch.Tensor:
    """A thermal frame (file, bytes or array) -> (1, S, S) float32, S = ``cfg.thermal_size``.

    Args:
        source: a path, the file's bytes (PNG or ``.npy``, recognised by content), or an
            (H, W) array.
        scaling: ``auto`` (8-bit fixed, 16-bit stretched, float fixed when within [0, 1] and
            stretched otherwise), ``fixed`` (uint8 / 255, uint16 / 65535, float must be within
            [0, 1]) or ``stretch`` (per-frame percentile stretch for every input).
        percentiles: the low/high percentiles mapped to 0 and 1 by the stretch.
        mean, std: applied last, ``(x - mean) / std``.
        official: accepted for the common loader signature; there is no official thermal
            loader, so both modes are the same.
    """
    del official  # no official loader exists to reproduce
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    arr = _read_thermal_array(source)
    unit = thermal_to_unit(arr, scaling=scaling, percentiles=percentiles)
    t = _arrays.resize_short_crop(unit, cfg.thermal_size, "bicubic").clamp(0.0, 1.0)
    return t.sub(mean).div(std).contiguous()  # (1, S, S)


def thermal_to_unit(
    arr: np.ndarray,
    *,
    scaling: ThermalScaling = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """(H, W) thermal intensities -> (H, W) float32 in [0, 1] (see ``load_thermal``)."""
    if scaling not in ("auto", "fixed", "stretch"):
        raise ValueError(f"unknown thermal scaling {scaling!r}; accepted: auto, fixed, stretch")
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if arr.dtype == np.bool_ or arr.dtype.kind not in "uif":
        raise InvalidInput(f"thermal: dtype {arr.dtype} is not an intensity; {_ACCEPTED}")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInput(f"thermal: the frame contains NaN or inf values; {_ACCEPTED}")
    if scaling == "stretch":
        return _stretch(values, lo_p, hi_p)
    if arr.dtype == np.uint8:
        return (values / 255.0).astype(np.float32)
    if arr.dtype.kind == "f" and values.min() >= 0.0 and values.max() <= 1.0:
        return values.astype(np.float32)
    if scaling == "auto":
        return _stretch(values, lo_p, hi_p)
    if arr.dtype == np.uint16:
        return (values / 65535.0).astype(np.float32)
    raise InvalidInput(
        f"thermal: scaling 'fixed' takes uint8, uint16 or float within [0, 1], got {arr.dtype} "
        f"in [{values.min():g}, {values.max():g}]; use scaling='stretch'"
    )


def _stretch(values: np.ndarray, lo_p: float, hi_p: float) -> np.ndarray:
    lo, hi = np.percentile(values, [lo_p, hi_p])
    if hi <= lo:
        # A uniform frame has no contrast to stretch: mid-grey, not a division by zero.
        return np.full(values.shape, 0.5, np.float32)
    out: np.ndarray = np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return out


def _read_thermal_array(source: str | Path | bytes | np.ndarray) -> np.ndarray:
    return _arrays.read_map(
        source,
        "thermal",
        _ACCEPTED,
        "a photo or a false-colour thermal rendering, whose palette cannot be inverted",
    )
