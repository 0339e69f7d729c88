"""Where the clips of a video or audio track start and end, as the official loaders pick them.

ImageBind samples a fixed number of equally spaced, fixed-length clips per file with
pytorchvideo's ``ConstantClipsPerVideoSampler`` at commit 6cdc929 (the one ImageBind pins).
Its arithmetic is reproduced here exactly, because frame and sample indices are computed from
these times by truncation or ceiling, and a different rounding moves a clip by one index:

- the longest possible start, ``duration - clip`` (clamped at 0), is computed in float (the
  duration is a float; the clip length an exact ``Fraction``), then made an exact ``Fraction``;
- the step between starts is that ``Fraction`` divided by ``max(clips - 1, 1)``; the PyPI release
  0.1.5 divides by ``clips`` instead, which is *not* what ImageBind uses;
- clip ``i`` covers ``[i * step, i * step + clip]``, both exact ``Fraction``s.

A file no longer than one clip therefore gives ``clips`` identical clips ``[0, clip]``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

__all__ = ["ClipSpan", "clip_spans"]


class ClipSpan(NamedTuple):
    """One clip, in seconds, as exact fractions (callers round them the official way)."""

    start: Fraction
    end: Fraction


def clip_spans(duration: float, clip_duration: float, clips: int) -> list[ClipSpan]:
    """``clips`` equally spaced clips of ``clip_duration`` seconds over ``duration`` seconds.

    Args:
        duration: the file's duration in seconds, as the official loader computes it (video:
            frame count / average fps; audio: samples / rate), a float.
        clip_duration: the clip length in seconds (the official default is 2).
        clips: how many clips (official: 5 for video, 3 for audio).
    """
    if clips < 1:
        raise ValueError(f"clips must be at least 1, got {clips}")
    if not clip_duration > 0:
        raise ValueError(f"clip_duration must be positive, got {clip_duration}")
    if not duration >= 0:  # also rejects NaN
        raise ValueError(f"duration must be a non-negative number, got {duration}")
    clip = Fraction(clip_duration)
    # float - Fraction is a float in Python: the subtraction rounds once, as in the sampler.
    max_start = Fraction(max(float(duration) - float(clip), 0.0))
    step = max_start / max(clips - 1, 1)
    # The sampler also stops early once a start would pass max_start; with step defined as
    # above that never happens before `clips` clips, so the count is always `clips`.
    return [ClipSpan(i * step, i * step + clip) for i in range(clips)]
