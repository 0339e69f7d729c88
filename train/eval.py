"""``bindsearch demo eval``: what a model trained on the demo world has (and has not) learned.

All measured on a held-out test split of the world (a different seed; every (class, scene)
combination, including those never seen in training):

- stage 1, in domain: zero-shot classification image -> text prompts per factor (video for
  motion), and image <-> caption retrieval.
- each modality -> image retrieval: the factors of the nearest image (video for IMU).
- emergent: the same modalities classified by text prompts (they never saw text), and
  retrieval between two non-image modalities (audio -> depth, ...), on shared factors.
- arithmetic: an image of class A in scene S1 plus the sound of (another class in) scene S2
  should retrieve images of A in S2; the combined query against each term alone, for several
  weightings, on held-out and on seen target combinations.

A text prompt for a factor value is an ensemble (CLIP-style): the mean embedding of every full
caption with that value, over all values of the other factors the caption names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from encoders.model import ImageBind
from evaluation import LabelSet, retrieval_metrics, zero_shot_accuracy
from evaluation import prompt_classifiers as prompt_classifiers_from
from world.world import (
    FACTORS,
    HELD_OUT,
    PERCEIVES,
    World,
    generate,
    to_model_inputs,
)

__all__ = ["ARITH_WEIGHTS", "Thresholds", "check", "embed_world", "evaluate", "format_report"]

NON_IMAGE = ("audio", "depth", "thermal", "imu")
# Gallery each modality retrieves from ("image" retrieval): IMU moves with the video.
GALLERY = {"audio": "vision", "depth": "vision", "thermal": "vision", "imu": "video"}
CROSS_PAIRS = (
    ("audio", "depth"),
    ("depth", "audio"),
    ("audio", "thermal"),
    ("thermal", "audio"),
    ("thermal", "depth"),
    ("depth", "thermal"),
)
# Weight of the audio term relative to the image term, each centred and unit-normalised.
ARITH_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Thresholds:
    """The issue's Done-when bars."""

    stage1_zero_shot: float = 0.8
    emergent_x_chance: float = 3.0
    emergent_vs_retrieval: float = 0.8
    arithmetic_x_chance: float = 5.0


@torch.no_grad()
def embed_world(model: ImageBind, world: World, batch: int = 256) -> dict[str, np.ndarray]:
    """Unit embeddings (n, D) of every modality of the world (text: the full captions)."""
    p = model.cfg.preprocess
    inputs = to_model_inputs(world, p)
    out: dict[str, np.ndarray] = {}
    model.eval()
    for key, x in inputs.items():
        tower = {"video": "vision", "video_text": "text"}.get(key, key)
        if tower not in {m.value for m in model.modalities}:
            continue
        parts = [
            model.embed_one(tower, x[i : i + batch], scaled=False).float()
            for i in range(0, len(x), batch)
        ]
        out[key] = torch.cat(parts).numpy()
    return out


@torch.no_grad()
def _embed_texts(model: ImageBind, texts: Sequence[str], batch: int = 512) -> np.ndarray:
    from encoders.transforms.text import tokenize, trim_to_longest

    p = model.cfg.preprocess
    parts = []
    for i in range(0, len(texts), batch):
        ids = trim_to_longest(tokenize(list(texts[i : i + batch]), p))
        parts.append(model.embed_one("text", ids, scaled=False).float())
    return torch.cat(parts).numpy()


# The caption templates of ``world.caption`` (stills; clips name the motion): a factor's
# prompt is this template with every value of the other factors it names (an ensemble).
CAPTION_TEMPLATE = "a {colour} {class} {distance} in the {scene}"
VIDEO_CAPTION_TEMPLATE = "a {colour} {class} {motion} {distance} in the {scene}"


def prompt_classifiers(model: ImageBind, motion: bool) -> dict[str, np.ndarray]:
    """Per factor, (values, D) unit text classifiers from caption ensembles."""
    named = ["class", "colour", "scene", "distance"] + (["motion"] if motion else [])
    template = VIDEO_CAPTION_TEMPLATE if motion else CAPTION_TEMPLATE
    return prompt_classifiers_from(
        lambda texts: _embed_texts(model, texts), [template], {k: FACTORS[k] for k in named}
    )


def _labels(f: dict[str, np.ndarray], keys: Sequence[str]) -> LabelSet:
    return LabelSet.from_codes({k: f[k] for k in keys}, {k: FACTORS[k] for k in keys})


def _top1_by_factor(
    q: np.ndarray, g: np.ndarray, f: dict[str, np.ndarray], keys: Sequence[str]
) -> dict[str, float]:
    """Per factor, how often the nearest gallery item shares the query's value (recall@1)."""
    labels = _labels(f, keys)
    got = retrieval_metrics(q, g, labels, labels, ks=(1,), keys=keys)
    return {k: got.by_key[k][1].value for k in keys}


def evaluate(
    model: ImageBind,
    n: int = 600,
    seed: int = 1234,
    arith_queries: int = 400,
    weights: Sequence[float] = ARITH_WEIGHTS,
) -> dict[str, Any]:
    """Every metric of the module docstring on a fresh ``n``-sample test world."""
    p = model.cfg.preprocess
    world = generate(n, p, seed=seed, split="test", video_frames=p.video_frames)
    E = embed_world(model, world)
    f = world.factors
    report: dict[str, Any] = {"n": n, "seed": seed}

    # -- zero-shot from text prompts
    zs_img = prompt_classifiers(model, motion=False)
    zs_vid = prompt_classifiers(model, motion=True)
    zero_shot: dict[str, dict[str, float]] = {}
    for m, factors in PERCEIVES.items():
        if m not in E:
            continue
        clf = zs_vid if m in ("video", "imu") else zs_img
        truth = _labels(f, factors)
        zero_shot[m] = {k: zero_shot_accuracy(E[m], clf[k], truth.member[k]).value for k in factors}
    report["zero_shot"] = zero_shot

    # -- image <-> caption retrieval (in domain): top-1 has the same factors
    if "vision" in E and "text" in E:
        img_f = ("class", "colour", "scene", "distance")
        labels = _labels(f, img_f)
        both = {
            "image->text all factors": retrieval_metrics(E["vision"], E["text"], labels, labels),
            "text->image all factors": retrieval_metrics(E["text"], E["vision"], labels, labels),
        }
        report["image_text_retrieval"] = {name: m.recall[1].value for name, m in both.items()}

    # -- each modality -> image: factors of the nearest image
    to_image: dict[str, dict[str, float]] = {}
    for m in NON_IMAGE:
        g = GALLERY[m]
        if m not in E or g not in E:
            continue
        to_image[m] = _top1_by_factor(E[m], E[g], f, PERCEIVES[m])
    report["to_image"] = to_image

    # -- emergent modality -> modality, on shared factors
    cross: dict[str, dict[str, float]] = {}
    for a, b in CROSS_PAIRS:
        if a not in E or b not in E:
            continue
        shared = [k for k in PERCEIVES[a] if k in PERCEIVES[b]]
        cross[f"{a}->{b}"] = _top1_by_factor(E[a], E[b], f, shared)
    report["cross_modal"] = cross

    # -- held-out (class, scene) combinations against seen ones
    held = world.held_out()
    split: dict[str, dict[str, float]] = {}
    for m in ("vision", "audio", "thermal"):
        if m not in E:
            continue
        for k in ("class", "scene"):
            pred = (E[m] @ zs_img[k].T).argmax(1)
            split[f"{m} zero-shot {k}"] = {
                "held_out": float(np.mean(pred[held] == f[k][held]))
                if held.any()
                else float("nan"),
                "seen": float(np.mean(pred[~held] == f[k][~held])),
            }
    report["held_out_vs_seen"] = split

    if "vision" in E and "audio" in E:
        report["arithmetic"] = arithmetic(E, f, arith_queries, seed, weights)
    return report


def _centre(x: np.ndarray) -> np.ndarray:
    """Remove the modality's mean direction (the 'modality gap'), renormalise."""
    y = x - x.mean(0, keepdims=True)
    return np.asarray(y / np.linalg.norm(y, axis=1, keepdims=True))


def arithmetic(
    E: dict[str, np.ndarray],
    f: dict[str, np.ndarray],
    queries: int,
    seed: int,
    weights: Sequence[float],
) -> dict[str, Any]:
    """image(A, S1) + audio(B, S2) -> images of (A, S2): top-5 hit rate by weighting.

    Half of the queries target a held-out (class, scene) pair. The gallery is every test
    image but the query's own.
    """
    rng = np.random.default_rng([seed, 7])
    cls, scene = f["class"], f["scene"]
    n = len(cls)
    pairs: list[tuple[int, int]] = []
    want_held = queries // 2
    tries = 0
    while len(pairs) < queries and tries < queries * 200:
        tries += 1
        i, j = (int(v) for v in rng.integers(0, n, 2))
        if cls[i] == cls[j] or scene[i] == scene[j]:
            continue
        is_held = (int(cls[i]), int(scene[j])) in HELD_OUT
        n_held = sum((int(cls[a]), int(scene[b])) in HELD_OUT for a, b in pairs)
        if is_held != (n_held < want_held):
            continue
        pairs.append((i, j))
    qi = np.array([p[0] for p in pairs])
    qj = np.array([p[1] for p in pairs])
    target = (cls[None, :] == cls[qi][:, None]) & (scene[None, :] == scene[qj][:, None])  # (Q, n)
    held = np.array([(int(cls[i]), int(scene[j])) in HELD_OUT for i, j in pairs])
    chance = target.sum(1) / (n - 1)

    img, aud = E["vision"], E["audio"]
    img_c, aud_c = _centre(img), _centre(aud)

    def top5(q: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        sims = q @ gallery.T
        sims[np.arange(len(qi)), qi] = -np.inf  # never the query image itself
        top = np.argsort(-sims, axis=1)[:, :5]
        return np.asarray(np.take_along_axis(target, top, axis=1).mean(1))

    def summary(hits: np.ndarray) -> dict[str, float]:
        return {
            "all": float(hits.mean()),
            "held_out": float(hits[held].mean()) if held.any() else float("nan"),
            "seen": float(hits[~held].mean()),
        }

    out: dict[str, Any] = {
        "queries": len(pairs),
        "chance": float(chance.mean()),
        "image_only": summary(top5(img[qi], img)),
        "audio_only": summary(top5(aud[qj], img)),
        "image_only_centred": summary(top5(img_c[qi], img_c)),
        "audio_only_centred": summary(top5(aud_c[qj], img_c)),
    }
    plain = img[qi] + aud[qj]
    out["sum"] = summary(top5(plain / np.linalg.norm(plain, axis=1, keepdims=True), img))
    for w in weights:
        q = img[qi] + w * aud[qj]
        out[f"weighted audio x{w:g}"] = summary(
            top5(q / np.linalg.norm(q, axis=1, keepdims=True), img)
        )
        qc = img_c[qi] + w * aud_c[qj]
        out[f"centred audio x{w:g}"] = summary(
            top5(qc / np.linalg.norm(qc, axis=1, keepdims=True), img_c)
        )
    return out


def best_arithmetic(arith: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The combined-query weighting with the highest hit rate (all queries)."""
    combos = {k: v for k, v in arith.items() if k.startswith(("sum", "weighted", "centred"))}
    name = max(combos, key=lambda k: combos[k]["all"])
    return name, combos[name]


def check(
    report: dict[str, Any], th: Thresholds = Thresholds(), arith_key: str | None = None
) -> list[str]:
    """The Done-when bars that ``report`` misses (empty: all met)."""
    fails: list[str] = []
    zs = report["zero_shot"]
    for m in ("vision", "video"):
        for k, acc in zs.get(m, {}).items():
            if acc < th.stage1_zero_shot:
                fails.append(f"stage 1: {m}->text {k} {acc:.3f} < {th.stage1_zero_shot}")
    for m in NON_IMAGE:
        for k, acc in zs.get(m, {}).items():
            c = 1.0 / len(FACTORS[k])
            if acc < th.emergent_x_chance * c:
                fails.append(f"emergent: {m}->text {k} {acc:.3f} < {th.emergent_x_chance}x chance")
            ret = report["to_image"][m][k]
            if acc < th.emergent_vs_retrieval * ret:
                fails.append(
                    f"emergent: {m}->text {k} {acc:.3f} < {th.emergent_vs_retrieval} x "
                    f"{m}->image {ret:.3f}"
                )
    ar = report.get("arithmetic")
    if ar is not None:
        key = arith_key or best_arithmetic(ar)[0]
        got = ar[key]
        for part in ("all", "held_out", "seen"):
            bar = th.arithmetic_x_chance * ar["chance"]
            singles = max(
                ar["image_only"][part],
                ar["audio_only"][part],
                ar["image_only_centred"][part],
                ar["audio_only_centred"][part],
            )
            if got[part] < bar:
                fails.append(f"arithmetic ({key}, {part}): {got[part]:.3f} < 5x chance {bar:.3f}")
            if got[part] <= singles:
                fails.append(
                    f"arithmetic ({key}, {part}): {got[part]:.3f} not above single terms "
                    f"{singles:.3f}"
                )
    return fails


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary (the JSON form has everything)."""
    lines = [f"demo eval on {report['n']} held-out samples (seed {report['seed']})"]
    lines.append("zero-shot from text prompts (chance in brackets):")
    for m, acc in report["zero_shot"].items():
        cells = ", ".join(f"{k} {v:.3f} ({1 / len(FACTORS[k]):.2f})" for k, v in acc.items())
        lines.append(f"  {m:8s} {cells}")
    if "image_text_retrieval" in report:
        cells = ", ".join(f"{k} {v:.3f}" for k, v in report["image_text_retrieval"].items())
        lines.append(f"image <-> caption top-1: {cells}")
    lines.append("modality -> image, top-1 factor accuracy:")
    for m, acc in report["to_image"].items():
        lines.append(f"  {m:8s} " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    lines.append("emergent modality -> modality, top-1 shared-factor accuracy:")
    for pair, acc in report["cross_modal"].items():
        lines.append(f"  {pair:16s} " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    lines.append("held-out (class, scene) combinations vs seen:")
    for name, v in report["held_out_vs_seen"].items():
        lines.append(f"  {name:26s} held-out {v['held_out']:.3f}  seen {v['seen']:.3f}")
    ar = report.get("arithmetic")
    if ar:
        lines.append(
            f"arithmetic image(A,S1) + audio(B,S2) -> images of (A,S2), top-5 hit rate "
            f"({ar['queries']} queries, chance {ar['chance']:.3f}):"
        )
        for k, v in ar.items():
            if isinstance(v, dict):
                lines.append(
                    f"  {k:24s} all {v['all']:.3f}  held-out {v['held_out']:.3f}  "
                    f"seen {v['seen']:.3f}"
                )
        name, _ = best_arithmetic(ar)
        lines.append(f"  best weighting: {name}")
    return "\n".join(lines)
