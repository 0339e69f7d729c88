"""Video files -> (clips * 3, 3, T, S, S) float32 clip batches for ImageBind's vision tower.

The official loader (``load_and_transform_video_data``, decord through pytorchvideo) does, and so
do we, with PyAV (FFmpeg) as the decoder:

1. fps = the stream's average frame rate; frame count = the number of video packets the
   demuxer returns (decord indexes them all on opening); duration = frames / fps.
2. ``cfg.video_clips`` clips of ``cfg.video_clip_duration`` seconds (``_clips.clip_spans``).
3. Clip [s, e) holds frame indices ``ceil(fps * s)`` up to ``min(ceil(fps * e), frames)``,
   exclusive (index = position in presentation order); of those, ``cfg.video_frames`` are kept
   at ``linspace(0, n - 1, T)`` truncated, i.e. the first and last frame for T = 2. Only the
   kept frames are converted to RGB; the rest are decoded (they are references) and dropped.
4. A display rotation of 90, 180 or 270 degrees stored with the video (phones record portrait
   video as landscape frames plus a rotation flag) is applied, as decord does, so the model
   sees the video upright. Other angles and mirroring flags are ignored, as decord does.
5. RGB uint8 -> float32 / 255, short side bilinearly scaled to S (``F.interpolate``, no
   antialiasing, long side ``floor(long / short * S)``), per-channel normalisation.
6. Three S x S crops along the long side, at 0, ``ceil((L - S) / 2)`` and ``L - S``; output
   clip by clip, crops 0, 1, 2 within a clip.

The official loader keeps ``clip_duration`` (2) frames per clip, not a separate frame count;
here it is ``cfg.video_frames``, which equals 2 in every official configuration.

The one departure of the default mode (``official=False``): a clip that holds no frame at all
(frame rate under 1 / clip duration, e.g. a slideshow encoded at 0.2 fps) takes the nearest
frame, where the official loader fails; ``official=True`` raises ``InvalidInput`` there.

Both modes: only ISO-BMFF (MP4, MOV, M4V, 3GP), Matroska/WebM and AVI containers are opened,
recognised by their magic bytes and opened with that demuxer only (FFmpeg's probing would also
accept playlists such as HLS, which open further files or URLs). Frames larger than
``MAX_PIXELS``, a file without a video stream, without frames, or one FFmpeg cannot decode
raise ``InvalidInput``. YUV -> RGB conversion is FFmpeg's swscale default, as in decord, so
bit-exact only for RGB-coded video; otherwise within a grey level or so of decord.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import av
import av.container
import av.video.stream
import numpy as np
import torch
import torch.nn.functional as F

from ..config import PreprocessConfig
from ..formats import HEAD_BYTES, video_demuxer
from ._clips import clip_spans
from .errors import InvalidInput

__all__ = [
    "MAX_PIXELS",
    "VideoInfo",
    "extract_audio",
    "iter_video_segments",
    "load_video",
    "probe_video",
]

Source = str | Path | bytes

# 8K UHD is 33.2 MP; anything larger is not a video anyone uploads, but it is a cheap way to
# make the decoder allocate gigabytes from a small file.
MAX_PIXELS = 7680 * 4320 + 1

_ACCEPTED_TEXT = "accepted: MP4/MOV (ISO BMFF), WebM/Matroska, AVI"


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe_video`` reports. Duration and fps follow the official (decord) definitions."""

    duration: float  # seconds: frames / fps, as the official loader computes it
    fps: float  # the stream's average frame rate
    frames: int  # video packets in the container (decord's count)
    width: int  # coded width, before the display rotation
    height: int
    has_audio: bool
    rotation: int = 0  # display rotation, degrees counterclockwise (FFmpeg's convention)


def probe_video(source: Source) -> VideoInfo:
    """Read a video's geometry, frame rate, frame count and whether it has a soundtrack."""
    with _open(source) as container:
        stream = _video_stream(container)
        info, _ = _probe(container, stream)
        try:
            container.seek(0)
            first = next(iter(container.decode(stream)), None)
        except av.FFmpegError as e:
            raise InvalidInput(f"the video cannot be decoded ({e}); {_ACCEPTED_TEXT}") from None
    if first is None:
        raise InvalidInput("no frame of the video could be decoded")
    # FFmpeg attaches the container's display matrix to every decoded frame.
    return dataclasses.replace(info, rotation=int(first.rotation))


def load_video(source: Source, cfg: PreprocessConfig, official: bool = False) -> torch.Tensor:
    """A video file or its bytes -> (clips * 3, 3, T, S, S) float32.

    S = ``cfg.image_size``, T = ``cfg.video_frames``, clips = ``cfg.video_clips`` of
    ``cfg.video_clip_duration`` seconds each.

    Args:
        official: fail, as the official loader does, on a clip that holds no frame (the
            default takes the nearest frame); otherwise both modes are the same.
    """
    with _open(source) as container:
        stream = _video_stream(container)
        info, index = _probe(container, stream)
        picks = _pick_frames(info, cfg, 0.0, info.duration, official)
        return _load_clips(container, stream, index, picks, cfg)


def iter_video_segments(
    source: Source, cfg: PreprocessConfig, spans: Sequence[tuple[float, float]]
) -> Iterator[torch.Tensor]:
    """``load_video`` of each segment [start, end) seconds of one file, in order.

    Each segment is sampled as a short video of its own (``load_video``'s clips over the
    segment); the file is opened and probed once for all of them. The segment
    [0, duration) gives exactly ``load_video``'s output. Yields (clips * 3, 3, T, S, S) float32.
    """
    with _open(source) as container:
        stream = _video_stream(container)
        info, index = _probe(container, stream)
        for start, end in spans:
            picks = _pick_frames(info, cfg, start, end - start, official=False)
            yield _load_clips(container, stream, index, picks, cfg)


def _pick_frames(
    info: VideoInfo, cfg: PreprocessConfig, start: float, duration: float, official: bool
) -> list[list[int]]:
    """Frame indices of every clip of [start, start + duration) s: (clips, T), before decoding."""
    n, fps = info.frames, info.fps
    offset = Fraction(start) if start else 0
    picks: list[list[int]] = []
    for span in clip_spans(duration, cfg.video_clip_duration, cfg.video_clips):
        # float * Fraction is a float product in Python: the rounding decord's caller has.
        first = math.ceil(fps * (offset + span.start))
        stop = min(math.ceil(fps * (offset + span.end)), n)
        if stop <= first:
            if official:
                raise InvalidInput(
                    f"clip [{float(span.start):.3f}, {float(span.end):.3f}) s holds no frame "
                    f"({n} frames at {fps:g} fps); the official loader cannot read it"
                )
            first, stop = min(first, n - 1), min(first, n - 1) + 1  # the nearest frame
        # UniformTemporalSubsample: float32 linspace over the clip, truncated.
        t = torch.linspace(0, stop - first - 1, cfg.video_frames).clamp(0, stop - first - 1)
        picks.append([first + int(i) for i in t.long().tolist()])
    return picks


def _load_clips(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    index: _Index,
    picks: list[list[int]],
    cfg: PreprocessConfig,
) -> torch.Tensor:
    """Decode the picked frames and transform them clip by clip: (clips * 3, 3, T, S, S)."""
    wanted = sorted({i for clip in picks for i in clip})
    frames = _decode_frames(container, stream, wanted, index)
    out = []
    for clip in picks:
        rgb = np.stack([frames[i] for i in clip])  # (T, H, W, 3) uint8
        out.append(_transform_clip(rgb, cfg))
    return torch.cat(out)


def extract_audio(
    source: Source, max_seconds: float | None = None
) -> tuple[np.ndarray, int] | None:
    """The first audio stream as float32 (C, N) at its own sample rate, or None if there is none.

    Args:
        max_seconds: stop decoding after this many seconds (bounds memory for long files).
    """
    with _open(source) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        if not rate:
            raise InvalidInput("the audio stream has no sample rate")
        limit = None if max_seconds is None else math.ceil(max_seconds * rate)
        # Planar float at the source rate and layout: a pure format conversion.
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []  # each (C, n) float32
        got = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    got += chunks[-1].shape[1]
                if limit is not None and got >= limit:
                    break
            else:
                for out in resampler.resample(None):  # flush what the resampler holds
                    chunks.append(out.to_ndarray())
        except av.FFmpegError as e:
            raise InvalidInput(f"the audio stream cannot be decoded ({e})") from None
    if not chunks:
        return None
    wave = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)  # (C, N)
    if limit is not None:
        wave = wave[:, :limit]
    return np.ascontiguousarray(wave), int(rate)


# --- decoding ---------------------------------------------------------------------------------


class _Opened:
    """A container opened from a path or bytes, closed with its file (context manager)."""

    def __init__(self, fp: IO[bytes], container: av.container.InputContainer) -> None:
        self.fp, self.container = fp, container

    def __enter__(self) -> av.container.InputContainer:
        return self.container

    def __exit__(self, *exc: object) -> None:
        self.container.close()
        self.fp.close()


def _open(source: Source) -> _Opened:
    if isinstance(source, bytes | bytearray | memoryview):
        fp: IO[bytes] = io.BytesIO(bytes(source))
    elif isinstance(source, str | Path):
        # Opened here, not by FFmpeg, so a path can never be read as a URL or other protocol;
        # a missing file is FileNotFoundError, not bad input.
        fp = open(source, "rb")  # closed by _Opened
    else:
        raise TypeError(f"video source must be a path or bytes, got {type(source).__name__}")
    try:
        fmt = video_demuxer(fp.read(HEAD_BYTES))
        fp.seek(0)
        if fmt is None:
            raise InvalidInput(f"not a recognised video container; {_ACCEPTED_TEXT}")
        container = av.open(fp, format=fmt)
    except InvalidInput:
        fp.close()
        raise
    except (av.FFmpegError, ValueError, OSError) as e:
        fp.close()
        # FFmpeg's own text, without PyAV's "[Errno N] ...: '<the file object's name>'" (the
        # caller names the file once; the errno is an internal).
        why = getattr(e, "strerror", None) or str(e)
        raise InvalidInput(f"not a readable video ({why}); {_ACCEPTED_TEXT}") from None
    if not isinstance(container, av.container.InputContainer):  # pragma: no cover - mode "r"
        container.close()
        fp.close()
        raise InvalidInput("not a readable video")
    return _Opened(fp, container)


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise InvalidInput(f"the file has no video stream; {_ACCEPTED_TEXT}")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w <= 0 or h <= 0:
        raise InvalidInput("the video stream has no frame size")
    if w * h > MAX_PIXELS:
        raise InvalidInput(f"{w}x{h} frames are over the limit of {MAX_PIXELS - 1} pixels (8K)")
    stream.thread_type = "AUTO"
    return stream


@dataclass(frozen=True)
class _Index:
    """Presentation timestamps of the stream's frames (sorted) and of its keyframes."""

    pts: list[int]  # empty: timestamps missing, decode sequentially
    keys: list[int]


def _probe(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[VideoInfo, _Index]:
    rate = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0:
        raise InvalidInput("the video stream has no frame rate")
    fps = float(rate)
    pts: list[int] = []
    keys: list[int] = []
    missing_pts = 0  # packets without a timestamp
    try:
        # One pass over the packets (no decoding): the timestamp of every frame, so that a
        # frame index can be found by seeking to the keyframe before it.
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            if packet.pts is None:
                missing_pts += 1
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError as e:
        raise InvalidInput(f"the video cannot be read ({e}); {_ACCEPTED_TEXT}") from None
    # decord's frame count: every packet of the stream, timestamped or not.
    frames = len(pts) + missing_pts
    if frames == 0:
        raise InvalidInput("the video stream has no frames")
    if missing_pts:  # frames cannot be located by timestamp: decode from the start
        pts, keys = [], []
    pts.sort()
    keys.sort()
    info = VideoInfo(
        duration=frames / fps,
        fps=fps,
        frames=frames,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        has_audio=bool(container.streams.audio),
    )
    return info, _Index(pts, keys)


def _decode_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    wanted: Sequence[int],
    index: _Index,
) -> dict[int, np.ndarray]:
    """Frames at the given indices (presentation order) -> {index: (H, W, 3) uint8 RGB}."""
    try:
        if index.pts:
            return _decode_by_seeking(container, stream, wanted, index)
        return _decode_sequentially(container, stream, wanted)
    except av.FFmpegError as e:
        raise InvalidInput(f"the video cannot be decoded ({e}); {_ACCEPTED_TEXT}") from None


def _decode_by_seeking(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    wanted: Sequence[int],
    index: _Index,
) -> dict[int, np.ndarray]:
    """Seek to the keyframe before each wanted frame unless decoding on reaches it sooner."""
    out: dict[int, np.ndarray] = {}
    frames: Iterator[av.VideoFrame] | None = None
    last: av.VideoFrame | None = None  # the latest decoded frame
    for i in wanted:
        # A container may count more frames than it holds: the last one stands in for those.
        target = index.pts[min(i, len(index.pts) - 1)]
        k = bisect.bisect_right(index.keys, target) - 1
        key = index.keys[k] if k >= 0 else index.pts[0]
        behind = last is None or last.pts is None or last.pts >= target
        if frames is None or behind or key > _pts(last):
            container.seek(key, stream=stream, backward=True)
            frames = container.decode(stream)
            last = None
        frame = _advance(frames, target)
        if frame is None or (last is None and _pts(frame) > target):
            # The seek landed past the target (or the stream ended early): decode from the start.
            container.seek(index.pts[0], stream=stream, backward=True)
            frames = container.decode(stream)
            frame = _advance(frames, target)
        if frame is None:
            if not out:
                raise InvalidInput("no frame of the video could be decoded")
            frame_rgb = out[max(out)]  # the stream ended early: repeat its last frame
        else:
            frame_rgb = _rgb(frame, stream)
        out[i] = frame_rgb
        last = frame
    return out


def _pts(frame: av.VideoFrame | None) -> int:
    return -(2**62) if frame is None or frame.pts is None else int(frame.pts)


def _advance(frames: Iterator[av.VideoFrame], target: int) -> av.VideoFrame | None:
    """Decode on to the first frame at or after ``target`` (None if the stream ends first)."""
    for frame in frames:
        if frame.pts is not None and frame.pts >= target:
            return frame
    return None


def _decode_sequentially(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    wanted: Sequence[int],
) -> dict[int, np.ndarray]:
    """Without timestamps: count decoded frames from the start."""
    container.seek(0)
    out: dict[int, np.ndarray] = {}
    todo = set(wanted)
    previous: np.ndarray | None = None
    for n, frame in enumerate(container.decode(stream)):
        if n in todo:
            out[n] = previous = _rgb(frame, stream)
            todo.discard(n)
            if not todo:
                break
    if todo:  # fewer frames than counted: the last one stands in
        if previous is None:
            raise InvalidInput("no frame of the video could be decoded")
        out.update({n: previous for n in todo})
    return out


def _rgb(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright, through swscale's default conversion (decord's too)."""
    w, h = stream.codec_context.width, stream.codec_context.height
    if frame.width != w or frame.height != h:
        # Resolution switches mid-stream: decord scales every frame to the first frame's size.
        rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
    else:
        rgb = frame.to_ndarray(format="rgb24")
    return _rotate(rgb, frame.rotation)


def _rotate(rgb: np.ndarray, degrees: int) -> np.ndarray:
    """Apply a display rotation given in counterclockwise degrees (FFmpeg's convention).

    Only whole quarter turns are applied: decord switches on exactly 90, 180 and 270.
    """
    if degrees % 90:
        return rgb
    k = (degrees // 90) % 4  # np.rot90 turns counterclockwise
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


# --- the official transform -------------------------------------------------------------------


def _transform_clip(rgb: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, 3, T, S, S): three normalised crops of one clip."""
    size = cfg.image_size
    # (C, T, H, W) float32 in 0..1, laid out as the official pipeline has it when it scales.
    x = torch.from_numpy(rgb).permute(3, 0, 1, 2).to(torch.float32).contiguous() / 255.0
    _, _, h, w = x.shape
    # Short side to S; the long side in float, then floored (pytorchvideo's ShortSideScale).
    if w < h:
        new_h, new_w = math.floor(h / w * size), size
    else:
        new_h, new_w = size, math.floor(w / h * size)
    # (C, T, H, W) is read as (N, C, H, W): every frame plane is scaled on its own.
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    mean = torch.as_tensor(cfg.image_mean, dtype=x.dtype)
    std = torch.as_tensor(cfg.image_std, dtype=x.dtype)
    x = x.sub_(mean[:, None, None, None]).div_(std[:, None, None, None])
    # Crops along the long side only (a square frame gives three identical crops).
    y0 = x0 = 0
    crops = []
    for spatial in range(3):
        if new_h > new_w:
            y0 = (0, math.ceil((new_h - size) / 2), new_h - size)[spatial]
        else:
            x0 = (0, math.ceil((new_w - size) / 2), new_w - size)[spatial]
        crops.append(x[:, :, y0 : y0 + size, x0 : x0 + size])
    return torch.stack(crops)  # (3 crops, C, T, S, S)
