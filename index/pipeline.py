"""The build and its updates: scan -> engine -> writer -> refresh (see ``index.engine``).

    entries (scan order)  -> IndexWriter: what is new or changed -> FileTask per file
      -> an Engine (LocalEngine here: decode worker processes; or ray_engine.RayEngine)
           -> EmbeddedFile per task, in any order, embedded through the shared Batcher
      -> IndexWriter: scan order, duplicates, chunks of whole files -> IndexStore.commit_chunk
           (atomic: .npy + one transaction)
      -> calibrate (index.calibration: per modality pair, from the stored vectors + captions)
      -> IndexStore.refresh   -> FAISS files + manifest.json

Files are committed whole and in scan order, so ids depend only on the corpus: a build killed
at any moment and rerun skips the committed prefix and gives the rest the ids an
uninterrupted build would have. Duplicates (same sha256 as an indexed file) are recorded, not
embedded; a file that fails to decode is recorded with its error and skipped.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from encoders import Encoder, Modality, ModelConfig, ModelRef, load_encoder, preprocess
from encoders.dtype import choose_dtype
from encoders.models import tower_hashes

from ._decode import Decoded, DecodeTask, decode, init_worker
from .calibration import Calibration, compute_calibration
from .corpus import CorpusEntry, escape_path, recorded_path, scan_corpus, scan_paths
from .engine import (
    Batcher,
    EmbeddedFile,
    EmbeddedItem,
    EncoderLike,
    Engine,
    FileTask,
    KnownContent,
    StagingEngine,
    hold_staging,
    needed_modalities,
    nothing_known,
    remove_staging,
)
from .errors import IndexStoreError
from .fingerprint import checkpoint_identity, model_fingerprint, ref_fingerprint
from .spec import DEFAULT_MEMORY_BUDGET, TARGET_RECALL
from .store import (
    FileRecord,
    IndexManifest,
    IndexStore,
    ItemRecord,
    move_into_place,
    read_manifest,
    replacement_dir,
)

Log = Callable[[str], None]


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
    follow_symlinks: bool = False  # a folder's links to targets inside it (docs/corpus.md)
    allow_outside: bool = False  # a manifest's paths outside its folder

    def settings(self) -> dict[str, Any]:
        return {"segment_seconds": float(self.segment_seconds), "soundtrack": self.soundtrack}

    def check(self) -> None:
        if self.workers < 0 or self.batch_size < 1 or self.chunk_items < 1:
            raise ValueError("workers must be >= 0, batch size and chunk size >= 1")
        if not self.segment_seconds >= 0:
            raise ValueError(f"segment window must be >= 0 s, got {self.segment_seconds}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {self.target_recall}")


def _seconds(s: float) -> str:
    """A duration to print: tenths, or thousandths below 0.1 s (a small model's busy time)."""
    return f"{s:.1f}" if s >= 0.1 else f"{s:.3f}"


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
    shards_built: int = 0  # a staging engine's shards embedded by this run (--engine ray)
    shards_reused: int = 0  # ... and those a killed run had left complete
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
        out += [f"  {escape_path(path)}: {escape_path(why)}" for path, why in self.rejected[:20]]
        if len(self.rejected) > 20:
            out.append(f"  ... and {len(self.rejected) - 20} more (bindsearch index info)")
        if self.replaced_files or self.removed_files or self.removed_items:
            out.append(
                f"re-embedded {self.replaced_files} changed files; removed {self.removed_files} "
                f"files ({self.removed_items} items)"
            )
        if self.shards_built or self.shards_reused:
            out.append(f"shards: {self.shards_built} built, {self.shards_reused} reused")
        if self.wall_s:
            out.append(
                f"{self.wall_s:.1f} s; model busy {_seconds(self.model_s)} s "
                f"(overlap {self.overlap:.2f}), waited {self.decode_wait_s:.1f} s for decoding"
            )
        return out


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
    dtype: str | None = None  # a speed setting, not part of the fingerprint (None: auto)
    _text: EncoderLike | None = None

    @classmethod
    def from_ref(cls, ref: ModelRef, device: str = "cpu", dtype: str | None = None) -> ModelSource:
        """The build's model from ``encoders.resolve_model``."""
        return cls(ref.config, ref.weights, device, seed=ref.seed, ref=ref, dtype=dtype)

    def dtype_name(self) -> str:
        """The dtype the vectors are embedded in (``encoders.dtype``: ``bfloat16``, ``int8``...)."""
        if self.encoder is not None:
            return str(getattr(self.encoder, "precision", "float32"))
        return choose_dtype(self.dtype, self.device).name

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
        if self.ref is not None:
            return ref_fingerprint(self.ref)
        if self.checkpoint is not None:
            return model_fingerprint(self.config, self.identity, tower_hashes(self.checkpoint))
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
                dtype=self.dtype,
            )
        return self.encoder

    def embed_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, D) unit vectors of ``texts`` by this model (the calibration's captions).

        Uses the loaded encoder when it has the text tower, else loads that tower alone.
        """
        if self._text is None:
            enc = self.encoder
            if enc is not None and Modality.TEXT in getattr(enc, "modalities", ()):
                self._text = enc
            else:
                self._text = load_encoder(
                    self.ref if self.ref is not None else self.checkpoint,
                    config=self.config,
                    device=self.device,
                    modalities=None if self.checkpoint is None else [Modality.TEXT],
                    seed=self.seed,
                )
        parts = [
            self._text.embed(
                Modality.TEXT,
                preprocess(Modality.TEXT, list(texts[s : s + batch_size]), self.config.preprocess),
            )
            for s in range(0, len(texts), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.config.embed_dim), np.float32)


def calibrate(store: IndexStore, model: ModelSource) -> Calibration:
    """The calibration of the index in ``store`` (``index.calibration``), text by ``model``."""
    return compute_calibration(store, model.embed_text)


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
    return run_build(corpus, out, model, LocalEngine(model, opts), opts, log)


def run_build(
    corpus: str | Path,
    out: str | Path,
    model: ModelSource,
    engine: Engine,
    options: BuildOptions,
    log: Log | None = None,
) -> BuildSummary:
    """scan -> ``engine`` -> the writer -> refresh: ``build_index`` on any engine.

    ``engine`` must have been made with the same ``model`` and ``options``.
    """
    options.check()
    t0 = time.perf_counter()
    work = replacement_dir(Path(out))  # a complete index is rebuilt beside, then renamed
    try:
        store, entries = _start_build(corpus, work, model, options, exclude=Path(out))
    except IndexStoreError:
        if work != Path(out):  # e.g. another model: nothing of this replacement to resume
            shutil.rmtree(work, ignore_errors=True)
        raise
    with store:
        summary = BuildSummary(scanned=len(entries))
        staged = engine if isinstance(engine, StagingEngine) else None
        held = None if staged is None else hold_staging(work)  # its shards: no one else's
        try:
            if staged is not None:
                staged.stage_in(work)
            IndexWriter(store, options, summary, log).write(entries, engine)
            if staged is not None:  # every file it returned is committed: its shards can go
                staged.committed()
                summary.shards_built = staged.shards_built
                summary.shards_reused = staged.shards_reused
            summary.manifest = store.refresh(
                options.factory,
                options.memory_budget,
                options.target_recall,
                log=log,
                calibration=calibrate(store, model),
            )
        finally:
            if held is not None:
                os.close(held)
        if staged is None:  # committed: the shards an interrupted Ray build left can go
            remove_staging(work)
    move_into_place(work, Path(out))
    if work != Path(out):  # a complete index kept as it was may still hold some
        remove_staging(Path(out))
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
        entries = scan_paths(paths, [Path(index)], opts.follow_symlinks, opts.allow_outside)
        summary = BuildSummary(scanned=len(entries))
        IndexWriter(store, opts, summary, log).write(entries, LocalEngine(model, opts))
        summary.manifest = store.refresh(log=log, calibration=calibrate(store, model))
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
        entries = scan_corpus(corpus, [Path(index)], opts.follow_symlinks, opts.allow_outside)
        summary = BuildSummary(scanned=len(entries))
        present = {e.key for e in entries}
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
        IndexWriter(store, opts, summary, log).write(entries, LocalEngine(model, opts))
        summary.manifest = store.refresh(log=log, calibration=calibrate(store, model))
    summary.wall_s = time.perf_counter() - t0
    return summary


def remove_from_index(
    index: str | Path, ids: Sequence[int] = (), paths: Sequence[str | Path] = ()
) -> BuildSummary:
    """Remove items by id and/or whole files by path (no model needed).

    The calibration of the last build, add or sync is kept (it needs the model to refresh).
    """
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

        # Refused when a tower that made the index's vectors changed; accepted otherwise, and
        # the index then records this model (its held towers are the same, bit for bit).
        current = model.fingerprint()
        held = read_manifest(root).modalities
        check_fingerprint(store.fingerprint, current, str(root), holds=held)
        opts = options or BuildOptions()
        opts.check()
        # Segmenting must stay as built: the stored settings win over the options.
        settings = store.settings
        opts.segment_seconds = float(settings.get("segment_seconds", opts.segment_seconds))
        opts.soundtrack = bool(settings.get("soundtrack", opts.soundtrack))
        with store.transaction():
            if store.fingerprint.get("digest") != current["digest"]:
                store.set_meta("fingerprint", current)
            record_dtype(store, model.dtype_name())
    except Exception:
        store.close()
        raise
    return store, opts


def _start_build(
    corpus: str | Path,
    out: str | Path,
    model: ModelSource,
    opts: BuildOptions,
    exclude: Path | None = None,
) -> tuple[IndexStore, list[CorpusEntry]]:
    """Scan the corpus and open (or create) the index a build writes."""
    out = Path(out)
    exclude_dirs = [out] + ([exclude] if exclude is not None else [])
    entries = scan_corpus(corpus, exclude_dirs, opts.follow_symlinks, opts.allow_outside)
    store = IndexStore.create(out, model.fingerprint(), model.config.embed_dim, opts.settings())
    try:
        _record_corpus(store, corpus)
        with store.transaction():
            store.set_meta(
                "checkpoint_path",
                None if model.checkpoint is None else str(Path(model.checkpoint).resolve()),
            )
            record_dtype(store, model.dtype_name())
    except Exception:
        store.close()
        raise
    return store, entries


def record_dtype(store: IndexStore, name: str) -> None:
    """Add ``name`` to the dtypes the index's vectors were embedded in ("bfloat16+float32")."""
    seen = [d for d in str(store.get_meta("dtype") or "").split("+") if d]
    if name not in seen:
        store.set_meta("dtype", "+".join([*seen, name]))


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


# --- the writer ---------------------------------------------------------------------------------


@dataclass
class _Done:
    """A file in scan order, its fate decided, waiting for its chunk."""

    entry: CorpusEntry
    file: EmbeddedFile
    duplicate_of: str | None = None
    touched: bool = False  # same content as indexed, only its mtime changed

    @property
    def indexed(self) -> bool:
        return self.file.error is None and self.duplicate_of is None and not self.touched


class IndexWriter:
    """The one writer of a build or update, whatever the engine.

    It chooses what to do (unchanged files are skipped), puts the engine's results back in
    scan order (a reorder buffer), decides duplicates by content in that order, and commits
    whole files in chunks of about ``chunk_items`` items (ids follow), with rejected files
    recorded beside them. It keeps the progress bar and the summary.
    """

    def __init__(
        self, store: IndexStore, options: BuildOptions, summary: BuildSummary, log: Log | None
    ) -> None:
        self.store, self.opts, self.summary, self.log = store, options, summary, log
        self._todo: list[CorpusEntry] = []
        self._head = 0  # the next file of _todo, in scan order
        self._arrived: dict[int, EmbeddedFile] = {}  # the reorder buffer: seq -> file
        self._ready: list[_Done] = []
        self._pending_sha: dict[str, str] = {}  # sha256 -> path, for files not yet committed

    def known(self, sha256: str) -> bool:
        """Whether a file of this content is indexed or about to be (the engines' ``known``)."""
        return sha256 in self._pending_sha or self.store.indexed_path_with_sha(sha256) is not None

    def write(self, entries: Sequence[CorpusEntry], engine: Engine) -> None:
        """Have ``engine`` embed what ``entries`` holds that is new or changed, and commit it."""
        self._todo = self._select(entries)
        if not self._todo:
            return
        tasks = [
            FileTask(seq, str(e.path), e.modality)
            for seq, e in enumerate(self._todo)
            if e.error is None and e.modality is not None
        ]
        sent = {t.seq for t in tasks}
        bar = self._bar()
        files = engine.run(tasks, self.known) if tasks else iter(())
        try:
            self._drain(bar)  # files the scan rejected come first, maybe
            for f in files:
                if f.seq not in sent or f.seq < self._head or f.seq in self._arrived:
                    raise IndexStoreError(f"internal: the engine returned file #{f.seq} twice")
                self._arrived[f.seq] = f
                self._drain(bar)
            if self._head != len(self._todo):
                missing = self._todo[self._head].path
                raise IndexStoreError(f"internal: the engine returned no result for {missing}")
            self._commit()
        finally:
            close = getattr(files, "close", None)
            if close is not None:
                close()  # a generator engine shuts its workers down
            bar.close()
            self.summary.model_s += engine.model_s
            self.summary.decode_wait_s += engine.decode_wait_s

    def _bar(self) -> tqdm[Any]:
        """The progress bar of one write: a tick per file to do."""
        return tqdm(
            total=len(self._todo),
            unit="file",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not self._show_progress(),
            smoothing=0.1,
        )

    def write_loaded(
        self, entries: Sequence[CorpusEntry], load: Callable[[CorpusEntry], EmbeddedFile]
    ) -> None:
        """Commit files whose vectors exist already (``index import``), in order.

        ``load(entry)`` returns an entry's items with their vectors; it is called only for
        entries that are new or changed, one at a time, so only one is held at once.
        """
        self._todo = self._select(entries)
        bar = self._bar()
        try:
            self._drain(bar)
            while self._head < len(self._todo):
                seq = self._head
                f = load(self._todo[seq])
                f.seq = seq
                self._arrived[seq] = f
                self._drain(bar)
            self._commit()
        finally:
            bar.close()

    def _select(self, entries: Sequence[CorpusEntry]) -> list[CorpusEntry]:
        todo = []
        wanted = self.opts.modalities
        for e in entries:
            if wanted and e.modality is not None and e.modality not in wanted:
                self.summary.filtered += 1
                continue
            row = self.store.file_row(e.key)
            if row is not None and _unchanged(row, e.path):
                self.summary.already += 1
                continue
            todo.append(e)
        return todo

    def _show_progress(self) -> bool:
        return sys.stderr.isatty() if self.opts.progress is None else self.opts.progress

    def _drain(self, bar: Any) -> None:
        """Take every file at the front, in scan order, as far as results have arrived."""
        while self._head < len(self._todo):
            seq, entry = self._head, self._todo[self._head]
            if entry.error is not None or entry.modality is None:
                f = EmbeddedFile(seq, error=entry.error)  # never sent to the engine
            elif seq in self._arrived:
                f = self._arrived.pop(seq)
            else:
                return
            self._head += 1
            self._take(entry, f)
            bar.update(1)
            bar.set_postfix(
                items=self.summary.embedded_items + self._ready_items(),
                rejected=len(self.summary.rejected),
                refresh=False,
            )

    def _take(self, entry: CorpusEntry, f: EmbeddedFile) -> None:
        done = _Done(entry, f)
        if f.error is None and f.sha256 is not None:
            path = entry.key
            other = self._pending_sha.get(f.sha256) or self.store.indexed_path_with_sha(f.sha256)
            if other == path:
                done.touched = True
            elif other is not None:
                done.duplicate_of = other
            else:
                self._pending_sha[f.sha256] = path
        if done.indexed and f.skipped:
            raise IndexStoreError(f"internal: {entry.path} was skipped but is not a duplicate")
        if not done.indexed:
            f.items = []  # a duplicate's vectors (engines that embed before asking) are not kept
        elif not f.embedded:
            raise IndexStoreError(f"internal: {entry.path} has an item without a vector")
        self._ready.append(done)
        if self._ready_items() >= self.opts.chunk_items:
            self._commit()

    def _ready_items(self) -> int:
        return sum(len(d.file.items) for d in self._ready if d.indexed)

    def _commit(self) -> None:
        if not self._ready:
            return
        files: list[FileRecord] = []
        items: list[ItemRecord] = []
        vectors: list[np.ndarray] = []
        touched: list[FileRecord] = []
        s = self.summary
        for done in self._ready:
            e, f = done.entry, done.file
            path = e.key
            size, mtime = f.size, f.mtime_ns
            if size is None:
                size, mtime = _stat(e.path)
            common: dict[str, Any] = {
                "sha256": f.sha256,
                "size": size,
                "mtime_ns": mtime,
                "modality": None if e.modality is None else e.modality.value,
                "caption": e.caption,
                "tags": e.tags,
            }
            if done.touched:
                touched.append(FileRecord(path, "indexed", **common))
                s.already += 1
            elif f.error is not None:
                error = recorded_path(f.error)  # a decoder's message may quote a bad name
                files.append(FileRecord(path, "rejected", error=error, **common))
                s.rejected.append((path, error))
            elif done.duplicate_of is not None:
                files.append(
                    FileRecord(path, "duplicate", duplicate_of=done.duplicate_of, **common)
                )
                s.duplicates += 1
            else:
                files.append(FileRecord(path, "indexed", error=f.note, **common))
                ordered = sorted(f.items, key=lambda it: it.decoded.rank)
                for it in ordered:
                    d = it.decoded
                    if it.vector is None:
                        raise IndexStoreError(f"internal: {path} has an item without a vector")
                    items.append(
                        ItemRecord(
                            path if d.path is None else d.path,
                            d.modality,
                            f.sha256 or "",
                            size or 0,
                            d.start_s,
                            d.end_s,
                            d.duration_s,
                            e.caption if d.caption is None else d.caption,
                            e.tags if d.tags is None else d.tags,
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
        self._ready = []
        self._pending_sha.clear()  # committed: the store answers for them now


def _unchanged(row: Any, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)  # a file swapped for a link has changed
    except (OSError, ValueError):
        return False
    same = row["size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns
    return bool(same and stat.S_ISREG(st.st_mode))


def _stat(path: Path) -> tuple[int | None, int | None]:
    try:
        st = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):  # gone, a name too long, a NUL byte
        return None, None
    return st.st_size, st.st_mtime_ns


# --- the local engine ---------------------------------------------------------------------------


@dataclass
class _Slot:
    """One file in flight, from its first decode task until all its parts are decoded."""

    task: FileTask
    file: EmbeddedFile
    parts: deque[tuple[DecodeTask, Future[Decoded]]] = field(default_factory=deque)
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


class LocalEngine:
    """The engine of one machine: decode worker processes feed the model in this process.

    A bounded window of files is decoded ahead; results are taken in scan order, so a file
    whose content an earlier one has is skipped before its later parts are decoded. Items
    join the shared ``Batcher``; a file leaves once its items have their vectors (the
    batches are flushed whenever a chunk's worth of items waits for them).
    """

    def __init__(
        self, model: ModelSource, options: BuildOptions, keep_workers: bool = False
    ) -> None:
        self.model, self.opts = model, options
        self.keep_workers = keep_workers  # the decode processes outlive a run (close() ends them)
        self.cfg = model.config.preprocess
        self.model_s = 0.0
        self.decode_wait_s = 0.0
        self._pool: ProcessPoolExecutor | None = None
        self._encoder: EncoderLike | None = None
        self._needed: set[Modality] = set()
        self._seen: dict[str, int] = {}  # sha256 -> seq of the file of this run that has it

    def run(
        self, todo: Sequence[FileTask], known: KnownContent = nothing_known
    ) -> Iterator[EmbeddedFile]:
        if not todo:
            return
        self._needed |= needed_modalities(todo, self.opts.soundtrack)
        self._seen = {}
        batcher = Batcher(self._load, self.opts.batch_size)
        max_ahead = max(2, 2 * self.opts.workers)
        it = iter(todo)
        slots: deque[_Slot] = deque()  # decoding
        waiting: deque[EmbeddedFile] = deque()  # decoded, some items still in the batcher
        try:
            if self.opts.workers > 0 and self._pool is None:
                self._pool = self._new_pool()
            while True:
                while len(slots) < max_ahead and (task := next(it, None)) is not None:
                    slot = _Slot(task, EmbeddedFile(task.seq))
                    self._submit(slot, self._task(task))
                    slots.append(slot)
                if not slots:
                    break
                head = slots[0]
                if head.parts:
                    self._advance(head, slots, batcher, known)
                    continue
                slots.popleft()
                waiting.append(head.file)
                if sum(len(f.items) for f in waiting) >= self.opts.chunk_items:
                    batcher.flush()  # the writer needs them to commit a chunk
                while waiting and waiting[0].embedded:
                    yield waiting.popleft()
            batcher.flush()
            yield from waiting
        finally:
            self.model_s += batcher.model_s
            if not self.keep_workers:
                self.close()

    def close(self) -> None:
        """End the decode processes (a run does unless ``keep_workers``)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _load(self) -> EncoderLike:
        if self._encoder is None:
            self._encoder = self.model.load(self._needed)
        return self._encoder

    def _task(
        self,
        task: FileTask,
        part: int = 0,
        spans: tuple[tuple[float, float], ...] = (),
        duration: float | None = None,
    ) -> DecodeTask:
        return DecodeTask(
            task.seq,
            task.path,
            task.modality.value,
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
            self._pool.submit(decode, task) if self._pool is not None else _InlineFuture(task)
        )
        slot.parts.append((task, fut))

    def _advance(
        self, slot: _Slot, slots: deque[_Slot], batcher: Batcher, known: KnownContent
    ) -> None:
        task, fut = slot.parts.popleft()
        t0 = time.perf_counter()
        try:
            res = fut.result()
        except BrokenProcessPool:
            # A decoder crashed a worker (which file is unknown): new pool, every task again;
            # the file at the head is rejected if it brings the pool down twice.
            self.decode_wait_s += time.perf_counter() - t0
            slot.parts.appendleft((task, fut))
            self._restart_pool(slots)
            slot.crashes += 1
            if slot.crashes >= 2:
                self._drop(slot, "the decoder crashed on this file")
            return
        self.decode_wait_s += time.perf_counter() - t0
        f = slot.file
        if f.error is not None or f.skipped:
            return  # a later part of a file already given up
        if res.error is not None:
            self._drop(slot, res.error)
            return
        if res.part == 0:
            f.sha256, f.size, f.mtime_ns, f.note = res.sha256, res.size, res.mtime_ns, res.note
            if res.sha256 is not None:
                if res.sha256 in self._seen or known(res.sha256):
                    f.skipped = True  # a duplicate, or unchanged content: the writer says which
                    self._cancel(slot)
                    return
                self._seen[res.sha256] = f.seq
            for spans in res.later:
                self._submit(slot, self._task(slot.task, len(slot.parts) + 1, spans, res.duration))
        for d in res.items:
            if d.duration_s is None and d.modality == Modality.VIDEO.value:
                d.duration_s = task.duration
            item = EmbeddedItem(d)
            f.items.append(item)
            batcher.add(item)

    def _drop(self, slot: _Slot, error: str) -> None:
        f = slot.file
        f.error = error
        self._cancel(slot)
        for item in f.items:
            item.dead = True
            item.decoded.array = np.empty(0)
        if f.sha256 is not None and self._seen.get(f.sha256) == f.seq:
            del self._seen[f.sha256]

    def _cancel(self, slot: _Slot) -> None:
        for _, fut in slot.parts:
            fut.cancel()
        slot.parts.clear()

    def _restart_pool(self, slots: deque[_Slot]) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._new_pool()
        for s in slots:
            tasks = [t for t, _ in s.parts]
            s.parts.clear()
            for t in tasks:
                self._submit(s, t)
