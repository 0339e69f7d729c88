"""The decode step of the build, run in worker processes: a file -> its items' model inputs.

Workers import the input transforms, never load the model. ``decode`` never raises for a
bad file: the error comes back as text, and the build records the file as rejected.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from encoders import InvalidInput, Modality, PreprocessConfig
from encoders.inputs import DEFAULT_LIMITS, preprocess
from encoders.transforms.text import read_text_file

VIDEO_SEGMENTS_PER_PART = 4  # video segments per worker result (about 18 MB each at 224 px)
MAX_SEGMENTS = 100_000  # per file and modality: a 10 s window covers 11 days


@dataclass(frozen=True)
class DecodeTask:
    """Decode part ``part`` of one file (part 0: hash, probe, and everything but later video)."""

    seq: int
    path: str
    modality: str
    cfg: PreprocessConfig
    segment_seconds: float
    soundtrack: bool
    part: int = 0
    spans: tuple[tuple[float, float], ...] = ()  # video segments of a later part
    duration: float | None = None  # the video's duration, for a later part


@dataclass
class DecodedItem:
    modality: str
    array: np.ndarray  # the model input of one item (no batch axis)
    start_s: float | None = None
    end_s: float | None = None
    duration_s: float | None = None
    rank: tuple[int, float] = (0, 0.0)  # order of the item within its file
    # Set by ``index import`` only, where one shard slice holds many items: each item's own
    # path, caption and tags (None: the file's, as for every decoded file).
    path: str | None = None
    caption: str | None = None
    tags: tuple[str, ...] | None = None


@dataclass
class Decoded:
    seq: int
    part: int
    sha256: str | None = None
    size: int = 0
    mtime_ns: int = 0
    items: list[DecodedItem] = field(default_factory=list)
    later: tuple[tuple[tuple[float, float], ...], ...] = ()  # spans of the parts still to decode
    duration: float | None = None  # of the video (part 0), passed on to its later parts
    error: str | None = None
    note: str | None = None  # e.g. a soundtrack that could not be read (the video still is)


def init_worker() -> None:
    """One torch thread per decode worker (the workers are the parallelism), and a watchdog.

    A worker blocks on its task queue, and holds that queue's write end itself, so the death
    of the build (SIGKILL included) would not wake it: the watchdog exits once the worker's
    parent, the build, is gone.
    """
    torch.set_num_threads(1)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def segment_spans(duration: float, window: float) -> list[tuple[float, float]]:
    """[start, end) segments of ``window`` seconds; a short last one joins its predecessor.

    Media up to 1.5 windows long is one segment; ``window <= 0`` means never split.
    """
    if window <= 0 or duration <= 1.5 * window:
        return [(0.0, float(duration))]
    n = math.floor(duration / window)
    spans = [(i * window, (i + 1) * window) for i in range(n)]
    if duration - n * window >= window / 2:
        spans.append((n * window, float(duration)))
    else:
        spans[-1] = (spans[-1][0], float(duration))
    if len(spans) > MAX_SEGMENTS:
        raise InvalidInput(f"{len(spans)} segments of {window:g} s: over {MAX_SEGMENTS}")
    return spans


def decode(task: DecodeTask) -> Decoded:
    """Decode one part of a file; errors come back in ``Decoded.error``, never raised."""
    out = Decoded(task.seq, task.part)
    try:
        if task.part == 0:
            # The scan took a regular file, never a link: one now was swapped in since.
            st = os.stat(task.path, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput("no longer a regular file (replaced since the scan)")
            out.size, out.mtime_ns = st.st_size, st.st_mtime_ns
            if out.size == 0:
                raise InvalidInput("the file is empty (0 bytes)")
            if out.size > DEFAULT_LIMITS.max_bytes:
                limit = DEFAULT_LIMITS.max_bytes
                raise InvalidInput(f"{out.size} bytes is over the limit of {limit} bytes")
            out.sha256 = _sha256(task.path)
        _decode_items(task, out)
    except FileNotFoundError:
        out.error = "the file disappeared during the build"
    except Exception as e:  # a decoder bug or a hostile file must not end the build
        text = str(e).strip().strip("'\"") or type(e).__name__
        if not isinstance(e, InvalidInput | OSError):
            text = f"{type(e).__name__}: {text}"
        # The path is in the record already: keep the message about what went wrong.
        out.error = text.replace(f"{task.path}: ", "").replace(f" {task.path}", "")
        out.items = []
    return out


def _decode_items(task: DecodeTask, out: Decoded) -> None:
    m = Modality.parse(task.modality)
    cfg = task.cfg
    if m is Modality.VIDEO:
        _decode_video(task, out)
    elif m is Modality.AUDIO:
        from encoders.transforms.audio import read_audio

        wave, rate = read_audio(task.path)
        out.items += _audio_items(wave, rate, cfg, task.segment_seconds)
    elif m is Modality.TEXT:
        # The same reading as `bindsearch embed` and an upload (the vectors agree).
        text = read_text_file(task.path, DEFAULT_LIMITS.max_text_chars)
        out.items.append(DecodedItem(m.value, preprocess(m, [text], cfg)[0].numpy()))
    else:
        x = preprocess(m, [task.path], cfg)[0].numpy()
        out.items.append(DecodedItem(m.value, x))


def _audio_items(
    wave: torch.Tensor, rate: int, cfg: PreprocessConfig, window: float, rank: int = 0
) -> list[DecodedItem]:
    from encoders.transforms.audio import load_audio

    duration = wave.shape[1] / rate
    items = []
    for start, end in segment_spans(duration, window):
        part = wave[:, round(start * rate) : round(end * rate)]
        x = load_audio((part, rate), cfg).numpy()
        items.append(DecodedItem("audio", x, start, end, duration, (rank, start)))
    return items


def _decode_video(task: DecodeTask, out: Decoded) -> None:
    from encoders.transforms.video import extract_audio, iter_video_segments, probe_video

    spans = list(task.spans)
    duration = task.duration
    if task.part == 0:
        info = probe_video(task.path)
        duration = out.duration = info.duration
        spans = segment_spans(info.duration, task.segment_seconds)
        step = VIDEO_SEGMENTS_PER_PART
        out.later = tuple(tuple(spans[i : i + step]) for i in range(step, len(spans), step))
        spans = spans[:step]
        if task.soundtrack and info.has_audio:
            try:
                track = extract_audio(task.path)
                if track is not None:
                    wave = torch.from_numpy(track[0])
                    out.items += _audio_items(wave, track[1], task.cfg, task.segment_seconds, 1)
            except (InvalidInput, ValueError, RuntimeError, OSError) as e:
                out.note = f"soundtrack not indexed: {e}"
    segments = iter_video_segments(task.path, task.cfg, spans)
    for (start, end), x in zip(spans, segments, strict=True):
        out.items.append(DecodedItem("video", x.numpy(), start, end, duration, (0, start)))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
