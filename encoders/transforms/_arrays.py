"""Safe, bounded readers shared by the depth, thermal and IMU loaders.

Everything here treats its input as hostile: sizes are checked before anything is allocated
(file size before reading, the PNG header before decoding, the ``.npy`` header before the
data), ``.npy`` files are parsed by hand so that no pickle is ever loaded, and every failure is
an ``InvalidInput`` with one line that says what was wrong and what is accepted.
"""

from __future__ import annotations

import io
import math
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.lib.format as npformat
import torch
import torch.nn.functional as F
from PIL import Image

from ..formats import HEAD_BYTES, content_format, describe
from .errors import InvalidInput

Source = str | Path | bytes | bytearray | memoryview | np.ndarray

# Caps. Depth maps, thermal frames and IMU traces are small (SUN RGB-D 730x530, LLVIP
# 1280x1024, 10 s of IMU at 200 Hz); these leave plenty of room and bound memory per item.
MAX_FILE_BYTES = 256 << 20  # 256 MiB
MAX_PIXELS = 1 << 25  # 33.5 M pixels, e.g. 8192 x 4096 (float32 copy: 128 MiB)
MAX_NPY_ELEMENTS = 1 << 25
MAX_NPY_HEADER = 10_000  # numpy's own default limit on header length
MIN_SIDE = 8  # smaller maps carry no scene (and are more likely another modality's array)
MAX_ASPECT = 8  # wider than 8:1 is a signal, not a picture (a 2:1 panorama still passes)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"

# Numeric dtype kinds we accept from .npy: bool, unsigned, signed, float.
_NUMERIC_KINDS = frozenset("buif")


def read_bytes(source: str | Path | bytes | bytearray | memoryview, what: str) -> bytes:
    """A path or a buffer -> its bytes, refusing empty and oversized inputs before reading."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | Path):
        # A missing file is FileNotFoundError (a caller's mistake), not bad input.
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise InvalidInput(
                    f"{what} file is {size} bytes, over the limit of {MAX_FILE_BYTES} bytes"
                )
            data = f.read(MAX_FILE_BYTES + 1)
    else:
        raise TypeError(
            f"{what} source must be a path, bytes or a numpy array, got {type(source).__name__}"
        )
    if not data:
        raise InvalidInput(f"the {what} input is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise InvalidInput(f"{what} input is over the limit of {MAX_FILE_BYTES} bytes")
    return data


# ----------------------------------------------------------------------------- .npy


def read_npy(data: bytes, what: str, max_elements: int = MAX_NPY_ELEMENTS) -> np.ndarray:
    """Parse a ``.npy`` file without ``np.load``: header first, then a bounded buffer view.

    Object dtypes (pickles) and structured dtypes are refused from the header alone, so a
    pickle payload is never touched, let alone executed.
    """
    fp = io.BytesIO(data)
    try:
        major, _minor = npformat.read_magic(fp)
        if major == 1:
            shape, fortran, dtype = npformat.read_array_header_1_0(fp, MAX_NPY_HEADER)
        elif major in (2, 3):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp, MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {major}")
    except Exception as e:  # numpy reports malformed headers with many types
        raise InvalidInput(
            f"{what}: malformed .npy header ({e}); accepted: a numeric .npy"
        ) from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidInput(
            f"{what}: .npy dtype {dtype} is not a plain numeric type (object arrays are never "
            "unpickled); accepted: bool, integer or float arrays"
        )
    if dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInput(
            f"{what}: .npy dtype {dtype} is not supported; accepted: bool, integer or float"
        )
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidInput(
            f"{what}: .npy shape {shape} has {count} elements, over the limit of {max_elements}"
        )
    offset = fp.tell()
    nbytes = count * dtype.itemsize
    if len(data) - offset < nbytes:
        raise InvalidInput(
            f"{what}: .npy file is truncated ({len(data) - offset} of {nbytes} data bytes)"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    arr = flat.reshape(shape, order="F" if fortran else "C")
    # Native byte order and an owned, writable copy (the buffer is the caller's bytes).
    return np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C")


# ----------------------------------------------------------------------------- PNG


def png_header(data: bytes, what: str) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk, before any decoding."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise InvalidInput(f"{what}: truncated or malformed PNG (no IHDR chunk)")
    width, height, bit_depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, bit_depth, colour


def read_png(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A PNG -> (H, W) uint8/uint16 for greyscale, (H, W, 3) uint8 for colour.

    The pixel count is checked from the header before Pillow sees the file, so a
    decompression bomb is refused without a warning and without allocating its pixels.
    Alpha is dropped (depth and thermal have no transparency to honour).
    """
    width, height, _bits, _colour = png_header(data, what)
    if width == 0 or height == 0:
        raise InvalidInput(f"{what}: PNG has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise InvalidInput(
            f"{what}: PNG is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}"
        )
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.array(im)
            elif mode == "1":
                arr = np.array(im.convert("L"))
            else:  # RGB, RGBA, LA, P, PA, ...: colour or grey-with-alpha
                arr = np.array(im.convert("RGB"))
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # The warning is an exception only under an "error" filter; the header check above
        # normally refuses such files first.
        raise InvalidInput(f"{what}: PNG is too large ({e})") from None
    except Exception as e:
        # Pillow reports malformed data with many exception types; all mean "unusable PNG".
        raise InvalidInput(f"{what}: cannot decode PNG ({type(e).__name__}: {e})") from None
    if arr.dtype == np.int32:  # mode "I" from a 16-bit PNG: values fit in uint16
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    if arr.ndim == 3 and bool((arr == arr[..., :1]).all()):
        arr = np.ascontiguousarray(arr[..., 0])  # grey stored as RGB (e.g. LLVIP exports)
    return arr


# ----------------------------------------------------------------------------- geometry


def resize_short_crop(
    x: np.ndarray, size: int, mode: Literal["bilinear", "bicubic"]
) -> torch.Tensor:
    """(H, W) float32 -> (1, size, size): short side to ``size``, then the centred square.

    Same geometry as the image loader (long side truncated, Python-rounded crop offsets);
    antialiased so that downscaling a large map averages rather than aliases.
    """
    h, w = x.shape
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]  # (1, 1, H, W)
    if (new_h, new_w) != (h, w):
        t = F.interpolate(t, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return t[0, :, top : top + size, left : left + size].contiguous()  # (1, S, S)


def read_map(
    source: str | Path | bytes | np.ndarray, what: str, accepted: str, colour_png: str
) -> np.ndarray:
    """A single-channel map (depth, thermal) from an array, a ``.npy`` or a greyscale PNG.

    Args:
        accepted: what the loader accepts, appended to every refusal.
        colour_png: why a colour PNG is refused for this modality (it cannot be inverted).
    """
    if isinstance(source, np.ndarray):
        return check_2d(source, what)
    data = read_bytes(source, what)
    kind = content_format(data[:HEAD_BYTES])
    if kind == "npy":
        return check_2d(read_npy(data, what), what)
    if kind == "png":
        arr = read_png(data, what)
        if arr.ndim == 3:
            raise InvalidInput(f"{what}: got a colour PNG ({colour_png}); {accepted}")
        return check_2d(arr, what)
    raise InvalidInput(f"{what}: got {describe(data[:HEAD_BYTES])}; {accepted}")


def check_2d(arr: np.ndarray, what: str) -> np.ndarray:
    """Squeeze a single-channel map to (H, W), or refuse it with the accepted shapes."""
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise InvalidInput(
            f"{what}: array shape {arr.shape} is not a single-channel map; "
            "accepted: (H, W), (1, H, W) or (H, W, 1)"
        )
    h, w = arr.shape
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_ASPECT * min(h, w):
        # e.g. an IMU trace (2000, 6) handed to the depth loader: refuse, don't embed noise.
        raise InvalidInput(
            f"{what}: a {h}x{w} map is not an image (accepted: sides of at least {MIN_SIDE} "
            f"pixels, aspect ratio up to {MAX_ASPECT}:1)"
        )
    if h * w > MAX_PIXELS:
        raise InvalidInput(f"{what}: {h}x{w} map is over the limit of {MAX_PIXELS} pixels")
    return arr
