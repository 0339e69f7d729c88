"""One entry point from user inputs (paths, bytes, strings) to the batch a tower takes.

Each modality's transform lives in ``encoders/transforms/<modality>.py`` as a pure CPU
function; this module dispatches to them, enforces the limits that protect the process, and
names the offending item in every error.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from .config import PreprocessConfig
from .errors import InvalidInput
from .modality import Modality

Item = str | Path | bytes


@dataclass(frozen=True)
class InputLimits:
    """Caps on a single input, checked before decoding where possible."""

    max_bytes: int = 1 << 30  # 1 GiB per file
    max_text_chars: int = 20_000  # a caption, not a book; the model reads 75 tokens anyway
    max_items: int = 100_000  # per call
    # Audio is decoded whole before its clips are taken: 10 min of 48 kHz stereo is 230 MB of
    # float32. Longer recordings belong in the index, which cuts them into segments.
    max_audio_seconds: float = 600.0
    max_pixels: int = 64_000_000  # per image (Pillow's own bomb guard is 89.5 M)

    def check_item(self, item: Item, name: str) -> None:
        if isinstance(item, bytes):
            size = len(item)
        else:
            path = Path(item)
            if not path.is_file():
                raise InvalidInput(f"{name}: no such file")
            size = path.stat().st_size
        if size == 0:
            raise InvalidInput(f"{name}: the file is empty (0 bytes)")
        if size > self.max_bytes:
            raise InvalidInput(f"{name}: {size} bytes is over the limit of {self.max_bytes} bytes")

    def check_content(self, m: Modality, item: Item, name: str) -> None:
        """Header-only checks (pixels, duration) before a full decode."""
        if m is Modality.VISION:
            pixels = _image_pixels(item)
            if pixels is not None and pixels > self.max_pixels:
                raise InvalidInput(
                    f"{name}: {pixels} pixels is over the limit of {self.max_pixels}"
                )
        elif m is Modality.AUDIO:
            seconds = _audio_seconds(item)
            if seconds is not None and seconds > self.max_audio_seconds:
                raise InvalidInput(
                    f"{name}: {seconds:.0f} s of audio is over the limit of "
                    f"{self.max_audio_seconds:.0f} s (index long recordings: they are segmented)"
                )


def open_binary(item: Item) -> IO[bytes]:
    """A binary file object for a path or bytes (opened by Python, never by a decoder)."""
    return io.BytesIO(item) if isinstance(item, bytes) else open(item, "rb")


def _image_pixels(item: Item) -> int | None:
    """Width x height from the header, or None if Pillow cannot tell (the loader will say)."""
    from PIL import Image

    # No warnings.catch_warnings() here: it swaps process-wide state under the service's decode
    # threads. Pillow's own bomb warning may show once; our limit (below Pillow's) still refuses.
    try:
        with open_binary(item) as fp, Image.open(fp) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:
        return None


def _audio_seconds(item: Item) -> float | None:
    """Duration from the header (libsndfile, else FFmpeg), or None if unknown."""
    try:
        import soundfile

        with open_binary(item) as fp:
            info = soundfile.info(fp)
        if info.samplerate > 0:
            return float(info.frames) / float(info.samplerate)
    except Exception:
        pass
    try:
        import av

        from .formats import HEAD_BYTES, audio_demuxer

        with open_binary(item) as fp:
            fmt = audio_demuxer(fp.read(HEAD_BYTES))
            fp.seek(0)
            if fmt is None:
                return None  # the loader refuses it with the proper message
            with av.open(fp, mode="r", format=fmt) as container:
                if container.duration is not None:
                    return float(container.duration) / 1e6  # microseconds (AV_TIME_BASE)
    except Exception:
        return None
    return None


DEFAULT_LIMITS = InputLimits()


def item_name(item: Item, index: int) -> str:
    """How an item is named in messages: its path, or its position for raw bytes."""
    return f"<bytes #{index}>" if isinstance(item, bytes) else str(item)


def _loader(m: Modality) -> Callable[..., torch.Tensor]:
    # Imported lazily: a text-only service never imports PyAV, soundfile or Pillow.
    if m is Modality.VISION:
        from .transforms.vision import load_image

        return load_image
    if m is Modality.VIDEO:
        from .transforms.video import load_video

        return load_video
    if m is Modality.AUDIO:
        from .transforms.audio import load_audio

        return load_audio
    if m is Modality.DEPTH:
        from .transforms.depth import load_depth

        return load_depth
    if m is Modality.THERMAL:
        from .transforms.thermal import load_thermal

        return load_thermal
    if m is Modality.IMU:
        from .transforms.imu import load_imu

        return load_imu
    raise ValueError(f"no file loader for {m.value}")


def preprocess(
    modality: Modality | str,
    items: Sequence[Item] | str,
    cfg: PreprocessConfig,
    official: bool = False,
    limits: InputLimits = DEFAULT_LIMITS,
    **options: Any,
) -> torch.Tensor:
    """Paths or bytes (strings for text) -> the batch the model takes for ``modality``.

    Shapes: vision (N, 3, S, S); video (N, clips*crops, 3, T, S, S); audio (N, clips, 1, F, T);
    depth/thermal (N, 1, S, S); imu (N, 6, samples); text (N, context) int64.

    Args:
        official: reproduce the official data functions bit for bit, quirks included; the
            default departs only where they hurt users (docs/modalities.md lists each case).
        options: modality-specific loader options (e.g. depth ``focal_px``, imu ``rate_hz``).
    """
    m = Modality.parse(modality)
    if isinstance(items, str | bytes | Path):
        items = [items]
    if len(items) > limits.max_items:
        raise InvalidInput(f"{len(items)} items in one call; the limit is {limits.max_items}")
    if len(items) == 0:
        raise InvalidInput("no items given")
    if m is Modality.TEXT:
        from .transforms.text import tokenize

        texts = []
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise InvalidInput(f"text item #{i} is {type(t).__name__}, not a string")
            if len(t) > limits.max_text_chars:
                raise InvalidInput(
                    f"text item #{i} has {len(t)} characters; the limit is {limits.max_text_chars}"
                )
            texts.append(t)
        return tokenize(texts, cfg)
    load = _loader(m)
    out = []
    for i, item in enumerate(items):
        name = item_name(item, i)
        limits.check_item(item, name)
        limits.check_content(m, item, name)
        try:
            x = load(item, cfg, official=official, **options)
        except InvalidInput as e:
            raise InvalidInput(f"{name}: {e}") from None
        except (OSError, RuntimeError, ValueError, MemoryError, EOFError) as e:
            # A decoder failure the transform did not anticipate: still one clear line.
            raise InvalidInput(
                f"{name}: cannot read as {m.value} ({type(e).__name__}: {e})"
            ) from None
        out.append(x)
    return torch.stack(out)
