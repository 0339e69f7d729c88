"""The build: scan -> decode (worker processes) -> batch -> embed -> write, and updates.

    entries (scan order)                      one bounded window of files in flight
      -> DecodeTask per file  ==pool==>  Decoded parts, consumed in scan order
      -> per-modality batches  -> Encoder.embed  (the main process: the model never waits
                                                  while the workers keep up)
      -> chunks of whole files -> IndexStore.commit_chunk  (atomic: .npy + one transaction)
      -> IndexStore.refresh   -> FAISS files + manifest.json

Files are committed whole and in scan order, so ids depend only on the corpus: a build killed
at any moment and rerun skips the committed prefix and gives the rest the ids an
uninterrupted build would have. Duplicates (same sha256 as an indexed file) are recorded, not
embedded; a file that fails to decode is recorded with its error and skipped.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from encoders import Encoder, Modality, ModelConfig, ModelRef, load_encoder

from ._decode import Decoded, DecodedItem, DecodeTask, decode, init_worker
from .corpus import CorpusEntry, scan_corpus, scan_paths
from .errors import IndexStoreError
from .fingerprint import checkpoint_identity, model_fingerprint
from .spec import DEFAULT_MEMORY_BUDGET, TARGET_RECALL
from .store import FileRecord, IndexManifest, IndexStore, ItemRecord, read_manifest

Log = Callable[[str], None]

# Text items are embedded this many batches at a time, sorted by length (see _Pipeline._embed).
TEXT_BUCKET_BATCHES = 4


@dataclass
class BuildOptions:
    """Knobs of ``build``/``add``/``sync``. Only ``settings()`` changes vectors."""

    factory: str = "auto"  # "auto" or a FAISS factory string
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    target_recall: float = TARGET_RECALL
    workers: int = 0  # decode processes; 0 decodes in the main process
    batch_size: int = 16
    chunk_items: int = 512  # items per committed chunk
    segment_seconds: float = 10.0  # audio/video longer than 1.5x this become segments
    soundtrack: bool = True  # embed a video's soundtrack as audio items of the same file
    modalities: tuple[Modality, ...] | None = None  # only these item modalities
    progress: bool | None = None  # progress bar; None: when stderr is a terminal

    def settings(self) -> dict[str, Any]:
        return {"segment_seconds": float(self.segment_seconds), "soundtrack": self.soundtrack}

    def check(self) -> None:
        if self.workers < 0 or self.batch_size < 1 or self.chunk_items < 1:
            raise ValueError("workers must be >= 0, batch size and chunk size >= 1")
        if not self.segment_seconds >= 0:
            raise ValueError(f"segment window must be >= 0 s, got {self.segment_seconds}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {self.target_recall}")


@dataclass
class BuildSummary:
    """What a build or update did (printed at the end; ``overlap`` = model busy / wall time)."""

    scanned: int = 0
    already: int = 0  # files already in the index, unchanged
    embedded_files: int = 0
    embedded_items: int = 0
    replaced_files: int = 0  # changed since they were indexed: re-embedded
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    filtered: int = 0  # not among --modalities
    removed_files: int = 0
    removed_items: int = 0
    items_by_modality: Counter[str] = field(default_factory=Counter)
    chunks: int = 0
    wall_s: float = 0.0
    model_s: float = 0.0  # time inside Encoder.embed
    decode_wait_s: float = 0.0  # time the main process waited for a decoded file
    manifest: IndexManifest | None = field(default=None, repr=False)

    @property
    def overlap(self) -> float:
        """Time the model was busy over the build's wall time."""
        return self.model_s / self.wall_s if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        by = ", ".join(f"{m} {n}" for m, n in sorted(self.items_by_modality.items()))
        out = [
            f"embedded {self.embedded_items} items from {self.embedded_files} files"
            + (f" ({by})" if by else ""),
            f"skipped {self.duplicates} duplicates, {self.already} already indexed",
            f"rejected {len(self.rejected)} files" + (":" if self.rejected else ""),
        ]
        out += [f"  {path}: {why}" for path, why in self.rejected[:20]]
        if len(self.rejected) > 20:
            out.append(f"  ... and {len(self.rejected) - 20} more (bindsearch index info)")
        if self.replaced_files or self.removed_files or self.removed_items:
            out.append(
                f"re-embedded {self.replaced_files} changed files; removed {self.removed_files} "
                f"files ({self.removed_items} items)"
            )
        if self.wall_s:
            out.append(
                f"{self.wall_s:.1f} s; model busy {self.model_s:.1f} s "
                f"(overlap {self.overlap:.2f}), waited {self.decode_wait_s:.1f} s for decoding"
            )
        return out


class EncoderLike(Protocol):
    """What the build needs from ``encoders.Encoder``."""

    def embed(self, modality: Modality | str, x: torch.Tensor | np.ndarray) -> np.ndarray: ...


@dataclass
class ModelSource:
    """The model of a build: its fingerprint without loading it, and the encoder on demand.

    ``checkpoint=None`` means seeded random weights (tests and benchmarks only). Made from a
    resolved model (``ModelSource.from_ref``), it takes its identity from the reference.
    """

    config: ModelConfig
    checkpoint: Path | None = None
    device: str = "cpu"
    seed: int = 0
    encoder: Encoder | None = None  # an already loaded one (the Python API, tests)
    _identity: str | None = None
    ref: ModelRef | None = None

    @classmethod
    def from_ref(cls, ref: ModelRef, device: str = "cpu") -> ModelSource:
        """The build's model from ``encoders.resolve_model``."""
        return cls(ref.config, ref.weights, device, seed=ref.seed, ref=ref)

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = (
                self.ref.identity
                if self.ref is not None
                else checkpoint_identity(self.checkpoint, self.seed)
            )
        return self._identity

    def fingerprint(self) -> dict[str, Any]:
        return model_fingerprint(self.config, self.identity)

    def load(self, modalities: Iterable[Modality]) -> EncoderLike:
        if self.encoder is None:
            towers = sorted({m.tower for m in modalities})
            self.encoder = load_encoder(
                self.ref if self.ref is not None else self.checkpoint,
                config=self.config,
                device=self.device,
                # Random weights depend on which towers are built (one RNG stream): all of them.
                modalities=None if self.checkpoint is None else towers,
                seed=self.seed,
            )
        return self.encoder


# --- public operations --------------------------------------------------------------------------


def build_index(
    corpus: str | Path,
    out: str | Path,
    model: ModelSource,
    options: BuildOptions | None = None,
    log: Log | None = None,
) -> BuildSummary:
    """Build (or finish building) the index ``out`` from a folder or manifest."""
    opts = options or BuildOptions()
    opts.check()
    t0 = time.perf_counter()
    store, entries = _start_build(corpus, out, model, opts)
    with store:
        summary = BuildSummary(scanned=len(entries))
        _Pipeline(store, model, opts, summary, log).run(entries)
        summary.manifest = store.refresh(
            opts.factory, opts.memory_budget, opts.target_recall, log=log
        )
    summary.wall_s = time.perf_counter() - t0
    return summary


def add_to_index(
    index: str | Path,
    paths: Sequence[str | Path],
    model: ModelSource,
    options: BuildOptions | None = None,
    log: Log | None = None,
) -> BuildSummary:
    """Embed new (or changed) files into an existing index, without a rebuild."""
    t0 = time.perf_counter()
    store, opts = _open_for_update(index, model, options)
    with store:
        entries = scan_paths(paths, exclude=[Path(index)])
        summary = BuildSummary(scanned=len(entries))
        _Pipeline(store, model, opts, summary, log).run(entries)
        summary.manifest = store.refresh(log=log)
    summary.wall_s = time.perf_counter() - t0
    return summary


def sync_index(
    index: str | Path,
    corpus: str | Path,
    model: ModelSource,
    options: BuildOptions | None = None,
    log: Log | None = None,
) -> BuildSummary:
    """Make the index match ``corpus``: add new files, re-embed changed ones, drop deleted ones.

    Files indexed from elsewhere than ``corpus`` (e.g. another folder given to ``add``) and
    not under it are left alone; files under it that are gone are removed.
    """
    t0 = time.perf_counter()
    store, opts = _open_for_update(index, model, options)
    with store:
        entries = scan_corpus(corpus, exclude=[Path(index)])
        summary = BuildSummary(scanned=len(entries))
        present = {str(e.path) for e in entries}
        root = Path(corpus).resolve()
        scope = root if root.is_dir() else None
        gone = [
            str(r["path"])
            for r in store.file_rows()
            if str(r["path"]) not in present
            and (scope is None or _is_under(Path(str(r["path"])), scope))
        ]
        if gone:
            summary.removed_items = len(store.remove_paths(gone))
            summary.removed_files = len(gone)
        _Pipeline(store, model, opts, summary, log).run(entries)
        summary.manifest = store.refresh(log=log)
    summary.wall_s = time.perf_counter() - t0
    return summary


def remove_from_index(
    index: str | Path, ids: Sequence[int] = (), paths: Sequence[str | Path] = ()
) -> BuildSummary:
    """Remove items by id and/or whole files by path (no model needed)."""
    t0 = time.perf_counter()
    store = IndexStore.open(Path(index))
    summary = BuildSummary()
    with store:
        if ids:
            summary.removed_items += len(store.remove_ids(ids))
        if paths:
            keys = [str(Path(p).resolve()) for p in paths]
            known = [k for k in keys if store.file_row(k) is not None]
            summary.removed_files = len(known)
            summary.removed_items += len(store.remove_paths(known))
        summary.manifest = store.refresh()
    summary.wall_s = time.perf_counter() - t0
    return summary


def _open_for_update(
    index: str | Path, model: ModelSource, options: BuildOptions | None
) -> tuple[IndexStore, BuildOptions]:
    root = Path(index)
    read_manifest(root)  # refuses what is not a finished index
    store = IndexStore.open(root)
    try:
        from .fingerprint import check_fingerprint

        check_fingerprint(store.fingerprint, model.fingerprint(), str(root))
        opts = options or BuildOptions()
        opts.check()
        # Segmenting must stay as built: the stored settings win over the options.
        settings = store.settings
        opts.segment_seconds = float(settings.get("segment_seconds", opts.segment_seconds))
        opts.soundtrack = bool(settings.get("soundtrack", opts.soundtrack))
    except Exception:
        store.close()
        raise
    return store, opts


def _start_build(
    corpus: str | Path, out: str | Path, model: ModelSource, opts: BuildOptions
) -> tuple[IndexStore, list[CorpusEntry]]:
    """Scan the corpus and open (or create) the index a build writes (local and Ray engines)."""
    out = Path(out)
    entries = scan_corpus(corpus, exclude=[out])
    store = IndexStore.create(out, model.fingerprint(), model.config.embed_dim, opts.settings())
    try:
        _record_corpus(store, corpus)
        with store.transaction():
            store.set_meta(
                "checkpoint_path",
                None if model.checkpoint is None else str(Path(model.checkpoint).resolve()),
            )
    except Exception:
        store.close()
        raise
    return store, entries


def _record_corpus(store: IndexStore, corpus: str | Path) -> None:
    roots = list(store.get_meta("corpora") or [])
    root = str(Path(corpus).resolve())
    if root not in roots:
        with store.transaction():
            store.set_meta("corpora", [*roots, root])


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


# --- the pipeline -------------------------------------------------------------------------------


@dataclass
class _Item:
    decoded: DecodedItem
    vector: np.ndarray | None = None
    dead: bool = False  # its file turned out a duplicate or failed: do not embed


@dataclass
class _Slot:
    """One file in flight, from its first task to its commit."""

    entry: CorpusEntry
    seq: int
    tasks: deque[tuple[DecodeTask, Future[Decoded]]] = field(default_factory=deque)
    items: list[_Item] = field(default_factory=list)
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    error: str | None = None
    note: str | None = None
    duplicate_of: str | None = None
    touched: bool = False  # same content as indexed, only its mtime changed
    crashes: int = 0


class _InlineFuture(Future[Decoded]):
    """workers=0: decode when the result is asked for (in order, in this process)."""

    def __init__(self, task: DecodeTask) -> None:
        super().__init__()
        self._task = task

    def result(self, timeout: float | None = None) -> Decoded:
        if not self.done():
            self.set_result(decode(self._task))
        return super().result(timeout)


class _Pipeline:
    def __init__(
        self,
        store: IndexStore,
        model: ModelSource,
        opts: BuildOptions,
        summary: BuildSummary,
        log: Log | None,
    ) -> None:
        self.store, self.model, self.opts, self.summary = store, model, opts, summary
        self.log = log
        self.cfg = model.config.preprocess
        self.encoder: EncoderLike | None = None
        self.pool: ProcessPoolExecutor | None = None
        self.buffers: dict[str, list[_Item]] = {}
        self.ready: list[_Slot] = []
        self.pending_sha: dict[str, str] = {}  # sha256 -> path, for files not yet committed
        self.needed: set[Modality] = set()

    def run(self, entries: Sequence[CorpusEntry]) -> None:
        todo = self._select(entries)
        if not todo:
            return
        for e in todo:
            if e.modality is not None:
                self.needed.add(e.modality)
                if e.modality is Modality.VIDEO and self.opts.soundtrack:
                    self.needed.add(Modality.AUDIO)
        max_ahead = max(2, 2 * self.opts.workers)
        bar = tqdm(
            total=len(todo),
            unit="file",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not self._show_progress(),
            smoothing=0.1,
        )
        it = iter(todo)
        slots: deque[_Slot] = deque()
        seq = 0
        try:
            if self.opts.workers > 0:
                self.pool = self._new_pool()
            while True:
                while len(slots) < max_ahead and (entry := next(it, None)) is not None:
                    slot = _Slot(entry, seq)
                    seq += 1
                    if entry.error is None and entry.modality is not None:
                        self._submit(slot, self._task(slot))
                    slots.append(slot)
                if not slots:
                    break
                head = slots[0]
                if head.tasks:
                    self._advance(head, slots)
                    continue
                slots.popleft()
                self._finish(head)
                bar.update(1)
                bar.set_postfix(
                    items=self.summary.embedded_items + self._ready_items(),
                    rejected=len(self.summary.rejected),
                    refresh=False,
                )
            self._commit()
        finally:
            bar.close()
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)

    # --- choosing what to do ------------------------------------------------------------------

    def _select(self, entries: Sequence[CorpusEntry]) -> list[CorpusEntry]:
        todo = []
        wanted = self.opts.modalities
        for e in entries:
            if wanted and e.modality is not None and e.modality not in wanted:
                self.summary.filtered += 1
                continue
            row = self.store.file_row(str(e.path))
            if row is not None and _unchanged(row, e.path):
                self.summary.already += 1
                continue
            todo.append(e)
        return todo

    def _show_progress(self) -> bool:
        return sys.stderr.isatty() if self.opts.progress is None else self.opts.progress

    # --- decoding -----------------------------------------------------------------------------

    def _task(
        self,
        slot: _Slot,
        part: int = 0,
        spans: tuple[tuple[float, float], ...] = (),
        duration: float | None = None,
    ) -> DecodeTask:
        modality = slot.entry.modality
        if modality is None:
            raise ValueError("an entry without a modality cannot be decoded")
        return DecodeTask(
            slot.seq,
            str(slot.entry.path),
            modality.value,
            self.cfg,
            self.opts.segment_seconds,
            self.opts.soundtrack,
            part,
            spans,
            duration,
        )

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: workers are children of this process (their watchdog sees it die) and
        # import only what decoding needs, never the loaded model.
        return ProcessPoolExecutor(
            self.opts.workers, multiprocessing.get_context("spawn"), initializer=init_worker
        )

    def _submit(self, slot: _Slot, task: DecodeTask) -> None:
        fut: Future[Decoded] = (
            self.pool.submit(decode, task) if self.pool is not None else _InlineFuture(task)
        )
        slot.tasks.append((task, fut))

    def _advance(self, slot: _Slot, slots: deque[_Slot]) -> None:
        task, fut = slot.tasks.popleft()
        t0 = time.perf_counter()
        try:
            res = fut.result()
        except BrokenProcessPool:
            # A decoder crashed a worker (which file is unknown): new pool, every task again;
            # the file at the head is rejected if it brings the pool down twice.
            self.summary.decode_wait_s += time.perf_counter() - t0
            slot.tasks.appendleft((task, fut))
            self._restart_pool(slots)
            slot.crashes += 1
            if slot.crashes >= 2:
                self._drop(slot, "the decoder crashed on this file")
            return
        self.summary.decode_wait_s += time.perf_counter() - t0
        if slot.error is not None or slot.duplicate_of is not None or slot.touched:
            return  # a later part of a file already given up
        if res.error is not None:
            self._drop(slot, res.error)
            return
        if res.part == 0:
            slot.sha256, slot.size, slot.mtime_ns, slot.note = (
                res.sha256,
                res.size,
                res.mtime_ns,
                res.note,
            )
            if res.sha256 is not None and self._deduplicate(slot, res.sha256):
                return
            for spans in res.later:
                self._submit(slot, self._task(slot, len(slot.tasks) + 1, spans, res.duration))
        for d in res.items:
            if d.duration_s is None and d.modality == "video":
                d.duration_s = task.duration
            item = _Item(d)
            slot.items.append(item)
            self._add_to_batch(item)

    def _deduplicate(self, slot: _Slot, sha: str) -> bool:
        path = str(slot.entry.path)
        other = self.pending_sha.get(sha) or self.store.indexed_path_with_sha(sha)
        if other == path:
            slot.touched = True  # same content as indexed: only the file's mtime changed
        elif other is not None:
            slot.duplicate_of = other
        else:
            self.pending_sha[sha] = path
            return False
        self._cancel(slot)
        return True

    def _drop(self, slot: _Slot, error: str) -> None:
        slot.error = error
        self._cancel(slot)
        for item in slot.items:
            item.dead = True
            item.decoded.array = np.empty(0)
        if slot.sha256 is not None and self.pending_sha.get(slot.sha256) == str(slot.entry.path):
            del self.pending_sha[slot.sha256]

    def _cancel(self, slot: _Slot) -> None:
        for _, fut in slot.tasks:
            fut.cancel()
        slot.tasks.clear()

    def _restart_pool(self, slots: deque[_Slot]) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self._new_pool()
        for s in slots:
            tasks = [t for t, _ in s.tasks]
            s.tasks.clear()
            for t in tasks:
                self._submit(s, t)

    # --- embedding ----------------------------------------------------------------------------

    def _add_to_batch(self, item: _Item) -> None:
        buf = self.buffers.setdefault(item.decoded.modality, [])
        buf.append(item)
        # Text waits for several batches' worth, to batch similar lengths together (_embed).
        window = TEXT_BUCKET_BATCHES if item.decoded.modality == Modality.TEXT.value else 1
        if len(buf) >= self.opts.batch_size * window:
            self._embed(item.decoded.modality)

    def _embed(self, modality: str) -> None:
        items = [it for it in self.buffers.pop(modality, []) if not it.dead]
        if not items:
            return
        if self.encoder is None:
            self.encoder = self.model.load(self.needed)
        if modality == Modality.TEXT.value:
            # Length buckets: sorted by their end-of-text position, each batch is trimmed to
            # its own longest row (exact), so short texts do not pay for a long neighbour.
            items.sort(key=lambda it: int(np.argmax(it.decoded.array)))
        size = self.opts.batch_size
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            x = torch.from_numpy(np.stack([it.decoded.array for it in batch]))
            if modality == Modality.TEXT.value:
                from encoders.transforms.text import trim_to_longest

                x = trim_to_longest(x)
            t0 = time.perf_counter()
            vectors = self.encoder.embed(modality, x)
            self.summary.model_s += time.perf_counter() - t0
            for it, v in zip(batch, vectors, strict=True):
                it.vector = np.asarray(v, dtype=np.float32)
                it.decoded.array = np.empty(0)  # the input is no longer needed

    # --- committing ---------------------------------------------------------------------------

    def _finish(self, slot: _Slot) -> None:
        if slot.entry.error is not None:
            slot.error = slot.entry.error
        self.ready.append(slot)
        if self._ready_items() >= self.opts.chunk_items:
            self._commit()

    def _ready_items(self) -> int:
        return sum(len(s.items) for s in self.ready if s.error is None)

    def _commit(self) -> None:
        if not self.ready:
            return
        for m in list(self.buffers):
            self._embed(m)
        files: list[FileRecord] = []
        items: list[ItemRecord] = []
        vectors: list[np.ndarray] = []
        touched: list[FileRecord] = []
        s = self.summary
        for slot in self.ready:
            e = slot.entry
            path = str(e.path)
            size, mtime = slot.size, slot.mtime_ns
            if size is None:
                size, mtime = _stat(e.path)
            common: dict[str, Any] = {
                "sha256": slot.sha256,
                "size": size,
                "mtime_ns": mtime,
                "modality": None if e.modality is None else e.modality.value,
                "caption": e.caption,
                "tags": e.tags,
            }
            if slot.touched:
                touched.append(FileRecord(path, "indexed", **common))
                s.already += 1
            elif slot.error is not None:
                files.append(FileRecord(path, "rejected", error=slot.error, **common))
                s.rejected.append((path, slot.error))
            elif slot.duplicate_of is not None:
                files.append(
                    FileRecord(path, "duplicate", duplicate_of=slot.duplicate_of, **common)
                )
                s.duplicates += 1
            else:
                files.append(FileRecord(path, "indexed", error=slot.note, **common))
                ordered = sorted(slot.items, key=lambda it: it.decoded.rank)
                for it in ordered:
                    d = it.decoded
                    if it.vector is None:
                        raise IndexStoreError(f"internal: {path} has an item without a vector")
                    items.append(
                        ItemRecord(
                            path,
                            d.modality,
                            slot.sha256 or "",
                            size or 0,
                            d.start_s,
                            d.end_s,
                            d.duration_s,
                            e.caption,
                            e.tags,
                        )
                    )
                    vectors.append(it.vector)
                    s.items_by_modality[d.modality] += 1
                s.embedded_files += 1
                s.embedded_items += len(ordered)
                if self.store.file_row(path) is not None:
                    s.replaced_files += 1
        dim = self.store.dim
        arr = np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)
        self.store.commit_chunk(files, items, arr, touched)
        s.chunks += 1
        self.ready = []
        self.pending_sha.clear()  # committed: the store answers for them now


def _unchanged(row: Any, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return bool(row["size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns)


def _stat(path: Path) -> tuple[int | None, int | None]:
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns
