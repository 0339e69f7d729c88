"""Video segments: ``load_video``'s clip sampling applied to [start, end) of a file.

``encoders.transforms.video.load_video`` samples its clips over the whole file; a long video
is indexed as segments, each embedded like a short video of its own. This module reuses the
video transform's decoder and crops (private helpers: same container checks, same frame
picking and rounding) and probes the file once for any number of segments. For the segment
[0, duration) the result equals ``load_video`` exactly (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from encoders import PreprocessConfig
from encoders.transforms._clips import clip_spans
from encoders.transforms.video import (
    _decode_frames,
    _open,
    _probe,
    _transform_clip,
    _video_stream,
)


def iter_video_segments(
    source: str | Path, cfg: PreprocessConfig, spans: Sequence[tuple[float, float]]
) -> Iterator[np.ndarray]:
    """(clips * 3, 3, T, S, S) float32 per segment [start, end) seconds, in order."""
    with _open(source) as container:
        stream = _video_stream(container)
        info, index = _probe(container, stream)
        n, fps = info.frames, info.fps
        for start, end in spans:
            offset = Fraction(start) if start else 0
            picks: list[list[int]] = []
            for span in clip_spans(end - start, cfg.video_clip_duration, cfg.video_clips):
                first = math.ceil(fps * (offset + span.start))
                stop = min(math.ceil(fps * (offset + span.end)), n)
                if stop <= first:  # no frame in the clip: the nearest one (load_video's default)
                    first, stop = min(first, n - 1), min(first, n - 1) + 1
                t = torch.linspace(0, stop - first - 1, cfg.video_frames).clamp(0, stop - first - 1)
                picks.append([first + int(i) for i in t.long().tolist()])
            wanted = sorted({i for clip in picks for i in clip})
            frames = _decode_frames(container, stream, wanted, index)
            out = [_transform_clip(np.stack([frames[i] for i in clip]), cfg) for clip in picks]
            yield torch.cat(out).numpy()
