"""The build's engine contract: scan -> engine -> writer -> refresh.

    scan (corpus.py)  -> FileTask per file to do, numbered in scan order
    engine            -> EmbeddedFile per task, in ANY order: decoded, batched (Batcher), embedded
    writer            -> scan order, deduplication, ids, atomic chunk commits (pipeline.IndexWriter)
    refresh           -> FAISS files + manifest (IndexStore.refresh)

An engine only turns files into vectors: the local engine with decode worker processes
(``pipeline.LocalEngine``), the Ray engine with Ray actors (``ray_engine.RayEngine``). Both embed
through one ``Batcher``; what reaches the index is decided by the one writer alone, so both
engines give the same ids.

A ``StagingEngine`` (the Ray engine) has its workers write their results to disk beside the
index, in shards, instead of sending them back; its ``run`` then reads the shards back, one at
a time and in scan order, and yields the same ``EmbeddedFile``s to the same writer. The build
tells it where the index being written is (``stage_in``) before ``run``, and calls
``committed`` once the writer has committed every file ``run`` returned, so the staged shards
can go (docs/ray.md, "Sharded build").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from encoders import Modality

from ._decode import DecodedItem

__all__ = [
    "TEXT_BUCKET_BATCHES",
    "Batcher",
    "DecodedItem",
    "EmbeddedFile",
    "EmbeddedItem",
    "EncoderLike",
    "Engine",
    "FileTask",
    "KnownContent",
    "StagingEngine",
    "needed_modalities",
    "nothing_known",
]

# Text items are embedded this many batches at a time, sorted by length (see Batcher).
TEXT_BUCKET_BATCHES = 4


class EncoderLike(Protocol):
    """What the build needs from ``encoders.Encoder``."""

    def embed(self, modality: Modality | str, x: torch.Tensor | np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class FileTask:
    """One file an engine is to decode and embed. ``seq``: its place in scan order."""

    seq: int
    path: str
    modality: Modality


@dataclass
class EmbeddedItem:
    """One item of a file: its decoded input until the batcher embeds it, then its vector."""

    decoded: DecodedItem
    vector: np.ndarray | None = None
    dead: bool = False  # its file turned out a duplicate or failed: do not embed


@dataclass
class EmbeddedFile:
    """What an engine returns for one ``FileTask``.

    ``error``: the file could not be decoded (the writer records it as rejected).
    ``skipped``: the engine did not embed it because ``known(sha256)`` said its content is
    indexed or on its way (the writer records it as a duplicate, or as unchanged).
    """

    seq: int
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    items: list[EmbeddedItem] = field(default_factory=list)
    error: str | None = None
    note: str | None = None  # e.g. a soundtrack that could not be read (the video still is)
    skipped: bool = False

    @property
    def embedded(self) -> bool:
        """Every live item has its vector."""
        return all(it.vector is not None for it in self.items if not it.dead)


KnownContent = Callable[[str], bool]


def nothing_known(sha256: str) -> bool:
    """The ``known`` of a build that skips nothing early (the writer still deduplicates)."""
    return False


class Engine(Protocol):
    """Turns the files to do into embedded files, in any order, each exactly once.

    ``known(sha256)`` may be asked once a file's content hash is known: True means the writer
    will not index its items, so the engine may return it ``skipped`` without embedding. So may a
    file with the content of an earlier task (in scan order) that decoded without an error.
    ``model_s`` and ``decode_wait_s`` are read after ``run`` (the build summary's timings).
    """

    model_s: float
    decode_wait_s: float

    def run(
        self, todo: Sequence[FileTask], known: KnownContent = nothing_known
    ) -> Iterator[EmbeddedFile]: ...


@runtime_checkable
class StagingEngine(Engine, Protocol):
    """An ``Engine`` whose workers stage their results on disk, beside the index being written.

    ``stage_in(index_dir)`` is called before ``run``; ``committed()`` after the writer has
    committed every file ``run`` returned (the staged results are no longer needed). A build
    killed before that leaves them for the rerun. ``shards_built`` and ``shards_reused`` are
    read after ``committed`` (the build summary).
    """

    shards_built: int
    shards_reused: int

    def stage_in(self, index_dir: Path) -> None: ...

    def committed(self) -> None: ...


def needed_modalities(todo: Iterable[FileTask], soundtrack: bool) -> set[Modality]:
    """The item modalities (hence the towers) a build of ``todo`` embeds."""
    needed: set[Modality] = set()
    for t in todo:
        needed.add(t.modality)
        if t.modality is Modality.VIDEO and soundtrack:
            needed.add(Modality.AUDIO)
    return needed


class Batcher:
    """Per-modality batches of ``batch_size`` items -> ``encoder().embed``; sets each item's vector.

    Text waits for ``TEXT_BUCKET_BATCHES`` batches' worth and is sorted by length first (its
    end-of-text position), so short texts share a batch and ``Encoder.embed`` trims each batch
    to its own longest row: same vectors, fewer token positions. ``flush`` embeds what waits.
    """

    def __init__(self, encoder: Callable[[], EncoderLike], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self._encoder = encoder  # called at the first batch: a build of duplicates loads nothing
        self.batch_size = batch_size
        self.model_s = 0.0  # time inside Encoder.embed
        self._buffers: dict[str, list[EmbeddedItem]] = {}

    def __len__(self) -> int:
        """Items waiting for a batch."""
        return sum(len(b) for b in self._buffers.values())

    def add(self, item: EmbeddedItem) -> None:
        modality = item.decoded.modality
        buf = self._buffers.setdefault(modality, [])
        buf.append(item)
        window = TEXT_BUCKET_BATCHES if modality == Modality.TEXT.value else 1
        if len(buf) >= self.batch_size * window:
            self._embed(modality)

    def flush(self) -> None:
        for modality in list(self._buffers):
            self._embed(modality)

    def _embed(self, modality: str) -> None:
        items = [it for it in self._buffers.pop(modality, []) if not it.dead]
        if not items:
            return
        encoder = self._encoder()
        if modality == Modality.TEXT.value:
            items.sort(key=lambda it: int(np.argmax(it.decoded.array)))
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            x = torch.from_numpy(np.stack([it.decoded.array for it in batch]))
            t0 = time.perf_counter()
            vectors = encoder.embed(modality, x)
            self.model_s += time.perf_counter() - t0
            for it, v in zip(batch, vectors, strict=True):
                it.vector = np.asarray(v, dtype=np.float32)
                it.decoded.array = np.empty(0)  # the input is no longer needed
