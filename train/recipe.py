"""The ImageBind recipe on our encoders, for any preset and any paired dataset.

Stage 1 binds images (and video clips) to text: symmetric InfoNCE with the text tower's
learnable temperature, both towers trained. Stage 2 binds every other modality to images
ONLY: the vision tower is frozen, its embeddings of the training set are computed once and
cached, and each of audio, depth, thermal and IMU is trained against them with its own tower's
logit scale. No non-image modality ever sees text; whatever alignment with text (or with each
other) they show is emergent.

Stage-1 batches mix random rows with hard-negative groups (rows that share the nuisance
factors, ``PairedData.groups``; clips by their own ``key_groups``, which share everything the
clip shows but distance and motion), and an auxiliary term binds images to factor-level captions
("a star far", clips "a star rising far") where the data has them: without both, the demo
world's colour and scene lower the loss so far that object class was never learned. Where the
data has them, two more kinds of hard negative captions teach what captions alone teach too
weakly (the demo clips' direction of motion): each clip's caption with the opposite motion joins
the batch's candidates (``NEG_TEXT``, as NegCLIP's swapped captions), and a multiple-choice term
asks each clip to pick its own short caption among its five motions (``CHOICES_SEP``).

Data is a ``PairedData``: aligned rows of model-ready tensors, each key optional per row
(``present`` masks). ``from_world`` builds one from the demo world in memory; ``from_manifest``
from a JSONL manifest of pairs (the one ``bindsearch demo world`` writes, or any other) through
the real file loaders.

Training is budgeted by steps, seeded (every batch is a function of seed, stage and step, so a
resumed run sees the batches an uninterrupted one would), checkpointed every N steps and
resumable. The result is exported as a safetensors file the encoder loads like any other.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from encoders.config import ModelConfig, resolve_config
from encoders.errors import InvalidInput
from encoders.model import ImageBind, Trunk, init_weights
from encoders.transforms.text import trim_to_longest

from .lora import LORA_TARGETS, parse_targets

# The preset the demo world and the shipped demo weights are made for (what `bindsearch train`,
# `demo world`, `demo eval` and `train-decoder` use unless told otherwise).
DEMO_PRESET = "imagebind_demo"

__all__ = [
    "STAGE2_MODALITIES",
    "PairedData",
    "TrainConfig",
    "TrainResult",
    "export_weights",
    "freeze_except",
    "from_manifest",
    "from_world",
    "save_state_dict",
    "train",
    "trainable_optimizer",
    "unit_embeddings",
]

# Text keys and the vision keys they caption (a video's caption may name its motion).
STAGE1_PAIRS: tuple[tuple[str, str], ...] = (("vision", "text"), ("video", "video_text"))
# Optional factor-level captions of the same rows (the demo world's name class and distance,
# and for video motion, with colour and scene left unsaid): an auxiliary stage-1 term,
# weighted by ``TrainConfig.aux_weight``, whose identical captions are all positives.
AUX_TEXT = {"text": "text_short", "video_text": "video_text_short"}
# Optional multiple-choice captions of a text key's rows (the demo world's: the clip's short
# caption with its motion set to each of the five, ``world.choice_captions``):
# ``"{key}:choices:{name}"`` (N, V, L) ids and ``"{key}:choice:{name}"`` (N,) the row's own. A
# stage-1 term weighted by ``TrainConfig.choice_weight`` asks each image to pick its own caption
# among them, with the captions' embeddings as fixed targets (no gradient to the text tower).
CHOICES_SEP, CHOICE_SEP = ":choices:", ":choice:"
# Optional hard-negative captions of a text key's rows (the demo clips': the caption with the
# opposite motion, ``world.swapped_captions``), present where the row has one: added to the
# candidates each image of the batch picks its caption from (NegCLIP's swapped captions).
NEG_TEXT = {"video_text": "video_text_neg"}
STAGE2_MODALITIES = ("audio", "depth", "thermal", "imu")
# The vision inputs that anchor a modality in stage 2, in order of preference: each row's
# first present one is its anchor (``anchor_rows``). IMU moves with the camera: its video first,
# as Ego4D pairs them. The others: the image, else the video's frames (a manifest row holding
# only a video pairs its soundtrack with its frames, as ImageBind pairs AudioSet's sounds).
ANCHORS: dict[str, tuple[str, ...]] = {"imu": ("video", "vision")}
DEFAULT_ANCHORS = ("vision", "video")
CHECKPOINT = "checkpoint.pt"


@dataclass
class PairedData:
    """Aligned rows of model inputs: ``tensors[key][i]`` belongs with ``tensors[other][i]``.

    Keys: ``vision`` (N,3,S,S), ``video`` (N,clips,3,T,S,S), ``text``/``video_text`` (N,L) ids,
    ``audio``, ``depth``, ``thermal``, ``imu``. ``present[key]`` (N,) bool says which rows have
    it (a missing row holds zeros). A key may be in ``embedded`` instead of ``tensors``.
    """

    tensors: dict[str, Tensor]
    present: dict[str, np.ndarray] = field(default_factory=dict)
    # (N, D) unit embeddings of keys only ever used as stage-2 anchors, computed as they were
    # read (``from_manifest(embed=...)``), their inputs not kept: a video row's input is 18 MB
    # at the huge model's shapes, its embedding 4 KB. ``cache_embeddings`` reads them.
    embedded: dict[str, Tensor] = field(default_factory=dict)
    # (N,) int64 or None: rows with the same id share the nuisance factors (colour and scene
    # in the demo world: learned first, from random batches alone) and differ in the rest
    # (class, distance, motion): each other's hard negatives (``TrainConfig.hard_negatives``).
    groups: np.ndarray | None = None
    # Per stage-1 vision key ("vision", "video"), groups that replace ``groups`` for that key's
    # batches: the demo world's clips group by class, colour and scene, so that within a group
    # only distance and motion tell captions apart (motion is in clips only, and random or
    # colour/scene groups almost never hold two clips that differ in motion alone).
    key_groups: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        columns = {**self.tensors, **self.embedded}
        sizes = {k: len(v) for k, v in columns.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"all keys must have the same number of rows, got {sizes}")
        for name, g in [("groups", self.groups), *self.key_groups.items()]:
            if g is not None and len(g) != len(self):
                raise ValueError(f"{name} groups have {len(g)} rows, data {len(self)}")
        for k, v in columns.items():
            self.present.setdefault(k, np.ones(len(v), bool))

    def __len__(self) -> int:
        columns = [*self.tensors.values(), *self.embedded.values()]
        return len(columns[0]) if columns else 0

    def has(self, key: str) -> bool:
        """Whether ``key`` is a column, as inputs or as embeddings."""
        return key in self.tensors or key in self.embedded

    def rows(self, *keys: str) -> np.ndarray:
        """Indices of the rows that have every key."""
        if not all(self.has(k) for k in keys):
            return np.zeros(0, np.int64)
        mask = np.ones(len(self), bool)
        for k in keys:
            mask &= self.present[k]
        return np.flatnonzero(mask)


@dataclass
class TrainConfig:
    """Hyper-parameters of both stages; the defaults trained the shipped demo weights."""

    preset: str = DEMO_PRESET
    stage1_steps: int = 2100
    stage2_steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    stage2_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 40
    seed: int = 0
    checkpoint_every: int = 100
    modalities: tuple[str, ...] = STAGE2_MODALITIES
    # Fraction of each stage-1 batch drawn as hard-negative groups (``PairedData.groups``):
    # ``group_size`` rows sharing colour and scene, so that the loss can only fall by telling
    # their classes, distances (and motions) apart. Random batches of the demo world almost
    # never hold two captions that differ only in the class word, and a model of 1200
    # random-batch steps never learned class. Ignored when the data has no groups. Rounded
    # down to whole groups: 0.5 of 64 rows per pair is 4 groups of 8.
    hard_negatives: float = 0.5
    group_size: int = 8
    # Weight of the auxiliary factor-level caption term (``AUX_TEXT``; 0 turns it off).
    aux_weight: float = 1.0
    # Weight of the caption-choice term (``CHOICES_SEP``; 0 turns it off).
    choice_weight: float = 1.0
    # Add the rows' swapped captions (``NEG_TEXT``) to stage 1's candidates.
    swapped_negatives: bool = True
    # Identity of the weights training starts from (``bindsearch train --init``: the init
    # file's ``sha256:<hex>``, with ``+reinit`` when the trained towers were re-initialised);
    # None: random initialisation. A resume checks it like every other field.
    init: str | None = None
    # Stage 2 with low-rank adapters on the trained towers' trunks (``train.lora``; 0: every
    # weight of those towers learns). ``lora_alpha / lora_rank`` scales the adapters.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # The trunk projections that get adapters (``train.lora.TARGETS``), and whether the
    # towers' LayerNorms and biases train in full next to them (False: only the adapters).
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_norms: bool = True

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if self.lora_rank:
            self.lora_targets = parse_targets(self.lora_targets)
        if self.lora_rank and self.stage1_steps:
            raise ValueError(
                "LoRA adapts the towers of a trained model (train --init, stage 2 only); "
                "stage 1 trains the image and text towers in full"
            )
        if self.stage1_steps < 0 or self.stage2_steps < 0:
            raise ValueError("step budgets must be non-negative")
        if not 0.0 <= self.hard_negatives <= 1.0:
            raise ValueError(f"hard_negatives must be in [0, 1], got {self.hard_negatives}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2, got {self.group_size}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (contrastive loss needs negatives)")
        unknown = sorted(set(self.modalities) - set(STAGE2_MODALITIES))
        if unknown:
            raise ValueError(f"unknown stage-2 modalities {unknown}; accepted: {STAGE2_MODALITIES}")


@dataclass
class TrainResult:
    model: ImageBind
    losses: dict[str, list[float]]  # "stage1", "stage2/<modality>": loss per step
    seconds: float


# ----------------------------------------------------------------------------- data


def from_world(
    n: int, cfg: ModelConfig, seed: int = 0, caption_dropout: float = 0.2, progress: bool = True
) -> PairedData:
    """The demo world's training split, rendered in memory straight into model inputs."""
    from encoders.transforms.text import tokenize
    from world.world import (
        choice_captions,
        factor_captions,
        generate,
        motion_groups,
        nuisance_groups,
        swapped_captions,
        to_model_inputs,
    )

    p = cfg.preprocess
    world = generate(
        n,
        p,
        seed=seed,
        split="train",
        caption_dropout=caption_dropout,
        video_frames=p.video_frames,
        progress=progress,
    )
    tensors = to_model_inputs(world, p)
    tensors.update(factor_captions(world.factors, p))
    tensors.update(choice_captions(world.factors, p))
    swapped, named = swapped_captions(world)
    tensors["video_text_neg"] = tokenize(swapped, p)
    present = {"video_text_neg": named}
    return PairedData(
        tensors,
        present,
        groups=nuisance_groups(world.factors),
        key_groups={"video": motion_groups(world.factors)},
    )


def from_manifest(
    path: str | Path,
    cfg: ModelConfig,
    keys: Sequence[str] | None = None,
    progress: bool = True,
    embed: Callable[[str, Tensor], Tensor] | None = None,
    embed_keys: Sequence[str] = ("vision", "video"),
) -> PairedData:
    """A JSONL manifest of pairs -> PairedData, every file through ``encoders.inputs``.

    Each line is a JSON object with any of ``image``, ``video``, ``audio``, ``depth``,
    ``thermal``, ``imu`` (file paths, relative to the manifest's folder) and ``text`` (the
    image's caption), ``video_text`` (the video's caption; ``text`` when absent). Rows may
    have any subset: each stage uses the rows that hold its pair. A row with a ``video`` and
    no ``audio`` file takes the video's soundtrack as its audio (when it has one), so that
    ``{"video": path}`` alone pairs a video's sound with its frames.

    ``keys``: the columns to read (None: all). ``embed(key, batch)`` -> (B, D) unit embeddings:
    the ``embed_keys`` columns (anchors only, as in ``train --init``) are embedded as they are
    read, a few rows at a time, and only their embeddings kept (``PairedData.embedded``).
    """
    from encoders.inputs import preprocess

    path = Path(path)
    lines, rows = _manifest_rows(path)
    wanted = set(keys) if keys is not None else None
    tensors: dict[str, Tensor] = {}
    embedded: dict[str, Tensor] = {}
    present: dict[str, np.ndarray] = {}
    p = cfg.preprocess
    for key in MANIFEST_FILES:
        if wanted is not None and key not in wanted:
            continue
        as_vectors = embed is not None and key in embed_keys
        loaded: dict[int, Tensor] = {}
        pending: dict[int, Tensor] = {}
        # A context: a failing row closes (and clears) the bar before its error line is shown.
        with tqdm(rows, desc=f"load {key}", disable=not progress, leave=False) as bar:
            for i, r in enumerate(bar):
                x = _read_cell(key, r, path, lines[i], cfg)
                if x is None:
                    continue
                (pending if as_vectors else loaded)[i] = x
                if embed is not None and len(pending) >= EMBED_ROWS:
                    loaded.update(_embed_rows(embed, key, pending))
        if embed is not None and pending:
            loaded.update(_embed_rows(embed, key, pending))
        if not loaded:
            continue
        stacked = torch.stack(list(loaded.values()))
        have = np.zeros(len(rows), bool)
        have[list(loaded)] = True
        full = torch.zeros((len(rows), *stacked.shape[1:]), dtype=stacked.dtype)
        full[torch.from_numpy(have)] = stacked
        (embedded if as_vectors else tensors)[key] = full
        present[key] = have
    for key in MANIFEST_TEXTS:
        texts = [r.get(key) or (r.get("text") if key == "video_text" else None) for r in rows]
        have = np.array([bool(t) for t in texts])
        if have.any():
            ids = preprocess("text", [t or "" for t in texts], p)
            tensors[key], present[key] = ids, have
    return PairedData(tensors, present, embedded=embedded)


EMBED_ROWS = 8  # from_manifest(embed=...): rows decoded before each embedding call
# A manifest's file columns, by the key they load as (``PairedData``), and its text columns.
MANIFEST_FILES = {
    "vision": "image",
    "video": "video",
    "audio": "audio",
    "depth": "depth",
    "thermal": "thermal",
    "imu": "imu",
}
MANIFEST_TEXTS = ("text", "video_text")


def _read_cell(
    key: str, row: dict[str, Any], path: Path, line: int, cfg: ModelConfig
) -> Tensor | None:
    """A manifest row's input for ``key`` (an ``audio`` cell may come from its ``video``'s
    soundtrack), or None; a file that cannot be read names its manifest line."""
    from encoders.inputs import preprocess

    col = MANIFEST_FILES[key]
    try:
        if row.get(col):
            return preprocess(key, [str(path.parent / row[col])], cfg.preprocess)[0]
        if key == "audio" and row.get("video"):
            return _soundtrack(path.parent / row["video"], cfg)
    except InvalidInput as e:
        where = col if row.get(col) else "video (its soundtrack)"
        raise InvalidInput(f"manifest {path} line {line}, {where}: {e}") from None
    return None


def _manifest_rows(path: Path) -> tuple[list[int], list[dict[str, Any]]]:
    """A JSONL manifest's rows and their line numbers; a malformed line is one ``ValueError``
    naming it and saying what a line holds."""
    example = 'one JSON object per line, such as {"image": "a.jpg", "audio": "a.wav"}'
    columns = [*MANIFEST_FILES.values(), *MANIFEST_TEXTS]
    lines: list[int] = []
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {path} line {n} is not JSON ({e.msg}): {example}") from None
        if not isinstance(row, dict):
            kind = type(row).__name__
            raise ValueError(f"manifest {path} line {n} is a JSON {kind}, not an object: {example}")
        bad = [c for c in columns if row.get(c) is not None and not isinstance(row[c], str)]
        if bad:
            raise ValueError(
                f"manifest {path} line {n}: {bad[0]} is {json.dumps(row[bad[0]])}, not a "
                "string (a file path relative to the manifest, or a caption)"
            )
        if not any(row.get(c) for c in columns):
            raise ValueError(
                f"manifest {path} line {n} names none of the columns {', '.join(columns)} "
                f"(it has {', '.join(map(str, row)) or 'nothing'})"
            )
        lines.append(n)
        rows.append(row)
    if not rows:
        raise ValueError(f"manifest {path} has no rows: {example}")
    return lines, rows


def _embed_rows(
    embed: Callable[[str, Tensor], Tensor], key: str, pending: dict[int, Tensor]
) -> dict[int, Tensor]:
    """Embed the ``pending`` rows of ``key`` in one call; empties ``pending``."""
    vectors = embed(key, torch.stack(list(pending.values())))
    out = dict(zip(pending, vectors, strict=True))
    pending.clear()
    return out


def unit_embeddings(model: ImageBind, key: str, x: Tensor) -> Tensor:
    """(B, D) unit embeddings of a batch of ``key`` inputs (clip-averaged), fp32 on the CPU:
    the model in eval mode, without gradients (what ``cache_embeddings`` computes)."""
    was = model.training
    dev = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            return _unit(model, key, x.to(dev)).float().cpu()
    finally:
        model.train(was)


def _soundtrack(video: Path, cfg: ModelConfig) -> Tensor | None:
    """A video file's first audio stream as the audio tower's input, or None if it has none."""
    from encoders.inputs import DEFAULT_LIMITS
    from encoders.transforms.audio import load_audio
    from encoders.transforms.video import extract_audio

    track = extract_audio(str(video), max_seconds=DEFAULT_LIMITS.max_audio_seconds)
    if track is None:
        return None
    return load_audio((torch.from_numpy(track[0]), track[1]), cfg.preprocess)


# ----------------------------------------------------------------------------- losses


def info_nce(
    a: Tensor,
    b: Tensor,
    scale: Tensor | float,
    positives: Tensor | None = None,
    extra: Tensor | None = None,
    extra_pos: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE of unit vectors a (B, D) and b (B, D), logits = scale * a @ b.T.

    ``positives`` (B, B) bool marks extra matching pairs (e.g. identical captions); each row's
    target is then spread over its positives instead of a single diagonal entry. ``extra``
    (E, D): more candidates for the a -> b direction (hard negative captions), negatives of
    every row but where ``extra_pos`` (B, E) bool marks a match.
    """
    logits = scale * a @ b.T  # (B, B)
    if positives is None:
        positives = torch.eye(len(a), dtype=torch.bool, device=a.device)
    t = positives.float()
    logits_a = logits if extra is None else torch.cat([logits, scale * a @ extra.T], 1)
    if extra is None:
        t_a = t
    elif extra_pos is None:
        t_a = F.pad(t, (0, len(extra)))
    else:
        t_a = torch.cat([t, extra_pos.float()], 1)
    loss_a = -(t_a / t_a.sum(1, keepdim=True) * logits_a.log_softmax(1)).sum(1).mean()
    loss_b = -(t.T / t.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (loss_a + loss_b) / 2


def choice_nce(
    embs: Sequence[Tensor],
    choices: Sequence[Tensor],
    owns: Sequence[Tensor],
    scale: Tensor | float,
) -> Tensor:
    """Sum over choice sets of the cross-entropy of each unit embedding picking its own
    caption: ``embs[i]`` (B, D), ``choices[i]`` (B, V, D) the unit embeddings of its V
    captions, ``owns[i]`` (B,) the index of its own."""
    total: Tensor | float = 0.0
    for emb, t, own in zip(embs, choices, owns, strict=True):
        total = total + F.cross_entropy(scale * torch.einsum("bd,bvd->bv", emb, t), own)
    assert isinstance(total, Tensor)
    return total


def _encode_distinct(model: ImageBind, ids: Sequence[Tensor], dev: torch.device) -> list[Tensor]:
    """Unit text embeddings of id tensors (..., L) of one context length, shaped (..., D):
    each distinct row of all of them goes through the text tower once."""
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in ids])
    distinct, where = torch.unique(flat, dim=0, return_inverse=True)
    txt = _unit(model, "text", trim_to_longest(distinct.to(dev)))[where.to(dev)]
    out, start = [], 0
    for x in ids:
        n = x[..., 0].numel()
        out.append(txt[start : start + n].reshape(*x.shape[:-1], txt.shape[-1]))
        start += n
    return out


def _choice_names(data: PairedData, tkey: str) -> list[str]:
    prefix = f"{tkey}{CHOICES_SEP}"
    return sorted(k[len(prefix) :] for k in data.tensors if k.startswith(prefix))


def _same_rows(ids: Tensor, other: Tensor | None = None) -> Tensor:
    """(B, B') bool: rows of ``ids`` and of ``other`` (default: ``ids``) with identical token
    ids (identical captions are all positives)."""
    other = ids if other is None else other
    return (ids[:, None, :] == other[None, :, :]).all(-1)


# ----------------------------------------------------------------------------- training


def _param_groups(params: list[tuple[str, nn.Parameter]], wd: float) -> list[dict[str, Any]]:
    decay = [p for n, p in params if p.ndim >= 2 and "pos_embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "pos_embed" not in n)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def _batch(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return rows[rng.choice(len(rows), size=min(size, len(rows)), replace=False)]


def _mixed_batch(
    rows: np.ndarray,
    size: int,
    rng: np.random.Generator,
    groups: np.ndarray | None,
    hard: float,
    group_size: int,
) -> np.ndarray:
    """``size`` distinct rows: a ``hard`` fraction as whole groups of ``group_size`` rows
    sharing a group id (hard negatives of each other), the rest drawn uniformly."""
    n_hard = round(hard * min(size, len(rows))) // group_size * group_size
    if groups is None or n_hard == 0:
        return _batch(rows, size, rng)
    g = groups[rows]
    ids, counts = np.unique(g, return_counts=True)
    ids = ids[counts >= group_size]
    k = min(n_hard // group_size, len(ids))
    picked: list[np.ndarray] = []
    for gid in rng.choice(ids, size=k, replace=False):
        members = rows[g == gid]
        picked.append(members[rng.choice(len(members), size=group_size, replace=False)])
    hard_rows = np.concatenate(picked) if picked else np.zeros(0, rows.dtype)
    rest = np.setdiff1d(rows, hard_rows, assume_unique=True)
    easy = _batch(rest, size - len(hard_rows), rng)
    return np.concatenate([hard_rows, easy])


def _unit(model: ImageBind, key: str, x: Tensor) -> Tensor:
    """Unit embeddings (B, D) of a batch, clip-averaged for clip inputs."""
    return model.embed_one(_tower(key), x, scaled=False)


def _tower(key: str) -> str:
    return "vision" if key == "video" else key


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-write never leaves a broken checkpoint


@torch.no_grad()
def cache_embeddings(
    model: ImageBind,
    data: PairedData,
    key: str,
    rows: np.ndarray | None = None,
    batch: int = 256,
) -> Tensor:
    """(N, D) unit embeddings of ``rows`` of ``data[key]`` (default: every row that has it;
    zeros elsewhere), on the CPU. A key read as embeddings (``PairedData.embedded``) is copied."""
    rows = data.rows(key) if rows is None else rows
    if key not in data.tensors:
        out = torch.zeros(len(data), model.cfg.embed_dim)
        r = torch.from_numpy(rows)
        out[r] = data.embedded[key][r].float()
        return out
    x = data.tensors[key]
    out = torch.zeros(len(x), model.cfg.embed_dim)
    was = model.training
    dev = next(model.parameters()).device
    model.eval()
    for i in range(0, len(rows), batch):
        r = torch.from_numpy(rows[i : i + batch])
        out[r] = _unit(model, key, x[r].to(dev)).float().cpu()
    model.train(was)
    return out


def train(
    data: PairedData,
    tc: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    device: str = "cpu",
    init: ImageBind | None = None,
    grad_checkpointing: bool = False,
    autocast: bool = False,
) -> TrainResult:
    """Run both stages on ``data``; checkpoints go to ``out/checkpoint.pt``.

    Args:
        resume: continue from ``out/checkpoint.pt`` (same config and data) instead of
            starting afresh.
        log: called with one line per stage summary (the CLI passes ``typer.echo``).
        stop_after: stop (after checkpointing) once this many steps of both stages together
            are done, e.g. to fit a time slot; ``resume`` continues from there.
        device: where to train ("cpu", "cuda"); data stay on the CPU, batches move. Batches
            and initialisation do not depend on it; the arithmetic does (numerics differ).
        init: start from this model (fp32, every tower) instead of random weights
            (``train --init``, ``train.init``); it is trained in place. Set ``tc.init`` to its
            identity so that a resume can check it. With ``tc.lora_rank`` its stage-2 towers
            get adapters (``train.lora``) before anything else; the model returned keeps them
            (``train.lora.merged_state_dict`` merges them).
        grad_checkpointing: recompute the trained towers' trunk blocks in the backward pass
            (``Trunk.grad_checkpointing``): less memory, the same loss and gradients.
        autocast: bf16 autocast of the forward passes on CUDA (ignored on other devices).
    """
    t0 = time.perf_counter()
    cfg = resolve_config(tc.preset) if init is None else init.cfg
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    say = log or (lambda s: None)

    torch.manual_seed(tc.seed)
    if init is None:
        model = ImageBind(cfg, device="meta").to_empty(device="cpu")
        init_weights(model, seed=tc.seed)
    else:
        model = init
    if tc.lora_rank:
        from .lora import add_adapters

        add_adapters(
            model, tc.modalities, tc.lora_rank, tc.lora_alpha, seed=tc.seed, targets=tc.lora_targets
        )
    dev = torch.device(device)
    model.to(dev)
    amp = torch.autocast("cuda", torch.bfloat16, enabled=autocast and dev.type == "cuda")
    losses: dict[str, list[float]] = {"stage1": []}
    state: dict[str, Any] | None = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["train_config"] != _tc_dict(tc):
            raise ValueError(
                f"{ckpt_path} was written with a different training config; "
                "start afresh (without --resume) or pass the same options"
            )
        model.load_state_dict(state["model"])  # copies onto the model's device
        losses = {k: list(v) for k, v in state["losses"].items()}

    # ---- stage 1: vision (+ video) <-> text
    pairs = [(v, t) for v, t in STAGE1_PAIRS if len(data.rows(v, t))]
    stage1_done = state is not None and state["stage"] > 1
    if tc.stage1_steps and pairs and not stage1_done:
        towers = ["vision", "text"]
        params = [(n, p) for n, p in model.named_parameters() if _in_towers(n, towers)]
        opt = torch.optim.AdamW(_param_groups(params, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc.warmup, tc.stage1_steps))
        start = 0
        if state is not None and state["stage"] == 1:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = state["step"]
        model.train()
        bar = tqdm(range(start, tc.stage1_steps), desc="stage 1 image-text", disable=not progress)
        for step in bar:
            rng = np.random.default_rng([tc.seed, 1, step])
            torch.manual_seed(tc.seed * 1_000_003 + step)
            per = max(tc.batch_size // len(pairs), 2)
            img_parts, ids_parts, aux_parts, idx_parts = [], [], [], []
            neg_parts = []
            for vkey, tkey in pairs:
                rows = data.rows(vkey, tkey)
                groups = data.key_groups.get(vkey, data.groups)
                picked = _mixed_batch(rows, per, rng, groups, tc.hard_negatives, tc.group_size)
                idx = torch.from_numpy(picked)
                idx_parts.append(idx)
                nkey = NEG_TEXT.get(tkey)
                if tc.swapped_negatives and nkey in data.tensors:
                    has = picked[data.present[nkey][picked]]
                    neg_parts.append(data.tensors[nkey][torch.from_numpy(has)])
                img_parts.append(_unit(model, vkey, data.tensors[vkey][idx].to(dev)))
                ids_parts.append(data.tensors[tkey][idx])
                if AUX_TEXT[tkey] in data.tensors:
                    aux_parts.append(data.tensors[AUX_TEXT[tkey]][idx])
            ids = torch.cat(ids_parts).to(dev)
            img = torch.cat(img_parts)
            scale = model.logit_scale("text")
            assert scale is not None
            if neg_parts:
                negs = torch.cat(neg_parts).to(dev)
                both = _unit(model, "text", trim_to_longest(torch.cat([ids, negs])))
                txt, extra = both[: len(ids)], both[len(ids) :]
                # A swapped caption may be another row's own: a positive of that row.
                loss = info_nce(
                    img, txt, scale, _same_rows(ids), extra=extra, extra_pos=_same_rows(ids, negs)
                )
            else:
                txt = _unit(model, "text", trim_to_longest(ids))
                loss = info_nce(img, txt, scale, positives=_same_rows(ids))
            # The short captions of both extra terms repeat a lot: each distinct one is
            # encoded once.
            use_aux = bool(tc.aux_weight) and len(aux_parts) == len(pairs)
            embs, choices, owns = [], [], []
            if tc.choice_weight:
                for (_, tkey), emb, idx in zip(pairs, img_parts, idx_parts, strict=True):
                    for name in _choice_names(data, tkey):
                        embs.append(emb)
                        choices.append(data.tensors[f"{tkey}{CHOICES_SEP}{name}"][idx])
                        owns.append(data.tensors[f"{tkey}{CHOICE_SEP}{name}"][idx].to(dev))
            aux_ids = [torch.cat(aux_parts)] if use_aux else []
            if aux_ids or choices:
                encoded = _encode_distinct(model, [*aux_ids, *choices], dev)
                if aux_ids:
                    loss = loss + tc.aux_weight * info_nce(
                        img, encoded[0], scale, positives=_same_rows(aux_ids[0].to(dev))
                    )
                if choices:
                    # Targets only: the term trains the vision tower. Trained through it too,
                    # the small text tower bent the caption space towards motion and the
                    # clips' colour and class fell (0.71 / 0.62 at weight 1; model card).
                    chosen = [c.detach() for c in encoded[len(aux_ids) :]]
                    loss = loss + tc.choice_weight * choice_nce(embs, chosen, owns, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            losses["stage1"].append(float(loss.detach()))
            bar.set_postfix(
                loss=f"{float(loss.detach()):.3f}", scale=f"{float(scale.detach()):.1f}"
            )
            if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0:
                _save(ckpt_path, _state(model, opt, sched, 1, step + 1, tc, losses))
            if stop_after is not None and step + 1 >= stop_after:
                _save(ckpt_path, _state(model, opt, sched, 1, step + 1, tc, losses))
                bar.close()
                model.requires_grad_(False).eval()
                return TrainResult(model, losses, time.perf_counter() - t0)
        bar.close()
        if losses["stage1"]:
            say(
                f"stage 1: loss {_mean(losses['stage1'][:20]):.3f} -> "
                f"{_mean(losses['stage1'][-20:]):.3f} over {len(losses['stage1'])} steps"
            )
        _save(ckpt_path, _state(model, None, None, 2, 0, tc, losses))
        state = None

    # ---- stage 2: each other modality <-> frozen vision embeddings (never text)
    # Each modality's rows with an anchor: the same every step.
    pair_rows = {m: anchor_rows(m, data) for m in tc.modalities}
    mods = [m for m in tc.modalities if len(pair_rows[m])]
    if tc.stage2_steps and mods:
        if tc.lora_rank:
            from .lora import set_lora_trainable

            set_lora_trainable(model, mods, norms=tc.lora_norms)
        else:
            freeze_except(model, mods)
        for m in mods:
            trunk: Trunk = model.modality_trunks[m]  # type: ignore[assignment]
            trunk.grad_checkpointing = grad_checkpointing
        # Each anchor embedded once, for the rows some modality takes it for.
        needs: dict[str, np.ndarray] = {}
        for m in mods:
            for a, take in _anchor_takes(m, data):
                needs[a] = needs[a] | take if a in needs else take
        cached = {a: cache_embeddings(model, data, a, np.flatnonzero(t)) for a, t in needs.items()}
        anchors = {m: _anchor_embeddings(m, data, cached) for m in mods}  # (N, D) each
        opt = trainable_optimizer(model, tc.stage2_lr, tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc.warmup, tc.stage2_steps))
        start = 0
        if state is not None and state["stage"] == 2 and state["step"] > 0:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = state["step"]
        model.train()
        for m in mods:
            losses.setdefault(f"stage2/{m}", [])
        bar = tqdm(range(start, tc.stage2_steps), desc="stage 2 x-image", disable=not progress)
        for step in bar:
            rng = np.random.default_rng([tc.seed, 2, step])
            torch.manual_seed(tc.seed * 1_000_003 + 500_000 + step)
            total: Tensor | float = 0.0
            shown = {}
            for m in mods:
                idx = torch.from_numpy(_batch(pair_rows[m], tc.batch_size, rng))
                with amp:
                    emb = model.embed_one(m, data.tensors[m][idx].to(dev), scaled=False)
                scale = model.logit_scale(m)
                assert scale is not None
                loss = info_nce(emb.float(), anchors[m][idx].to(dev), scale)
                total = total + loss
                losses[f"stage2/{m}"].append(float(loss.detach()))
                shown[m] = f"{float(loss.detach()):.2f}"
            assert isinstance(total, Tensor)
            opt.zero_grad(set_to_none=True)
            total.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            bar.set_postfix(shown)
            if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0:
                _save(ckpt_path, _state(model, opt, sched, 2, step + 1, tc, losses))
            if stop_after is not None and tc.stage1_steps + step + 1 >= stop_after:
                _save(ckpt_path, _state(model, opt, sched, 2, step + 1, tc, losses))
                bar.close()
                model.requires_grad_(False).eval()
                return TrainResult(model, losses, time.perf_counter() - t0)
        bar.close()
        for m in mods:
            ls = losses[f"stage2/{m}"]
            if ls:
                say(f"stage 2 {m}: loss {_mean(ls[:20]):.3f} -> {_mean(ls[-20:]):.3f}")
        _save(ckpt_path, _state(model, None, None, 3, 0, tc, losses))
    model.requires_grad_(False).eval()
    return TrainResult(model, losses, time.perf_counter() - t0)


def trainable_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Stage 2's AdamW over the parameters that require grad (frozen ones get no state)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(_param_groups(params, weight_decay), lr=lr, betas=(0.9, 0.98))


def freeze_except(model: ImageBind, towers: Sequence[str]) -> None:
    """Freeze every parameter but those of ``towers``' stems, trunks and heads (stage 2)."""
    model.requires_grad_(False)
    for m in towers:
        for name in ("modality_preprocessors", "modality_trunks", "modality_heads"):
            getattr(model, name)[m].requires_grad_(True)


def anchor_rows(m: str, data: PairedData) -> np.ndarray:
    """Indices of the rows where ``m`` has an anchor (any of ``ANCHORS``' for it) to train on."""
    mask = np.zeros(len(data), bool)
    for _, take in _anchor_takes(m, data):
        mask |= take
    return np.flatnonzero(mask)


def _anchor_takes(m: str, data: PairedData) -> list[tuple[str, np.ndarray]]:
    """For each anchor of ``m``, the (N,) bool rows that take it: ``m`` present, no earlier one."""
    done = ~data.present.get(m, np.zeros(len(data), bool))
    out = []
    for a in ANCHORS.get(m, DEFAULT_ANCHORS):
        if not data.has(a):
            continue
        take = data.present[a] & ~done
        if take.any():
            out.append((a, take))
        done = done | take
    return out


def _anchor_embeddings(m: str, data: PairedData, cached: dict[str, Tensor]) -> Tensor:
    """(N, D): each row's embedding of its first present anchor of ``m`` (zeros where none)."""
    takes = _anchor_takes(m, data)
    out = torch.zeros_like(cached[takes[0][0]])
    for a, take in takes:
        rows = torch.from_numpy(take)
        out[rows] = cached[a][rows]
    return out


def _in_towers(name: str, towers: Sequence[str]) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and parts[1] in towers


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _tc_dict(tc: TrainConfig) -> dict[str, Any]:
    d = asdict(tc)
    d["modalities"] = list(tc.modalities)
    if d["init"] is None:
        del d["init"]  # checkpoints from before ``init`` existed still resume
    d["lora_targets"] = list(tc.lora_targets)
    if not d["lora_rank"]:
        del d["lora_rank"], d["lora_alpha"]  # ... and from before LoRA
    if not tc.lora_rank or (tuple(tc.lora_targets) == LORA_TARGETS and tc.lora_norms):
        del d["lora_targets"], d["lora_norms"]  # ... and from before --lora-targets
    return d


def _state(
    model: ImageBind,
    opt: torch.optim.Optimizer | None,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    stage: int,
    step: int,
    tc: TrainConfig,
    losses: dict[str, list[float]],
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else {},
        "scheduler": sched.state_dict() if sched is not None else {},
        "stage": stage,
        "step": step,
        "train_config": _tc_dict(tc),
        "losses": losses,
    }


def export_weights(
    model: ImageBind,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the model's state dict as safetensors (``load_encoder`` casts back to its dtype).

    fp16 halves the file; the text tower's 49408-token embedding is most of it.
    """
    return save_state_dict(model.state_dict(), model.cfg, path, dtype, metadata)


def save_state_dict(
    sd: dict[str, Tensor],
    cfg: ModelConfig,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """``export_weights`` of a state dict (e.g. one with LoRA adapters merged in)."""
    from encoders.checkpoint import save_safetensors

    out = {k: v.detach().cpu().to(dtype).contiguous() for k, v in sd.items()}
    meta = {"config": json.dumps(cfg.to_dict()), **(metadata or {})}
    return save_safetensors(out, path, meta)
