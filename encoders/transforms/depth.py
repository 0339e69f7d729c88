"""Depth maps -> (1, S, S) float32 disparity tensors for ImageBind's depth tower.

The official ImageBind code ships no depth loader. The paper trains the depth tower on
SUN RGB-D "following Omnivore", converting depth to disparity; this module reproduces that
pipeline from what the Omnivore and ImageBind maintainers published (docs/modalities.md has
the sources and the reasoning):

1. Read the map as metric depth ``Z`` (metres), or as disparity directly.
2. Disparity, as in the conversion an Omnivore/ImageBind author posted (omnivore#12)::

       D = f * b / clip(k * Z, 0.01, 50)        f: focal length (px), b: stereo baseline (m)

   ``k = 8`` (``match_training_scale=True``, the default): that conversion read SUN RGB-D's
   PNGs as millimetres, but they hold millimetres rotated left by 3 bits (about 8 x mm), so
   the training disparities were 1/8 of the physical ones. Omnivore's disparity statistics
   (mean 0.0418, std 0.0295 after /75) match that scale, not the physical one (about 0.3).
   ``k = 1`` gives physically correct disparity.
3. Omnivore's ``DepthNorm``: clamp D to [0.01, 75], divide by 75.
4. Resize the short side to S (bilinear, antialiased), centre crop S x S.
5. ``(x - 0.0418) / 0.0295`` (Omnivore's depth-channel mean/std).

Invalid pixels (0, negative, NaN, inf: "no measurement") get disparity 0, i.e. "far away",
which step 3 maps to the minimum. ``f`` is expressed at 640 px across the long side (the
SUN RGB-D/Kinect resolution the model saw; resizing never rescaled the disparity values), i.e.
``f = focal_px * 640 / long_side``. Without ``focal_px`` we assume a Kinect-like field of view,
f = 518.86 px at 640 px (NYU v2 / SUN RGB-D kv1); without ``baseline_m``, the Kinect baseline
0.075 m.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import PreprocessConfig
from . import _arrays
from .errors import InvalidInput

__all__ = ["DepthUnits", "depth_to_disparity", "load_depth", "normalise_disparity"]

DepthUnits = Literal["auto", "mm", "m", "sunrgbd", "disparity"]

# Camera assumed when the caller gives none: Kinect v1 as in NYU Depth v2 / SUN RGB-D "kv1".
KINECT_FOCAL_PX = 518.857901  # fx at 640 x 480
KINECT_WIDTH_PX = 640
KINECT_BASELINE_M = 0.075  # omnivore#12: kv1, kv2 0.075 m; realsense, xtion 0.095 m
# omnivore#12: depth clipped to [0.01, 50] m before inverting.
MIN_DEPTH_M, MAX_DEPTH_M = 0.01, 50.0
# Omnivore DepthNorm(max_depth=75, clamp_max_before_scale=True), then Normalize(0.0418, 0.0295).
DISPARITY_MIN, DISPARITY_MAX = 0.01, 75.0
DISPARITY_MEAN, DISPARITY_STD = 0.0418, 0.0295
# SUN RGB-D PNGs store mm rotated left by 3 bits; read as mm they are ~8x too deep.
TRAINING_DEPTH_FACTOR = 8.0
# Above this a float map "in metres" is almost surely millimetres (auto mode refuses it).
_IMPLAUSIBLE_MEDIAN_M = 200.0

_ACCEPTED = (
    "accepted: 16-bit greyscale PNG (mm), 8-bit greyscale PNG (disparity), "
    ".npy float (m) or integer (mm) of shape (H, W)"
)


def load_depth(
    source: str | Path | bytes | np.ndarray,
    cfg: PreprocessConfig,
    *,
    units: DepthUnits = "auto",
    focal_px: float | None = None,
    baseline_m: float | None = None,
    disparity_scale: float | None = None,
    match_training_scale: bool = True,
    official: bool = False,
) -> torch.Tensor:
    """A depth map (file, bytes or array) -> (1, S, S) float32, S = ``cfg.depth_size``.

    Args:
        source: a path, the file's bytes (PNG or ``.npy``, recognised by content), or an
            (H, W) array.
        units: what the values are. ``auto``: uint16 -> ``mm``, float -> ``m``, uint8 ->
            ``disparity``. ``sunrgbd``: SUN RGB-D toolbox PNGs (mm rotated left by 3 bits).
            ``disparity``: inverse depth (e.g. a MiDaS/DPT map saved as 8-bit), 0 = invalid.
        focal_px: focal length in pixels of the map as given (before resizing); rescaled to
            a 640-px long side. Default: a Kinect-like field of view (518.86 px at 640 px).
        baseline_m: stereo baseline in metres (default 0.075, Kinect).
        disparity_scale: for ``units="disparity"``: pixels of stereo disparity per unit of
            the stored value. Default: relative disparity, scaled so that its median lands on
            the training mean.
        match_training_scale: divide disparity by 8 as the training data did (see module
            docstring); False for physically correct disparity.
        official: accepted for the common loader signature; there is no official depth
            loader, so both modes are the same.
    """
    del official  # no official loader exists to reproduce
    arr = _read_depth_array(source)
    if units == "auto":
        units = _auto_units(arr)
    disparity = depth_to_disparity(
        arr,
        units,
        focal_px=focal_px,
        baseline_m=baseline_m,
        disparity_scale=disparity_scale,
        match_training_scale=match_training_scale,
    )
    return normalise_disparity(disparity, cfg.depth_size)


def depth_to_disparity(
    arr: np.ndarray,
    units: Literal["mm", "m", "sunrgbd", "disparity"],
    *,
    focal_px: float | None = None,
    baseline_m: float | None = None,
    disparity_scale: float | None = None,
    match_training_scale: bool = True,
) -> np.ndarray:
    """(H, W) depth or disparity values -> (H, W) float32 disparity in the training convention.

    Invalid pixels (non-finite, <= 0) become 0. Raises ``InvalidInput`` when none is valid.
    """
    if units not in ("mm", "m", "sunrgbd", "disparity"):
        raise ValueError(
            f"unknown depth units {units!r}; accepted: auto, mm, m, sunrgbd, disparity"
        )
    for name, value in (
        ("focal_px", focal_px),
        ("baseline_m", baseline_m),
        ("disparity_scale", disparity_scale),
    ):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value}")
    if arr.dtype == np.bool_:
        raise InvalidInput(f"depth: a boolean mask is not a depth map; {_ACCEPTED}")
    if units == "sunrgbd":
        if arr.dtype.kind not in "ui":
            raise InvalidInput(f"depth: units 'sunrgbd' needs integer pixels, got {arr.dtype}")
        raw = arr.astype(np.uint16)
        arr = (raw >> 3) | (raw << 13)  # undo the toolbox's 3-bit left rotation -> mm
        units = "mm"
    values = arr.astype(np.float64)
    valid = np.isfinite(values) & (values > 0)
    if not valid.any():
        raise InvalidInput(f"depth: no valid pixels (all are 0, negative, NaN or inf); {_ACCEPTED}")
    k = TRAINING_DEPTH_FACTOR if match_training_scale else 1.0
    out = np.zeros(values.shape, np.float64)
    if units == "disparity":
        if disparity_scale is not None:
            out[valid] = values[valid] * disparity_scale / k
        else:
            # Relative inverse depth has no scale: put its median on the training mean.
            out[valid] = values[valid] * (DISPARITY_MEAN * DISPARITY_MAX / np.median(values[valid]))
        return out.astype(np.float32)
    depth_m = values * (1e-3 if units == "mm" else 1.0)
    # Focal length at the training resolution: the resize to S never rescaled disparity
    # values, so the model saw disparities of ~640-px-wide maps. Expressing f at 640 px makes
    # the input depend on the field of view only, not on the map's pixel count.
    long_side = max(arr.shape)
    f = KINECT_FOCAL_PX if focal_px is None else focal_px * KINECT_WIDTH_PX / long_side
    b = baseline_m if baseline_m is not None else KINECT_BASELINE_M
    out[valid] = f * b / np.clip(k * depth_m[valid], MIN_DEPTH_M, MAX_DEPTH_M)
    return out.astype(np.float32)


def normalise_disparity(disparity: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) training-convention disparity -> (1, S, S) model input (DepthNorm, resize, z-score).

    Resizing is linear with weights summing to one, so z-scoring after it equals z-scoring
    before; the clamp comes first, as in Omnivore's pipeline.
    """
    x = np.clip(disparity, DISPARITY_MIN, DISPARITY_MAX) / DISPARITY_MAX
    t = _arrays.resize_short_crop(x.astype(np.float32), size, "bilinear")  # (1, S, S)
    # Antialiased bilinear never leaves the input range; clamp guards float rounding only.
    t = t.clamp(DISPARITY_MIN / DISPARITY_MAX, 1.0)
    return t.sub(DISPARITY_MEAN).div(DISPARITY_STD).contiguous()


def _read_depth_array(source: str | Path | bytes | np.ndarray) -> np.ndarray:
    if isinstance(source, np.ndarray) and (
        source.dtype.hasobject or source.dtype.kind not in "buif"
    ):
        raise InvalidInput(f"depth: array dtype {source.dtype} is not numeric; {_ACCEPTED}")
    return _arrays.read_map(
        source,
        "depth",
        _ACCEPTED,
        "an RGB photo or a colour-mapped depth rendering, which cannot be inverted",
    )


def _auto_units(arr: np.ndarray) -> Literal["mm", "m", "disparity"]:
    if arr.dtype == np.uint8:
        return "disparity"
    if arr.dtype.kind in "ui":
        return "mm"
    if arr.dtype.kind == "f":
        finite = arr[np.isfinite(arr) & (arr > 0)]
        if finite.size and float(np.median(finite)) > _IMPLAUSIBLE_MEDIAN_M:
            raise InvalidInput(
                f"depth: float map with median {float(np.median(finite)):.0f} is implausible in "
                "metres; pass units='mm' (or 'disparity') to say what it holds"
            )
        return "m"
    raise InvalidInput(f"depth: dtype {arr.dtype} has no default units; {_ACCEPTED}")
