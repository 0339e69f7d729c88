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

The shards live in ``INDEX/shards/`` (``SHARDS``). A staging build holds that folder locked
(``hold_staging``, an exclusive ``flock``) from before ``run`` until after ``committed``; any
other build, once its index is committed, deletes the shards an interrupted staging build left
there, unless one holds them (``remove_staging``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from encoders import Modality

from ._decode import DecodedItem
from .errors import IndexStoreError

__all__ = [
    "SHARDS",
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
    "hold_staging",
    "needed_modalities",
    "nothing_known",
    "remove_staging",
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


SHARDS = "shards"  # INDEX/shards/<name>/: the staged shards of a build in progress
_LOCK_TRIES = 20  # hold_staging: tries, 0.1 s apart, while another build deletes the folder


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _still_at(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the folder open as ``fd`` (not deleted, not replaced)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def hold_staging(index_dir: Path) -> int:
    """Create ``index_dir/shards`` and lock it for a staging build: the open descriptor, closed
    to release the lock (after ``committed`` deleted the folder, or when the build fails).

    While it is held, no other build deletes the folder (``remove_staging``). Raises
    ``IndexStoreError`` when another staging build holds it.
    """
    staging = Path(index_dir) / SHARDS
    for _ in range(_LOCK_TRIES):
        staging.mkdir(parents=True, exist_ok=True)
        fd = _open_dir(staging)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # held: another staging build, or a build deleting the folder now
            time.sleep(0.1)
            continue
        if _still_at(fd, staging):
            return fd
        os.close(fd)  # deleted between open and lock (another build's clean-up): again
    raise IndexStoreError(
        f"another build is staging shards in {staging} (a Ray build still running?): "
        "wait for it to finish, then rerun"
    )


def remove_staging(index_dir: Path) -> bool:
    """Delete ``index_dir/shards``, the shards an interrupted staging build left, unless a
    staging build holds the folder now (``hold_staging``). Call it only once the index is
    committed. True when no such folder is left; a symlink there is never followed nor
    deleted (False).
    """
    staging = Path(index_dir) / SHARDS
    try:
        fd = _open_dir(staging)
    except FileNotFoundError:
        return True
    except OSError:  # not a folder
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a running staging build's: it deletes them after its commit
        if not _still_at(fd, staging):
            return False  # replaced since it was opened: not the folder that was locked
        shutil.rmtree(staging, ignore_errors=True)
        return not os.path.lexists(staging)
    finally:
        os.close(fd)


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
