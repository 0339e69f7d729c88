"""A procedural multimodal world: latent factors rendered as every ImageBind modality.

Each sample draws five latent factors (object class, colour, scene, motion, distance) and is
rendered, in numpy, as what each sensor would plausibly perceive of it:

=========  =====================================================  ==========================
modality   what it renders                                        factors it perceives
=========  =====================================================  ==========================
image      the object (shape, colour, size from distance) on a    class, colour, scene,
           muted scene background; the first frame of the video   distance
video      two moments of the object moving (frames 0 and 1 s)    + motion
text       a caption naming the factors (video captions: motion)  all named ones
audio      the object's sound (pitch, timbre) over scene ambience class, scene
thermal    silhouette at the class temperature, scene ambient     class, scene
depth      silhouette at the object's distance, in front of a     class (shape), distance
           scene-independent ground plane and wall
imu        accelerometer/gyro of the carried sensor               motion
=========  =====================================================  ==========================

Some (class, scene) combinations never occur in the training split (``HELD_OUT``); the test
split draws every combination. Everything is generated in chunks from one seed, so the world
is reproducible and cheap: ``generate`` returns raw media (uint8 pixels, millimetres, waveforms)
and ``to_model_inputs`` turns them into model inputs through the real loaders of
``encoders.transforms``, so files written by ``write_world`` and read back by the pipeline give
the same tensors (PNG and WAV are lossless; MP4 is not, and is tested for closeness).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from encoders.config import PreprocessConfig
from encoders.transforms.imu import DEFAULT_RATE_HZ as IMU_RATE_HZ

__all__ = [
    "CHOICES",
    "CLASSES",
    "COLOURS",
    "DISTANCES",
    "FACTORS",
    "HELD_OUT",
    "MOTIONS",
    "PERCEIVES",
    "SCENES",
    "World",
    "caption",
    "centred_images",
    "choice_captions",
    "factor_captions",
    "generate",
    "motion_groups",
    "nuisance_groups",
    "sample_factors",
    "swapped_captions",
    "to_model_inputs",
    "write_demo_world",
    "write_world",
]

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SCENES = ("forest", "beach", "city", "snow", "night")
MOTIONS = ("still", "moving left", "moving right", "rising", "falling")
DISTANCES = ("very close", "close", "far", "very far")
FACTORS: dict[str, tuple[str, ...]] = {
    "class": CLASSES,
    "colour": COLOURS,
    "scene": SCENES,
    "motion": MOTIONS,
    "distance": DISTANCES,
}
# What each modality perceives (the eval checks alignment on exactly these factors).
PERCEIVES: dict[str, tuple[str, ...]] = {
    "vision": ("class", "colour", "scene", "distance"),
    "video": ("class", "colour", "scene", "distance", "motion"),
    "audio": ("class", "scene"),
    "thermal": ("class", "scene"),
    "depth": ("class", "distance"),
    "imu": ("motion",),
}
# (class, scene) pairs absent from the training split: one per class, every scene used.
HELD_OUT: frozenset[tuple[int, int]] = frozenset((c, c % len(SCENES)) for c in range(len(CLASSES)))

Split = Literal["train", "test"]

_RGB = np.array(
    [(215, 40, 40), (40, 170, 60), (45, 80, 225), (230, 205, 40), (140, 60, 195), (245, 135, 30)],
    np.float32,
)
# Muted scene palettes (sky/top, ground/bottom): backgrounds must not dominate the object.
_SCENE_TOP = np.array(
    [(92, 110, 88), (150, 175, 195), (125, 125, 132), (205, 210, 218), (30, 34, 62)], np.float32
)
_SCENE_BOTTOM = np.array(
    [(70, 85, 60), (196, 182, 140), (95, 95, 100), (228, 230, 235), (22, 24, 40)], np.float32
)
_RADIUS = np.array([0.40, 0.32, 0.25, 0.19], np.float32)  # fraction of the image side
_DEPTH_M = np.array([1.0, 1.6, 2.6, 3.6], np.float32)  # object distance per DISTANCES
_HAZE = np.array([0.0, 0.12, 0.25, 0.38], np.float32)  # per DISTANCES
_OBJ_TEMP = np.array([0.95, 0.80, 0.68, 0.88, 0.74, 0.60], np.float32)  # class temperature
# Scene ambient temperature at the top and the bottom of the thermal frame (sky, ground): two
# numbers per scene, not one, so that scenes differ in the ambient's level and in its vertical
# gradient (warm beach sand under a mild sky, a city warmer above than below, cold snow).
# With one level per scene plus a common gradient the thermal tower's scene retrieval stayed
# at 0.65 and thermal->text scene under 3x chance. All below the coolest object (0.60).
_SCENE_TEMP_TOP = np.array([0.30, 0.36, 0.52, 0.12, 0.14], np.float32)
_SCENE_TEMP_BOTTOM = np.array([0.36, 0.55, 0.38, 0.03, 0.26], np.float32)
_F0 = np.array([220.0, 294.0, 370.0, 466.0, 587.0, 740.0])  # class pitch (Hz)
_MOVE = np.array([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)], np.float32)  # (dx, dy), image axes
# Displacement over the clip, as a fraction of the side: 20 px at 64 px, more than one 16-px
# patch between the two frames the model samples. At 0.16 (10 px) contrastive stage 1 never
# learned motion (video->text 0.25, chance 0.20), at 0.25 0.43, at 0.32 0.49-0.53 (0.60 with
# 2100 stage-1 steps); 0.40 hurt colour and class (objects leave the frame).
_MOVE_FRAC = 0.32
VIDEO_FPS = 8
# Depth of the class surface pattern, as a fraction of the colour. At 0.35 a supervised probe
# of the vision tower reached 0.49 class accuracy in 200 steps, at 0.7 0.70: the pattern is
# what makes class as cheap to see as colour.
PATTERN_CONTRAST = 0.9


@dataclass
class World:
    """Raw media of ``n`` samples (arrays indexed by sample) and their factors."""

    factors: dict[str, np.ndarray]  # name -> (n,) int64 value index
    image: np.ndarray  # (n, S, S, 3) uint8: the video's first frame
    video: np.ndarray  # (n, F, S, S, 3) uint8: F = fps * clip duration frames, t = 0 .. 1
    depth_mm: np.ndarray  # (n, S, S) uint16 millimetres
    thermal: np.ndarray  # (n, S, S) uint8
    audio: np.ndarray  # (n, samples) float32 in [-1, 1], at cfg.audio_sample_rate
    imu: np.ndarray  # (n, T, 6) float32: ax, ay, az (m/s^2), gx, gy, gz (rad/s)
    captions: list[str]  # of the image (no motion)
    video_captions: list[str]  # of the video (with motion)

    def __len__(self) -> int:
        return len(self.captions)

    def held_out(self) -> np.ndarray:
        """(n,) bool: the sample's (class, scene) combination is never seen in training."""
        pairs = zip(self.factors["class"].tolist(), self.factors["scene"].tolist(), strict=True)
        return np.array([p in HELD_OUT for p in pairs], bool)


def caption(f: dict[str, int], motion: bool, drop: Sequence[str] = ()) -> str:
    """A caption naming the factors (``drop``: factors left unsaid; never the class)."""
    words = ["a"]
    if "colour" not in drop:
        words.append(COLOURS[f["colour"]])
    words.append(CLASSES[f["class"]])
    if motion and "motion" not in drop:
        words.append(MOTIONS[f["motion"]])
    if "distance" not in drop:
        words.append(DISTANCES[f["distance"]])
    if "scene" not in drop:
        words.append(f"in the {SCENES[f['scene']]}")
    return " ".join(words)


# Factors that hard-negative groups share (``nuisance_groups``): what random batches already
# teach (colour and scene are learned first), so that within a group only class, distance and
# motion differ.
NUISANCE = ("colour", "scene")


def nuisance_groups(factors: dict[str, np.ndarray], shared: Sequence[str] = NUISANCE) -> np.ndarray:
    """(n,) int64 group id: samples with the same ``shared`` factors (default: colour, scene)."""
    gid = np.zeros(len(factors["class"]), np.int64)
    for k in shared:
        gid = gid * len(FACTORS[k]) + factors[k]
    return gid


# Factors that the clips' hard-negative groups share: within a group only distance and motion
# differ, so a clip's caption can only be told from its group's by those two (in the stills'
# colour/scene groups two clips almost never differ in motion alone). Measured: IMU, which
# inherits motion from the clips, reached imu->text 0.58-0.60 with them, 0.38-0.39 without.
CLIP_SHARED = ("class", "colour", "scene")


def motion_groups(factors: dict[str, np.ndarray]) -> np.ndarray:
    """(n,) int64 group id of the clips' hard-negative groups (``CLIP_SHARED``)."""
    return nuisance_groups(factors, CLIP_SHARED)


def factor_captions(
    factors: dict[str, np.ndarray], cfg: PreprocessConfig
) -> dict[str, torch.Tensor]:
    """Token ids of factor-level captions: ``text_short`` ("a star far") and ``video_text_short``
    ("a star rising far"), which name only the factors that are not ``NUISANCE`` (class,
    distance, motion), for the auxiliary stage-1 term."""
    from encoders.transforms.text import tokenize

    n = len(factors["class"])
    rows = [{k: int(v[i]) for k, v in factors.items()} for i in range(n)]
    return {
        "text_short": tokenize([caption(f, False, drop=NUISANCE) for f in rows], cfg),
        "video_text_short": tokenize([caption(f, True, drop=NUISANCE) for f in rows], cfg),
    }


# Multiple-choice captions (``choice_captions``): per text key, the factors each row's caption
# is varied over, and the factors (besides the varied one) that its choices name. A clip picks
# its motion among "a star rising far", "a star falling far", ..., its class and distance among
# captions of the same words: 120 distinct short captions in all. Choices for stills and for
# colour too collapsed scene (0.34, model card): what the full captions teach stays with them.
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "video_text": {
        "motion": ("class", "distance"),
        "class": ("motion", "distance"),
        "distance": ("class", "motion"),
    },
}
# The motion a clip's caption is most easily mistaken for: its opposite ("still": the others
# in turn), for ``swapped_captions``.
OPPOSITE = {
    MOTIONS.index(a): MOTIONS.index(b)
    for pair in (("moving left", "moving right"), ("rising", "falling"))
    for a, b in (pair, pair[::-1])
}


def swapped_captions(world: World) -> tuple[list[str], np.ndarray]:
    """Each clip's caption with its motion replaced by the opposite one ("moving left" <->
    "moving right", "rising" <-> "falling", "still" -> each other motion in turn), and (n,)
    bool: the caption names its motion (a dropped motion has nothing to swap)."""
    out, named = [], []
    for i, cap in enumerate(world.video_captions):
        m = int(world.factors["motion"][i])
        other = OPPOSITE.get(m, 1 + i % (len(MOTIONS) - 1))
        padded = f" {cap} "
        old, new = f" {MOTIONS[m]} ", f" {MOTIONS[other]} "
        named.append(old in padded)
        out.append(padded.replace(old, new, 1).strip())
    return out, np.array(named, bool)


def choice_captions(
    factors: dict[str, np.ndarray], cfg: PreprocessConfig
) -> dict[str, torch.Tensor]:
    """Multiple-choice captions of every row, for the recipe's caption-choice term.

    For each text key and varied factor of ``CHOICES``, ``"{key}:choices:{factor}"`` holds
    (n, values, L) token ids, the row's caption with that factor set to each of its values,
    and ``"{key}:choice:{factor}"`` (n,) the index of the row's own one (its factor value):
    the keys ``recipe.CHOICES_SEP`` / ``CHOICE_SEP`` name.
    """
    from encoders.transforms.text import tokenize

    n = len(factors["class"])
    rows = [{k: int(v[i]) for k, v in factors.items()} for i in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, varied in CHOICES.items():
        for factor, named in varied.items():
            keep = {factor, *named}
            drop = [k for k in FACTORS if k not in keep]
            distinct: dict[str, int] = {}
            idx = [
                [
                    distinct.setdefault(
                        caption({**f, factor: v}, "motion" in keep, drop=drop), len(distinct)
                    )
                    for v in range(len(FACTORS[factor]))
                ]
                for f in rows
            ]
            table = tokenize(list(distinct), cfg)
            out[f"{key}:choices:{factor}"] = table[torch.tensor(idx)]
            out[f"{key}:choice:{factor}"] = torch.from_numpy(factors[factor].astype(np.int64))
    return out


def sample_factors(n: int, rng: np.random.Generator, split: Split) -> dict[str, np.ndarray]:
    """Uniform factors; the train split redraws the held-out (class, scene) pairs."""
    f = {k: rng.integers(0, len(v), n) for k, v in FACTORS.items()}
    if split == "train":
        while True:
            bad = np.array(
                [(c, s) in HELD_OUT for c, s in zip(f["class"], f["scene"], strict=True)], bool
            )
            if not bad.any():
                break
            f["scene"][bad] = rng.integers(0, len(SCENES), int(bad.sum()))
    return f


def generate(
    n: int,
    cfg: PreprocessConfig,
    seed: int = 0,
    split: Split = "train",
    chunk: int = 100,
    caption_dropout: float = 0.0,
    progress: bool = False,
    video_frames: int | None = None,
    start: int = 0,
    stop: int | None = None,
) -> World:
    """``n`` samples of the world, rendered in chunks, reproducible from ``seed``.

    Args:
        video_frames: frames rendered per video, evenly over the clip; None renders the
            file's ``VIDEO_FPS`` frames per second, ``cfg.video_frames`` just those a loader
            picks (for training in memory; the pixel noise differs, not its distribution).
        start, stop: render only samples ``[start, stop)`` of the ``n`` (the same ones, bit
            for bit, as in the whole world): for writing large worlds in slices.
        caption_dropout: probability that each of colour, distance, scene (and motion) goes
            unsaid in a caption, for training text robust to partial descriptions.
    """
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    stop = n if stop is None else min(stop, n)
    if chunk < 1 or start < 0 or start % chunk:
        raise ValueError(f"chunk must be >= 1 and start a multiple of it, got {chunk}, {start}")
    factors = {k: v[start:stop] for k, v in sample_factors(n, rng, split).items()}
    parts: list[World] = []
    bar = tqdm(total=stop - start, desc=f"world {split}", unit="sample", disable=not progress)
    for lo in range(start, stop, chunk):
        sub = {k: v[lo - start : lo - start + chunk] for k, v in factors.items()}
        chunk_rng = np.random.default_rng([seed, 2, lo])
        parts.append(_render_chunk(sub, cfg, chunk_rng, caption_dropout, video_frames))
        bar.update(len(sub["class"]))
    bar.close()
    if not parts:
        parts.append(
            _render_chunk(
                {k: v[:0] for k, v in factors.items()},
                cfg,
                np.random.default_rng(0),
                0.0,
                video_frames,
            )
        )
    return World(
        factors=factors,
        image=np.concatenate([p.image for p in parts]),
        video=np.concatenate([p.video for p in parts]),
        depth_mm=np.concatenate([p.depth_mm for p in parts]),
        thermal=np.concatenate([p.thermal for p in parts]),
        audio=np.concatenate([p.audio for p in parts]),
        imu=np.concatenate([p.imu for p in parts]),
        captions=[c for p in parts for c in p.captions],
        video_captions=[c for p in parts for c in p.video_captions],
    )


# ----------------------------------------------------------------------------- rendering


def _masks(cls: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S) float32 coverage of each object (2x2 supersampled edges)."""
    ss = 2
    g = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    dx = g[None, None, :] - cx[:, None, None]  # (n, 1, S*ss)
    dy = g[None, :, None] - cy[:, None, None]  # (n, S*ss, 1)
    dx, dy = np.broadcast_arrays(dx, dy)
    rr = r[:, None, None]
    d = np.hypot(dx, dy)
    out = np.zeros(dx.shape, bool)
    for k in range(len(CLASSES)):
        sel = cls == k
        if not sel.any():
            continue
        x, y, dd, rk = dx[sel], dy[sel], d[sel], rr[sel]
        if k == 0:  # circle
            m = dd < rk
        elif k == 1:  # square
            m = np.maximum(np.abs(x), np.abs(y)) < 0.82 * rk
        elif k == 2:  # triangle, apex up
            t = (y + rk) / (1.85 * rk)
            m = (t >= 0) & (t <= 1) & (np.abs(x) < t * 0.95 * rk)
        elif k == 3:  # five-pointed star
            theta = np.arctan2(y, x) + np.pi / 2
            m = dd < rk * (0.62 + 0.38 * np.cos(5 * theta))
        elif k == 4:  # cross
            w = 0.3 * rk
            m = ((np.abs(x) < w) & (np.abs(y) < rk)) | ((np.abs(y) < w) & (np.abs(x) < rk))
        else:  # ring
            m = (dd < rk) & (dd > 0.55 * rk)
        out[sel] = m
    n = len(cls)
    cover: np.ndarray = out.reshape(n, size, ss, size, ss).mean(axis=(2, 4)).astype(np.float32)
    return cover


def _background(scene: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S, S, 3) float32 muted scene backgrounds with a little scene-typical texture."""
    n = len(scene)
    v = np.linspace(0, 1, size, dtype=np.float32)[None, :, None, None]  # (1, S, 1, 1)
    horizon = 0.45 + 0.1 * rng.random((n, 1, 1, 1), dtype=np.float32)
    w = 1 / (1 + np.exp(-(v - horizon) * 14))  # 0 top .. 1 bottom
    top, bottom = _SCENE_TOP[scene][:, None, None], _SCENE_BOTTOM[scene][:, None, None]
    bg = np.broadcast_to(top * (1 - w) + bottom * w, (n, size, size, 3)).copy()
    x = np.arange(size, dtype=np.float32)
    for i, s in enumerate(scene):
        if s == 0:  # forest: dark vertical trunks
            for c in rng.integers(0, size, 4):
                bg[i, :, max(c - 1, 0) : c + 1] *= 0.8
        elif s == 2:  # city: building blocks on the skyline
            for c in rng.integers(0, size, 3):
                h = int(rng.integers(size // 5, size // 2))
                bg[i, size // 2 - h : size // 2, max(c - 4, 0) : c + 4] *= 0.85
        elif s == 4:  # night: stars
            ys, xs = rng.integers(0, size // 2, 8), rng.integers(0, size, 8)
            bg[i, ys, xs] = 180
        elif s == 1:  # beach: waves at the horizon
            row = int(horizon[i, 0, 0, 0] * size)
            bg[i, row : row + 2] += 12 * np.sin(x / 3)[:, None]
    return bg


def _render_frames(
    f: dict[str, np.ndarray],
    t: float,
    cx: np.ndarray,
    cy: np.ndarray,
    r: np.ndarray,
    bg: np.ndarray,
    shade: np.ndarray,
    size: int,
) -> np.ndarray:
    """Frame at time ``t`` in [0, 1] of the clip: (n, S, S, 3) float32."""
    move = _MOVE[f["motion"]] * _MOVE_FRAC * size * t
    ox, oy = cx + move[:, 0], cy + move[:, 1]
    m = _masks(f["class"], ox, oy, r, size)[..., None]
    colour = (_RGB[f["colour"]] * shade[:, None])[:, None, None]  # (n, 1, 1, 3)
    # Each class has its own surface pattern (a painted ball is not a striped box), fixed to
    # the object so it moves with it; it makes class as visible as colour, not only shape.
    colour = colour * (1 - PATTERN_CONTRAST * _pattern(f["class"], ox, oy, size))[..., None]
    # Aerial perspective: farther objects fade towards the scene's average colour.
    haze = _HAZE[f["distance"]][:, None, None, None]
    colour = colour * (1 - haze) + bg.mean(axis=(1, 2), keepdims=True) * haze
    frame: np.ndarray = bg * (1 - m) + colour * m
    return frame


def _pattern(cls: np.ndarray, ox: np.ndarray, oy: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S) in [0, 1]: the class's surface pattern, in object coordinates."""
    g = np.arange(size, dtype=np.float32)
    x = g[None, None, :] - ox[:, None, None]
    y = g[None, :, None] - oy[:, None, None]
    x, y = np.broadcast_arrays(x, y)
    period = 5.0
    out = np.zeros(x.shape, np.float32)
    k = cls[:, None, None]
    stripes_h = (np.floor(y / period) % 2).astype(np.float32)
    stripes_v = (np.floor(x / period) % 2).astype(np.float32)
    checker = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    diagonal = (np.floor((x + y) / (1.4 * period)) % 2).astype(np.float32)
    dots = (np.mod(x, period) - period / 2) ** 2 + (np.mod(y, period) - period / 2) ** 2 < 2.5
    out = np.where(k == 1, stripes_h, out)
    out = np.where(k == 2, stripes_v, out)
    out = np.where(k == 3, checker, out)
    out = np.where(k == 4, diagonal, out)
    out = np.where(k == 5, dots.astype(np.float32), out)
    return out


def centred_images(
    factors: dict[str, np.ndarray], size: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, S, S, 3) uint8: each sample's object, centred, unshaded, in its scene at t = 0."""
    n = len(factors["class"])
    centre = np.full(n, size / 2, np.float32)
    r = _RADIUS[factors["distance"]] * size
    bg = _background(factors["scene"], size, rng)
    frame = _render_frames(factors, 0.0, centre, centre, r, bg, np.ones(n, np.float32), size)
    out: np.ndarray = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out


def _render_chunk(
    f: dict[str, np.ndarray],
    cfg: PreprocessConfig,
    rng: np.random.Generator,
    drop_p: float,
    video_frames: int | None,
) -> World:
    n = len(f["class"])
    S = cfg.image_size
    r = _RADIUS[f["distance"]] * S * rng.uniform(0.93, 1.07, n).astype(np.float32)
    # Centre so that the object stays inside the frame over its whole motion.
    move = _MOVE[f["motion"]] * _MOVE_FRAC * S
    lo_x = r + np.maximum(-move[:, 0], 0) + 1
    hi_x = S - r - np.maximum(move[:, 0], 0) - 1
    lo_y = r + np.maximum(-move[:, 1], 0) + 1
    hi_y = S - r - np.maximum(move[:, 1], 0) - 1
    cx = (lo_x + (hi_x - lo_x).clip(0) * rng.random(n)).astype(np.float32)
    cy = (lo_y + (hi_y - lo_y).clip(0) * rng.random(n)).astype(np.float32)
    shade = rng.uniform(0.85, 1.1, n).astype(np.float32)

    video_rng, rng = rng.spawn(2)
    bg = _background(f["scene"], S, rng)
    # A file holds fps * duration frames, the first at t = 0 and the last at t = 1 of the
    # motion: a loader's 2-frame clip of that duration then picks the frames rendered in memory
    # for ``cfg.video_frames=2`` (with one frame more, its last frame stopped short of t = 1,
    # 2.5 px off the in-memory one at this motion).
    frames_n = video_frames or max(round(VIDEO_FPS * cfg.video_clip_duration), 1)
    video = np.empty((n, frames_n, S, S, 3), np.uint8)
    for k in range(frames_n):
        fr = _render_frames(f, k / max(frames_n - 1, 1), cx, cy, r, bg, shade, S)
        fr += video_rng.normal(0, 3, fr.shape).astype(np.float32)
        video[:, k] = np.clip(np.rint(fr), 0, 255).astype(np.uint8)
    image = video[:, 0].copy()

    # Depth: a ground plane rising to a wall at 6 m, the object's silhouette at its distance.
    v = np.linspace(0, 1, S, dtype=np.float32)[:, None]
    ground = np.where(v > 0.45, 1.4 / np.maximum(v - 0.2, 0.23), 6.0)  # metres, (S, 1)
    m0 = _masks(f["class"], cx, cy, r, S)
    obj_d = _DEPTH_M[f["distance"]][:, None, None]
    depth = np.broadcast_to(np.minimum(ground, 6.0), (n, S, S)).astype(np.float32)
    depth = np.where(m0 > 0.5, obj_d, depth)
    depth = depth * (1 + rng.normal(0, 0.01, depth.shape).astype(np.float32))
    depth_mm = np.clip(np.rint(depth * 1000), 1, 65535).astype(np.uint16)

    # Thermal: the scene's ambient (top to bottom), the object at its class temperature.
    top = _SCENE_TEMP_TOP[f["scene"]][:, None, None]
    bottom = _SCENE_TEMP_BOTTOM[f["scene"]][:, None, None]
    amb = top + (bottom - top) * np.broadcast_to(v, (S, S))[None]
    th = amb + rng.normal(0, 0.02, (n, S, S)).astype(np.float32)
    th = th * (1 - m0) + _OBJ_TEMP[f["class"]][:, None, None] * m0
    th = (th + np.roll(th, 1, 1) + np.roll(th, 1, 2) + np.roll(th, (1, 1), (1, 2))) / 4
    thermal = np.clip(np.rint(th * 255), 0, 255).astype(np.uint8)

    audio = _audio(f, cfg, rng)
    imu = _imu(f, cfg, rng)

    caps, vcaps = [], []
    for i in range(n):
        fi = {k: int(a[i]) for k, a in f.items()}
        drop = [k for k in ("colour", "distance", "scene", "motion") if rng.random() < drop_p]
        caps.append(caption(fi, motion=False, drop=drop))
        vcaps.append(caption(fi, motion=True, drop=drop))
    return World(dict(f), image, video, depth_mm, thermal, audio, imu, caps, vcaps)


def _audio(f: dict[str, np.ndarray], cfg: PreprocessConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, samples) float32: the object's voice over the scene's ambience, one vector op each.

    Phases are wrapped (mod 2 pi) before ``sin`` so float32 stays exact over the clip.
    """
    n, sr = len(f["class"]), cfg.audio_sample_rate
    T = round(sr * cfg.audio_clip_duration)
    t = np.arange(T, dtype=np.float64)[None] / sr  # (1, T)
    cls, scene = f["class"], f["scene"]
    f0 = _F0[cls][:, None] * rng.uniform(0.98, 1.02, (n, 1))
    two_pi = 2 * np.pi
    voice = np.zeros((n, T))
    # Timbre per class: harmonic amplitudes 1/k^p, p from 0.6 (bright) to 2.4 (pure).
    p = (0.6 + 0.36 * cls)[:, None]
    for k in range(1, 6):
        ok = (k * f0) < sr / 2
        voice += ok * np.sin(np.mod(two_pi * k * f0 * t, two_pi)) / k**p
    # Rhythm per class: pulsing at 2..7 Hz.
    rate = (2 + cls)[:, None]
    voice *= 0.55 + 0.45 * np.sin(np.mod(two_pi * rate * t + rng.random((n, 1)) * two_pi, two_pi))
    voice *= 0.25

    noise = rng.standard_normal((n, T))
    amb = np.zeros((n, T))
    for s in range(len(SCENES)):
        sel = scene == s
        if not sel.any():
            continue
        m, z = int(sel.sum()), noise[sel]
        ts = t.repeat(m, 0)
        if s == 0:  # forest: bird chirps, upward sweeps near 2.5 kHz, 3 per second
            ph = rng.random((m, 1))
            gate = np.mod(ts * 3 + ph, 1.0) < 0.12
            sweep = 2200 + 1500 * np.mod(ts * 3 + ph, 1.0)
            a = 0.25 * gate * np.sin(np.mod(two_pi * sweep * ts, two_pi)) + 0.01 * z
        elif s == 1:  # beach: low rumbling surf, slowly swelling
            lp = np.cumsum(z, axis=1)
            lp = lp - np.mean(lp, axis=1, keepdims=True)
            lp = lp / (np.abs(lp).max(axis=1, keepdims=True) + 1e-9)
            a = 0.3 * lp * (0.6 + 0.4 * np.sin(two_pi * 0.7 * ts + rng.random((m, 1)) * 6))
            a += 0.04 * z
        elif s == 2:  # city: 100 Hz hum and broadband traffic
            a = 0.12 * np.sin(np.mod(two_pi * 100 * ts, two_pi)) + 0.08 * z
        elif s == 3:  # snow: near silence, a faint high wind
            a = 0.015 * (z - np.roll(z, 1, axis=1))
        else:  # night: crickets, 3.4 kHz chirping at 14 Hz
            gate = np.mod(ts * 14 + rng.random((m, 1)), 1.0) < 0.4
            a = 0.18 * gate * np.sin(np.mod(two_pi * 3400 * ts, two_pi)) + 0.005 * z
        amb[sel] = a
    out = (voice + amb) * rng.uniform(0.7, 1.0, (n, 1))
    return np.clip(out, -1, 1).astype(np.float32)


def _imu(f: dict[str, np.ndarray], cfg: PreprocessConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, samples, 6): gravity, the motion's acceleration pattern, gyro jitter, noise."""
    n, T = len(f["motion"]), cfg.imu_samples
    u = np.linspace(0, 1, T)[None]  # (1, T) over the trace
    acc = np.zeros((n, T, 3))
    acc[:, :, 2] = 9.81
    gyro = rng.normal(0, 0.02, (n, T, 3))
    mv = f["motion"]
    # Horizontal moves: accelerate then brake along x (sign = direction), with a sway in gyro z.
    # Vertical moves: the same along z, with a pitch (gyro y) signature.
    burst = np.sin(2 * np.pi * u) * 3.0  # accelerate, then decelerate
    for k, (dx, dy) in enumerate(_MOVE):
        sel = mv == k
        if not sel.any():
            continue
        m = int(sel.sum())
        g = rng.uniform(0.8, 1.2, (m, 1))
        if dx:
            acc[sel, :, 0] += dx * burst * g
            gyro[sel, :, 2] += dx * 0.8 * np.sin(np.pi * u) * g
        if dy:
            acc[sel, :, 2] -= dy * burst * g  # image y grows downwards; rising = +z
            gyro[sel, :, 1] += -dy * 0.8 * np.sin(np.pi * u) * g
        if not (dx or dy):
            acc[sel] += rng.normal(0, 0.05, (m, T, 3))
    acc += rng.normal(0, 0.15, acc.shape)
    return np.concatenate([acc, gyro], axis=2).astype(np.float32)


# ----------------------------------------------------------------------------- model inputs


def _norm_images(x: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float32, op for op as ``load_image``."""
    t = torch.from_numpy(x).movedim(-1, -3).to(torch.float32).div(255)
    shape = (3, 1, 1)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(shape)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(shape)
    return t.sub(mean).div(std).contiguous()


def image_batch(images: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, S, S): what ``load_image`` gives for the same PNG pixels."""
    return _norm_images(images, cfg)


def clip_batch(clips: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """(n, T, S, S, 3) uint8 -> (n, 1, 3, T, S, S): one clip per video, as the vision tower takes.

    Normalisation order (divide, subtract, divide) is ``load_video``'s; at the model's size
    its bilinear resize is the identity and the three crops coincide.
    """
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).to(torch.float32) / 255.0  # (n,3,T,S,S)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None, None]
    return x.sub(mean).div(std)[:, None].contiguous()


def clip_frames(world: World, cfg: PreprocessConfig) -> np.ndarray:
    """(n, T, S, S, 3) uint8: the frames ``load_video`` picks from the written clip."""
    F = world.video.shape[1]
    idx = torch.linspace(0, F - 1, cfg.video_frames).long().tolist()
    return world.video[:, idx]


def audio_batch(waves: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """(n, samples) one-clip-long waveforms -> (n, clips, 1, bins, T), as ``load_audio``.

    ``load_audio`` step for step, batched: a file no longer than one clip gives ``clips``
    identical clips covering all of it; DC removal, then the Kaldi fbank of
    ``waveform_to_fbank``, length fitting and normalisation. ~100x faster than a loop.
    """
    from encoders.transforms.audio import kaldi_fbank

    x = torch.from_numpy(np.ascontiguousarray(waves, np.float32))  # (n, N)
    x = x - x.mean(dim=1, keepdim=True)
    mel = kaldi_fbank(x, cfg.audio_sample_rate, cfg.audio_mel_bins)  # (n, M, bins)
    mel = mel.transpose(1, 2)  # (n, bins, M)
    T = cfg.audio_target_length
    mel = torch.nn.functional.pad(mel, (0, T - mel.shape[2])) if mel.shape[2] < T else mel[..., :T]
    y = mel[:, None, None].expand(-1, cfg.audio_clips, 1, -1, -1)  # (n, clips, 1, bins, T)
    mean = torch.tensor(cfg.audio_mean, dtype=torch.float32)
    std = torch.tensor(cfg.audio_std, dtype=torch.float32)
    return ((y - mean) / std).contiguous()


def to_model_inputs(
    world: World, cfg: PreprocessConfig, modalities: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Model-ready tensors for every modality, through the real loaders' arithmetic.

    Returns {"vision": (n,3,S,S), "video": (n,1,3,T,S,S), "text": (n,L) ids of the image
    captions, "video_text": ids of the video captions, "audio": (n,clips,1,F,T),
    "depth"/"thermal": (n,1,S,S), "imu": (n,6,samples)}.
    """
    from encoders.transforms.audio import load_audio
    from encoders.transforms.depth import load_depth
    from encoders.transforms.imu import load_imu
    from encoders.transforms.text import tokenize
    from encoders.transforms.thermal import load_thermal

    want = set(modalities) if modalities is not None else None

    def on(m: str) -> bool:
        return want is None or m in want

    out: dict[str, torch.Tensor] = {}
    if on("vision"):
        out["vision"] = image_batch(world.image, cfg)
    if on("video"):
        out["video"] = clip_batch(clip_frames(world, cfg), cfg)
    if on("text"):
        out["text"] = tokenize(world.captions, cfg)
        out["video_text"] = tokenize(world.video_captions, cfg)
    sr = cfg.audio_sample_rate
    if on("audio"):
        if world.audio.shape[1] == round(sr * cfg.audio_clip_duration):
            out["audio"] = audio_batch(world.audio, cfg)
        else:
            out["audio"] = torch.stack([load_audio((a, sr), cfg) for a in world.audio])
    if on("depth"):
        out["depth"] = torch.stack([load_depth(d, cfg) for d in world.depth_mm])
    if on("thermal"):
        out["thermal"] = torch.stack([load_thermal(t, cfg) for t in world.thermal])
    if on("imu"):
        out["imu"] = torch.stack([load_imu(x, cfg, rate_hz=IMU_RATE_HZ) for x in world.imu])
    return out


# ----------------------------------------------------------------------------- files


def write_world(
    out: str | Path,
    n: int,
    cfg: PreprocessConfig,
    seed: int = 0,
    split: Split = "test",
    chunk: int = 100,
    progress: bool = True,
) -> Path:
    """Write ``n`` samples as real files plus ``manifest.jsonl``; returns the manifest path.

    Layout: ``image/*.png`` (RGB), ``depth/*.png`` (16-bit, millimetres), ``thermal/*.png``
    (8-bit), ``audio/*.wav`` (16-bit PCM), ``video/*.mp4`` (H.264 with an AAC soundtrack, the
    same sound as the audio file), ``imu/*.csv`` (t, ax, ay, az, gx, gy, gz). One JSON row per
    sample names its files (relative paths), captions and factors, so the file is at once an
    index corpus manifest and a training manifest of pairs (see ``train.recipe``).
    """
    root = Path(out)
    for sub in ("image", "depth", "thermal", "audio", "video", "imu"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.jsonl"
    bar = tqdm(total=n, desc="demo world", unit="sample", disable=not progress)
    with open(manifest, "w", encoding="utf-8") as fh:
        for start, world in _chunks(n, cfg, seed, split, chunk):
            for i in range(len(world)):
                rows = _write_sample(root, start + i, world, i, cfg)
                fh.write(json.dumps(rows) + "\n")
                bar.update(1)
    bar.close()
    return manifest


def write_demo_world(
    out: Path,
    n: int = 200,
    seed: int = 0,
    split: Split = "test",
    preset: str | None = None,
    progress: bool = True,
) -> Path:
    """``write_world`` at the input sizes of ``preset`` (default: the default model's).

    What ``bindsearch demo world`` and the service's first start write; the manifest path.
    """
    from encoders.config import resolve_config
    from encoders.models import DEFAULT_MODEL

    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    cfg = resolve_config(preset or DEFAULT_MODEL).preprocess
    return write_world(out, n, cfg, seed=seed, split=split, progress=progress)


def _chunks(
    n: int, cfg: PreprocessConfig, seed: int, split: Split, chunk: int
) -> Iterator[tuple[int, World]]:
    # One world in memory would hold every video: render slices of the same world instead.
    step = max(chunk, 1) * 5
    for start in range(0, n, step):
        yield start, generate(n, cfg, seed, split, chunk, start=start, stop=start + step)


def _write_sample(
    root: Path, idx: int, w: World, i: int, cfg: PreprocessConfig
) -> dict[str, object]:
    import soundfile
    from PIL import Image

    name = f"{idx:06d}"
    paths = {
        "image": f"image/{name}.png",
        "depth": f"depth/{name}.png",
        "thermal": f"thermal/{name}.png",
        "audio": f"audio/{name}.wav",
        "video": f"video/{name}.mp4",
        "imu": f"imu/{name}.csv",
    }
    Image.fromarray(w.image[i], mode="RGB").save(root / paths["image"])
    Image.fromarray(w.depth_mm[i]).save(root / paths["depth"])  # uint16 -> 16-bit PNG
    Image.fromarray(w.thermal[i], mode="L").save(root / paths["thermal"])
    soundfile.write(root / paths["audio"], w.audio[i], cfg.audio_sample_rate, subtype="PCM_16")
    _write_mp4(root / paths["video"], w.video[i], w.audio[i], cfg.audio_sample_rate)
    rate = IMU_RATE_HZ
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["t", "ax", "ay", "az", "gx", "gy", "gz"])
    for k, row in enumerate(w.imu[i]):
        writer.writerow([f"{k / rate:.6f}", *(f"{v:.5f}" for v in row)])
    (root / paths["imu"]).write_text(buf.getvalue(), encoding="utf-8")
    factors = {k: FACTORS[k][int(v[i])] for k, v in w.factors.items()}
    c, s = int(w.factors["class"][i]), int(w.factors["scene"][i])
    return {
        "id": name,
        **paths,
        "text": w.captions[i],
        "video_text": w.video_captions[i],
        "factors": factors,
        "held_out": (c, s) in HELD_OUT,
    }


def _write_mp4(path: Path, frames: np.ndarray, audio: np.ndarray, sr: int) -> None:
    """(F, S, S, 3) uint8 frames at ``VIDEO_FPS`` plus a mono soundtrack -> MP4."""
    import av

    with av.open(str(path), mode="w") as container:
        vs = container.add_stream("libx264", rate=VIDEO_FPS)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv444p"  # no chroma subsampling: small frames keep their colours
        vs.options = {"crf": "12", "preset": "veryfast"}
        aus = container.add_stream("aac", rate=sr)
        aus.layout = "mono"
        for fr in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        pcm = av.AudioFrame.from_ndarray(
            audio[None].astype(np.float32), format="flt", layout="mono"
        )
        pcm.sample_rate = sr
        for packet in aus.encode(pcm):
            container.mux(packet)
        for packet in aus.encode():
            container.mux(packet)


def chance(factor: str) -> float:
    """Chance accuracy of a uniform factor."""
    return 1.0 / len(FACTORS[factor])
