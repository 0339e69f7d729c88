"""IMU traces -> (6, N) float32 tensors for ImageBind's IMU tower (N = ``cfg.imu_samples``).

The official ImageBind code ships no IMU loader; its IMU stem takes 6 channels x 2000 samples.
The paper: accelerometer and gyroscope, X/Y/Z, from Ego4D. Our pipeline (docs/modalities.md
has the sources and the reasoning):

1. Read (T, 6) / (6, T) ``.npy`` (optionally a 7th leading time column) or CSV with or without
   a header. Channel order: accelerometer x, y, z, then gyroscope x, y, z. A header is matched
   by name (``ax``/``acc_x``/``accl_x``..., ``gx``/``gyro_x``..., ``t``/``time``/
   ``*timestamp*``), so Ego4D's CSVs (gyro columns first) load as they are.
2. Units to m/s^2 and rad/s (``accel_units="g"``, ``gyro_units="deg/s"`` convert).
3. Resample (linear interpolation on the timestamps, or on ``rate_hz``) to the model rate,
   ``N / window_s`` = 200 Hz for a 10 s window by default; take the centred window of N
   samples, or pad a shorter trace by repeating its first/last sample on each side.
4. No further normalisation: values stay in SI units.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import PreprocessConfig
from ..formats import HEAD_BYTES, content_format, describe
from . import _arrays
from .errors import InvalidInput

__all__ = ["DEFAULT_RATE_HZ", "ImuLayout", "TimeUnits", "load_imu", "parse_imu_csv", "resample_imu"]

ImuLayout = Literal["auto", "tc", "ct"]
TimeUnits = Literal["auto", "s", "ms", "us", "ns"]
AccelUnits = Literal["m/s2", "g"]
GyroUnits = Literal["rad/s", "deg/s"]

# Assumed model rate: Ego4D's IMU streams run at about 200 Hz, so 2000 samples span 10 s.
DEFAULT_RATE_HZ = 200.0
STANDARD_GRAVITY = 9.80665  # m/s^2 per g
MAX_ROWS = 1_000_000  # 83 min at 200 Hz: far beyond the window, still bounded
MIN_SAMPLES = 2

_TIME_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
# Plausible sampling rates for auto-detecting time units: the ranges of dt per unit are
# disjoint (s: 0.2 ms..0.1 s; ms: 0.2..100; us: 200..1e5; ns: 2e5..1e8).
_MIN_RATE_HZ, _MAX_RATE_HZ = 10.0, 5000.0

_ACCEPTED = (
    "accepted: .npy of shape (T, 6) or (6, T) (accel xyz, gyro xyz; (T, 7) with a leading time "
    "column), or CSV with columns [t,] ax, ay, az, gx, gy, gz, with or without a header"
)
_NULLS = frozenset({"", "nan", "null", "none", "na"})


def load_imu(
    source: str | Path | bytes | np.ndarray,
    cfg: PreprocessConfig,
    *,
    rate_hz: float | None = None,
    layout: ImuLayout = "auto",
    accel_units: AccelUnits = "m/s2",
    gyro_units: GyroUnits = "rad/s",
    time_units: TimeUnits = "auto",
    window_s: float | None = None,
    official: bool = False,
) -> torch.Tensor:
    """An IMU trace (file, bytes or array) -> (6, ``cfg.imu_samples``) float32.

    Args:
        source: a path, the file's bytes (``.npy`` or CSV, recognised by content), or an array.
        rate_hz: the input's sampling rate. When given it wins over any time column; without
            it the time column decides, and without either the input is assumed to be at the
            model rate already.
        layout: ``tc`` (T, C), ``ct`` (C, T), or ``auto`` (the axis of size 6 or 7).
        accel_units, gyro_units: the input's units; converted to m/s^2 and rad/s.
        time_units: units of the time column (``auto`` infers them from header names, then
            from the typical sample spacing).
        window_s: seconds the model's samples span (default: samples / 200 Hz = 10 s).
        official: accepted for the common loader signature; there is no official IMU loader.
    """
    del official  # no official loader exists to reproduce
    samples = cfg.imu_samples
    if cfg.imu_channels != 6:
        raise ValueError(f"this loader produces 6 channels, the config wants {cfg.imu_channels}")
    window = window_s if window_s is not None else samples / DEFAULT_RATE_HZ
    if not (math.isfinite(window) and window > 0):
        raise ValueError(f"window_s must be a positive number, got {window_s}")
    if rate_hz is not None and not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a positive number, got {rate_hz}")
    if accel_units not in ("m/s2", "g") or gyro_units not in ("rad/s", "deg/s"):
        raise ValueError(
            f"units {accel_units!r}/{gyro_units!r}; accepted: accel 'm/s2' or 'g', "
            "gyro 'rad/s' or 'deg/s'"
        )

    values, times, unit_hint = _read(source, layout)  # (T, 6), (T,) or None
    if not np.isfinite(values).all():
        raise InvalidInput(f"imu: the trace contains NaN or inf values; {_ACCEPTED}")
    if accel_units == "g":
        values[:, :3] *= STANDARD_GRAVITY
    if gyro_units == "deg/s":
        values[:, 3:] *= math.pi / 180.0

    if rate_hz is not None or times is None:
        t_s = np.arange(len(values)) / (rate_hz if rate_hz is not None else samples / window)
    else:
        units = time_units if time_units != "auto" else unit_hint
        t_s = _times_to_seconds(times, units)
    return resample_imu(values, t_s, samples=samples, rate_hz=samples / window)


def resample_imu(
    values: np.ndarray, t_s: np.ndarray, *, samples: int, rate_hz: float
) -> torch.Tensor:
    """(T, 6) samples at times ``t_s`` (s) -> (6, samples) at ``rate_hz``, centred.

    Longer traces give their centred window; shorter ones are padded at both ends with their
    first/last sample (a held pose, not a jump to zero that would read as a jolt).
    """
    if len(t_s) < MIN_SAMPLES:
        raise InvalidInput(f"imu: {len(t_s)} sample(s); at least {MIN_SAMPLES} are needed")
    order = np.argsort(t_s, kind="stable")  # Ego4D warns timestamps can be non-monotonic
    t_s, values = t_s[order], values[order]
    keep = np.concatenate([[True], np.diff(t_s) > 0])  # drop repeated timestamps
    t_s, values = t_s[keep], values[keep]
    if len(t_s) < MIN_SAMPLES:
        raise InvalidInput(
            f"imu: {len(t_s)} distinct sample time(s); at least {MIN_SAMPLES} are needed"
        )
    duration = float(t_s[-1] - t_s[0])
    span = (samples - 1) / rate_hz
    if duration >= span:
        grid = t_s[0] + (duration - span) / 2 + np.arange(samples) / rate_hz
        pad_before = 0
    else:
        n = math.floor(duration * rate_hz + 1e-9) + 1
        grid = t_s[0] + (duration - (n - 1) / rate_hz) / 2 + np.arange(n) / rate_hz
        pad_before = (samples - n) // 2
    out = np.stack([np.interp(grid, t_s, values[:, c]) for c in range(6)])  # (6, n)
    if out.shape[1] < samples:
        out = np.pad(out, ((0, 0), (pad_before, samples - out.shape[1] - pad_before)), mode="edge")
    return torch.from_numpy(out.astype(np.float32))  # (6, samples)


# ----------------------------------------------------------------------------- reading


def _read(
    source: str | Path | bytes | np.ndarray, layout: ImuLayout
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """-> (T, 6) float64 values, optional (T,) raw times, a time-unit hint ('auto' if none)."""
    if layout not in ("auto", "tc", "ct"):
        raise ValueError(f"unknown IMU layout {layout!r}; accepted: auto, tc, ct")
    if isinstance(source, np.ndarray):
        return (*_from_array(source, layout), "auto")
    data = _arrays.read_bytes(source, "imu")
    kind = content_format(data[:HEAD_BYTES])
    if kind == "npy":
        return (*_from_array(_arrays.read_npy(data, "imu"), layout), "auto")
    if kind == "text":
        return parse_imu_csv(data)
    raise InvalidInput(f"imu: got {describe(data[:HEAD_BYTES])}; {_ACCEPTED}")


def _from_array(arr: np.ndarray, layout: ImuLayout) -> tuple[np.ndarray, np.ndarray | None]:
    if arr.dtype == np.bool_ or arr.dtype.hasobject or arr.dtype.kind not in "uif":
        raise InvalidInput(f"imu: array dtype {arr.dtype} is not numeric; {_ACCEPTED}")
    if arr.ndim != 2:
        raise InvalidInput(f"imu: array shape {arr.shape} is not 2-D; {_ACCEPTED}")
    if layout == "auto":
        rows_ok, cols_ok = arr.shape[0] in (6, 7), arr.shape[1] in (6, 7)
        if cols_ok and rows_ok:
            raise InvalidInput(
                f"imu: shape {arr.shape} is ambiguous (and too short); pass layout='tc' or 'ct'"
            )
        if not (rows_ok or cols_ok):
            raise InvalidInput(f"imu: shape {arr.shape} has no axis of 6 or 7; {_ACCEPTED}")
        layout = "tc" if cols_ok else "ct"
    x = arr if layout == "tc" else arr.T  # (T, C)
    if x.shape[1] not in (6, 7):
        raise InvalidInput(f"imu: {x.shape[1]} channels with layout {layout!r}; {_ACCEPTED}")
    if x.shape[0] > MAX_ROWS:
        raise InvalidInput(f"imu: {x.shape[0]} samples, over the limit of {MAX_ROWS}")
    x = x.astype(np.float64)
    if x.shape[1] == 7:
        return np.ascontiguousarray(x[:, 1:]), np.ascontiguousarray(x[:, 0])
    return np.ascontiguousarray(x), None


def parse_imu_csv(data: bytes) -> tuple[np.ndarray, np.ndarray | None, str]:
    """CSV bytes -> ((T, 6) values, (T,) raw times or None, time-unit hint).

    Delimiter: comma, semicolon, tab or whitespace (from the first row). Rows whose time
    cell is empty/NULL are skipped (Ego4D leaves it NULL outside the trimmed video).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"imu: CSV is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise InvalidInput(f"imu: the CSV has no rows; {_ACCEPTED}")
    if len(lines) > MAX_ROWS + 1:
        raise InvalidInput(f"imu: CSV has {len(lines)} rows, over the limit of {MAX_ROWS}")
    first = lines[0][1]
    delim = next((d for d in (",", ";", "\t") if d in first), None)

    def split(line: str) -> list[str]:
        return [c.strip().strip('"') for c in (line.split(delim) if delim else line.split())]

    head = split(first)
    has_header = not all(_is_number(c) for c in head)
    rows = lines[1:] if has_header else lines
    width = len(head)
    if has_header:
        time_col, cols, hint = _columns_from_header(head)
    elif width in (6, 7):
        time_col, cols, hint = (0 if width == 7 else None), list(range(width - 6, width)), "auto"
    else:
        raise InvalidInput(f"imu: CSV rows have {width} fields, expected 6 or 7; {_ACCEPTED}")
    if not rows:
        raise InvalidInput("imu: the CSV has a header but no data rows")

    values = np.empty((len(rows), 6), np.float64)
    times = np.empty(len(rows), np.float64) if time_col is not None else None
    keep = np.ones(len(rows), bool)
    for r, (lineno, line) in enumerate(rows):
        cells = split(line)
        if len(cells) != width:
            raise InvalidInput(
                f"imu: CSV line {lineno} has {len(cells)} fields, expected {width} (ragged CSV)"
            )
        try:
            if times is not None and time_col is not None:
                tc = cells[time_col]
                if tc.lower() in _NULLS:
                    keep[r] = False
                    continue
                times[r] = float(tc)
            values[r] = [float(cells[c]) for c in cols]
        except ValueError:
            raise InvalidInput(
                f"imu: CSV line {lineno} has a non-numeric value; {_ACCEPTED}"
            ) from None
    if times is not None:
        times = times[keep]
    return values[keep], times, hint


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


_AXIS = re.compile(r"([xyz])$")


def _columns_from_header(head: list[str]) -> tuple[int | None, list[int], str]:
    """Header names -> (time column, [ax, ay, az, gx, gy, gz] columns, time-unit hint)."""
    names = [re.sub(r"[^a-z0-9]", "", c.lower()) for c in head]
    accel: dict[str, int] = {}
    gyro: dict[str, int] = {}
    time_cols: list[int] = []
    for i, n in enumerate(names):
        axis = _AXIS.search(n)
        stem = n[:-1] if axis else n
        if axis and (stem in ("a", "acc") or stem.startswith(("acc", "accl", "linacc"))):
            accel.setdefault(axis.group(1), i)
        elif axis and (stem in ("g", "w", "gyr") or stem.startswith(("gyr", "angvel", "rot"))):
            gyro.setdefault(axis.group(1), i)
        elif n in ("t", "ts", "time", "sec", "seconds") or "time" in n or "timestamp" in n:
            time_cols.append(i)
    if len(accel) == 3 and len(gyro) == 3:
        cols = [accel[a] for a in "xyz"] + [gyro[a] for a in "xyz"]
    elif len(head) in (6, 7):
        cols = list(range(len(head) - 6, len(head)))  # unnamed: positional order
        time_cols = [0] if len(head) == 7 else []
    else:
        raise InvalidInput(
            f"imu: CSV header {head} does not name accel x/y/z and gyro x/y/z columns; {_ACCEPTED}"
        )
    if not time_cols:
        return None, cols, "auto"
    # Ego4D has component and canonical timestamps; the canonical one is the video's clock.
    t = next((i for i in time_cols if "canonical" in names[i]), time_cols[0])
    # Units only from an explicit suffix (timestamp_ms, time_ns, t_s, "time (s)");
    # a bare "t" or "time" is left to the spacing-based inference.
    raw = head[t].lower().replace(" ", "")
    hint = next(
        (u for u in ("ns", "us", "ms") if raw.endswith((f"_{u}", f"({u})", f"[{u}]", u))), "auto"
    )
    if hint == "auto" and raw.endswith(("_s", "(s)", "[s]", "sec", "seconds")):
        hint = "s"
    return t, cols, hint


def _times_to_seconds(times: np.ndarray, units: str) -> np.ndarray:
    if units in _TIME_SCALE:
        return times * _TIME_SCALE[units]
    steps = np.diff(np.sort(times))
    steps = steps[steps > 0]
    if steps.size == 0:
        raise InvalidInput("imu: the time column has fewer than 2 distinct values")
    dt = float(np.median(steps))
    for scale in _TIME_SCALE.values():
        if _MIN_RATE_HZ <= 1.0 / (dt * scale) <= _MAX_RATE_HZ:
            return times * scale
    raise InvalidInput(
        f"imu: cannot infer time units from a median step of {dt:g}; pass time_units "
        "('s', 'ms', 'us' or 'ns') or rate_hz"
    )
