"""Still images -> (3, S, S) float32 tensors, as ImageBind's vision tower expects them.

Decode with Pillow -> RGB -> bicubic resize of the short side to S (Pillow, antialiased) ->
centre crop S x S -> /255 -> per-channel normalisation. With ``official=True`` every step is
bit-exact with the official loader (Pillow resize, Python-rounded crop offsets, float32 maths).

Departures of the default mode (``official=False``) from the official loader, and only these:

1. EXIF orientation is applied (``ImageOps.exif_transpose``) before anything else, so a phone
   photo is seen upright, as every viewer shows it. The official loader feeds it sideways.
2. Transparency is composited over white instead of being dropped. ``convert("RGB")`` keeps
   whatever colour is stored under transparent pixels, often black: a black logo on a
   transparent background becomes an all-black square. White is what a page shows behind it.
   Applies to RGBA/LA/PA/La/RGBa images and to palette, L and RGB images with a ``tRNS``
   transparency entry; fully opaque images are unchanged.
3. 16-bit and 32-bit integer greyscale (Pillow modes ``I;16*`` and ``I``, e.g. 16-bit PNG
   and TIFF) are scaled to 8 bits (``round(v / 257)``, ``I`` clipped to 0..65535 first).
   ``convert("RGB")`` clips them at 255, which turns nearly every 16-bit image white.

Both modes: only JPEG (MPO included), PNG, WebP, GIF (first frame), BMP and TIFF (first
page) are decoded (Pillow's other plugins, e.g. EPS via Ghostscript, are not an upload surface);
an image over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, a truncated file or anything else Pillow
cannot decode raises ``InvalidInput``. Not changed, on purpose: embedded ICC profiles are not
applied (the model was trained on pixels as stored), CMYK uses Pillow's own CMYK->RGB and
float images (mode ``F``) Pillow's clip to 0..255, as in the official loader.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import PreprocessConfig
from .errors import InvalidInput

__all__ = ["ACCEPTED_FORMATS", "load_image"]

# Pillow format ids tried when decoding (camera JPEGs that Pillow calls MPO come in via JPEG).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_TEXT = "accepted: JPEG, PNG, WebP, GIF, BMP, TIFF"

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def load_image(
    source: str | Path | bytes | Image.Image,
    cfg: PreprocessConfig,
    official: bool = False,
) -> torch.Tensor:
    """An image file, its bytes, or a PIL image -> (3, S, S) float32, S = ``cfg.image_size``.

    Args:
        source: a path (str or Path), the encoded bytes, or an already opened PIL image
            (used as is; the caller keeps ownership).
        official: reproduce the official loader bit for bit (see the module docstring for
            what the default mode does differently).
    """
    if isinstance(source, Image.Image):
        rgb = _to_rgb(source, official)
    elif isinstance(source, bytes | bytearray | memoryview):
        rgb = _decode(io.BytesIO(bytes(source)), official)
    elif isinstance(source, str | Path):
        with open(source, "rb") as f:  # a missing file is FileNotFoundError, not bad input
            rgb = _decode(f, official)
    else:
        raise TypeError(
            f"image source must be a path, bytes or a PIL image, got {type(source).__name__}"
        )
    return _normalise(_resize_crop(rgb, cfg.image_size), cfg)


def _decode(fp: IO[bytes], official: bool) -> Image.Image:
    """Decode fully (so truncation shows up here) and convert to RGB inside the open file."""
    try:
        with Image.open(fp, formats=ACCEPTED_FORMATS) as im:
            _check_pixels(im)
            im.load()
            return _to_rgb(im, official)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # The warning arrives as an exception only under an "error" warnings filter.
        raise InvalidInput(f"the image is too large: {e}") from None
    except UnidentifiedImageError:
        # Pillow's text names its file object (``<_io.BufferedReader name=...>``): say it plainly.
        raise InvalidInput(
            f"cannot decode image: not an accepted format; {_ACCEPTED_TEXT}"
        ) from None
    except Exception as e:
        # Pillow's plugins report malformed data with many exception types (OSError,
        # SyntaxError, ValueError, struct.error, ...); all of them mean "not a usable image".
        # The caller names the file (embed, the index, an upload): it is not repeated here.
        raise InvalidInput(f"cannot decode image: {e}; {_ACCEPTED_TEXT}") from None


def _check_pixels(im: Image.Image) -> None:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse the whole range.
    limit = Image.MAX_IMAGE_PIXELS
    w, h = im.size
    if limit is not None and w * h > limit:
        raise InvalidInput(
            f"the image has {w}x{h} = {w * h} pixels, over the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS)"
        )


def _to_rgb(im: Image.Image, official: bool) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, officially (``convert``) or with the documented fixes."""
    if official:
        if im.mode == "P" and "transparency" in im.info:
            # Same pixels as convert("RGB") (the palette's RGB, alpha dropped), without the
            # warning Pillow raises for palette transparency given as bytes; a warnings filter
            # would be process-wide state, unsafe under threads.
            return im.convert("RGBA").convert("RGB")
        return im.convert("RGB")
    # In place: the decoded image is ours, and a copy of a 12 MP photo costs tens of ms.
    oriented = ImageOps.exif_transpose(im, in_place=True) or im
    if oriented.mode in _WIDE_GREY_MODES:
        oriented = _wide_grey_to_l(oriented)
    if oriented.mode in _ALPHA_MODES or "transparency" in oriented.info:
        rgba = oriented.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return oriented if oriented.mode == "RGB" else oriented.convert("RGB")


def _wide_grey_to_l(im: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int) greyscale -> 8-bit L, mapping 0..65535 onto 0..255."""
    v = np.asarray(im).astype(np.float64)
    return Image.fromarray(np.rint(np.clip(v, 0, 65535) / 257.0).astype(np.uint8), mode="L")


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Short side -> ``size`` (bicubic, long side truncated), then the centred square."""
    w, h = im.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # Python round() is half-to-even: a 373-px side gives offset 74, as the reference does.
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return im.crop((left, top, left + size, top + size))


def _normalise(im: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 RGB -> (3, S, S) float32 ``(x / 255 - mean) / std``, op for op in float32."""
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S)
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
    return x.sub(mean).div(std).contiguous()
