"""The index on disk: committed chunks + ``meta.sqlite`` (the truth), FAISS files + manifest.

Layout of one index directory::

    manifest.json          format, model fingerprint, dim, metric, recipe per modality,
                           counts, checksums; written last, atomically
    meta.sqlite            items (vector id == row id), files (indexed / duplicate / rejected),
                           chunks, meta
    chunks/c00000001.npy   (count, dim) float32: the vectors of ids first_id .. first_id+count-1
    <modality>.faiss       one FAISS index per item modality, ids = item ids, rebuilt or updated
                           from the chunks by ``refresh`` (atomic rename)

Crash safety: a chunk's vectors are written to a temporary file, fsynced and renamed, then its
rows are inserted in one SQLite transaction; an ``.npy`` without rows is an orphan, overwritten
by the next chunk of that number. FAISS files and the manifest are derived: ``refresh`` brings
them in line with the database, so rerunning any interrupted command repairs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .errors import IndexCorrupt, IndexIncomplete, IndexNotFound, IndexStoreError, SettingsMismatch
from .fingerprint import check_fingerprint
from .spec import (
    DEFAULT_MEMORY_BUDGET,
    TARGET_RECALL,
    IndexSpec,
    choose_spec,
    index_ids,
    remove_ids,
    train_and_fill,
)

FORMAT = "bindsearch-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META = "meta.sqlite"
CHUNKS = "chunks"
# An HNSW index (no removal) is rebuilt without its tombstones once they pass this share.
COMPACT_TOMBSTONES = 0.2

ITEM_COLUMNS = (
    "id",
    "path",
    "modality",
    "sha256",
    "size",
    "start_s",
    "end_s",
    "duration_s",
    "caption",
    "tags",
    "chunk",
    "deleted",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    chunk INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, count INTEGER NOT NULL,
    sha256 TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, modality TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, start_s REAL, end_s REAL, duration_s REAL, caption TEXT, tags TEXT,
    chunk INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE INDEX IF NOT EXISTS items_modality ON items(modality, deleted);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, status TEXT NOT NULL, sha256 TEXT, size INTEGER, mtime_ns INTEGER,
    duplicate_of TEXT, error TEXT, chunk INTEGER, modality TEXT, caption TEXT, tags TEXT);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256, status);
"""


@dataclass(frozen=True)
class FileRecord:
    """What happened to one corpus file: ``indexed``, ``duplicate`` (of another) or ``rejected``."""

    path: str
    status: str
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    duplicate_of: str | None = None
    error: str | None = None
    modality: str | None = None
    caption: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ItemRecord:
    """One vector's metadata row (its id is assigned when its chunk is committed)."""

    path: str
    modality: str
    sha256: str
    size: int
    start_s: float | None = None
    end_s: float | None = None
    duration_s: float | None = None
    caption: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), rows as ``sqlite3.Row``."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA synchronous=FULL")
    if readonly:
        conn.execute("PRAGMA query_only=1")
    return conn


def read_manifest(root: Path) -> dict[str, Any]:
    """The parsed ``manifest.json``; ``IndexIncomplete`` if a build never finished."""
    path = root / MANIFEST
    if not (root / META).is_file():
        raise IndexNotFound(f"no index at {root} (no {META})")
    if not path.is_file():
        raise IndexIncomplete(
            f"the index at {root} is incomplete (its build was interrupted): rerun the build"
        )
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexCorrupt(f"{path} is not valid JSON: {e}") from None
    if data.get("format") != FORMAT:
        raise IndexCorrupt(f"{path} is not a bindsearch index manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise IndexCorrupt(
            f"{path} has format version {data.get('format_version')}; this bindsearch reads "
            f"version {FORMAT_VERSION}: rebuild the index"
        )
    return data


class IndexStore:
    """Read-write access to one index directory (the build, add, remove and sync commands)."""

    def __init__(self, root: Path, conn: sqlite3.Connection) -> None:
        self.root = root
        self.conn = conn
        self._mmaps: OrderedDict[int, np.ndarray] = OrderedDict()

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        fingerprint: dict[str, Any],
        dim: int,
        settings: dict[str, Any],
    ) -> IndexStore:
        """Open ``root`` for a build: a new index, or the one a previous run started.

        A resumed build must use the same model and the same vector-changing settings.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise IndexStoreError(f"{root} exists and is not a directory")
        if root.is_dir() and any(root.iterdir()) and not (root / META).is_file():
            raise IndexStoreError(
                f"{root} is a non-empty directory that is not an index: choose another -o"
            )
        (root / CHUNKS).mkdir(parents=True, exist_ok=True)
        store = cls(root, connect(root / META))
        store.conn.executescript(_SCHEMA)
        stored = store.get_meta("fingerprint")
        if stored is None:
            with store.transaction():
                store.set_meta("format_version", FORMAT_VERSION)
                store.set_meta("fingerprint", fingerprint)
                store.set_meta("dim", dim)
                store.set_meta("settings", settings)
                store.set_meta("next_id", 0)
                store.set_meta("generation", 0)
                store.set_meta("created", time.time())
        else:
            check_fingerprint(stored, fingerprint, str(root))
            old = store.get_meta("settings") or {}
            diffs = sorted(k for k in settings if k in old and old[k] != settings[k])
            if diffs:
                raise SettingsMismatch(
                    f"the index at {root} was built with "
                    + ", ".join(f"{k}={old[k]!r}" for k in diffs)
                    + "; this build asks for "
                    + ", ".join(f"{k}={settings[k]!r}" for k in diffs)
                    + " (these change the vectors): use the same values or another -o"
                )
        store.drop_orphan_chunks()
        return store

    @classmethod
    def open(cls, root: Path) -> IndexStore:
        """Open an existing index for updating (add, remove, sync)."""
        root = Path(root)
        if not (root / META).is_file():
            raise IndexNotFound(f"no index at {root} (no {META})")
        store = cls(root, connect(root / META))
        if store.get_meta("fingerprint") is None:
            raise IndexCorrupt(f"{root / META} has no model fingerprint")
        store.drop_orphan_chunks()
        return store

    def close(self) -> None:
        self._mmaps.clear()
        self.conn.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
        )

    def transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    @property
    def fingerprint(self) -> dict[str, Any]:
        value: dict[str, Any] = self.get_meta("fingerprint")
        return value

    @property
    def dim(self) -> int:
        return int(self.get_meta("dim"))

    @property
    def settings(self) -> dict[str, Any]:
        value: dict[str, Any] = self.get_meta("settings") or {}
        return value

    def _bump_generation(self) -> None:
        self.set_meta("generation", int(self.get_meta("generation") or 0) + 1)

    # --- files --------------------------------------------------------------------------------

    def file_row(self, path: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM files WHERE path = ?", (path,)
        ).fetchone()
        return row

    def indexed_path_with_sha(self, sha256: str) -> str | None:
        """The indexed file with this content, if any (for deduplication)."""
        row = self.conn.execute(
            "SELECT path FROM files WHERE sha256 = ? AND status = 'indexed' LIMIT 1", (sha256,)
        ).fetchone()
        return None if row is None else str(row[0])

    def file_rows(self, status: str | None = None) -> list[sqlite3.Row]:
        if status is None:
            return list(self.conn.execute("SELECT * FROM files ORDER BY path"))
        return list(
            self.conn.execute("SELECT * FROM files WHERE status = ? ORDER BY path", (status,))
        )

    # --- writing chunks -----------------------------------------------------------------------

    def commit_chunk(
        self,
        files: Sequence[FileRecord],
        items: Sequence[ItemRecord],
        vectors: np.ndarray,
        touched: Sequence[FileRecord] = (),
    ) -> list[int]:
        """Append ``items`` with their ``vectors`` and record ``files``, atomically.

        Returns the ids given to the items: consecutive, in order (vector row i <-> item i).
        A file seen before (changed since) loses its old items in the same transaction, and
        files recorded as its duplicates lose their rows (the next add or sync redoes them).
        ``touched``: indexed files whose content is unchanged; only size and mtime are updated.
        """
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
        if len(items) and vectors.shape[1] != self.dim:
            raise ValueError(f"vectors are {vectors.shape[1]}-d; the index holds {self.dim}-d")
        first = int(self.get_meta("next_id"))
        chunk: int | None = None
        digest = ""
        if len(items):
            chunk = self._next_chunk()
            digest = self._write_chunk(chunk, np.ascontiguousarray(vectors, dtype=np.float32))
        ids = list(range(first, first + len(items)))
        with self.transaction():
            for f in files:
                old = self.conn.execute(
                    "SELECT id FROM items WHERE path = ? AND deleted = 0", (f.path,)
                ).fetchall()
                if old:
                    self._remove_items([int(r[0]) for r in old])
                    self.conn.execute("DELETE FROM files WHERE duplicate_of = ?", (f.path,))
            self.conn.executemany(
                "UPDATE files SET size = ?, mtime_ns = ? WHERE path = ?",
                [(f.size, f.mtime_ns, f.path) for f in touched],
            )
            if chunk is not None:
                self.conn.execute(
                    "INSERT INTO chunks (chunk, first_id, count, sha256, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (chunk, first, len(items), digest, time.time()),
                )
            self.conn.executemany(
                "INSERT INTO items (id, path, modality, sha256, size, start_s, end_s, duration_s,"
                " caption, tags, chunk) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        i,
                        it.path,
                        it.modality,
                        it.sha256,
                        it.size,
                        it.start_s,
                        it.end_s,
                        it.duration_s,
                        it.caption,
                        json.dumps(list(it.tags)),
                        chunk,
                    )
                    for i, it in zip(ids, items, strict=True)
                ],
            )
            self.conn.executemany(
                "INSERT OR REPLACE INTO files (path, status, sha256, size, mtime_ns, duplicate_of,"
                " error, chunk, modality, caption, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        f.path,
                        f.status,
                        f.sha256,
                        f.size,
                        f.mtime_ns,
                        f.duplicate_of,
                        f.error,
                        chunk if f.status == "indexed" else None,
                        f.modality,
                        f.caption,
                        json.dumps(list(f.tags)),
                    )
                    for f in files
                ],
            )
            self.set_meta("next_id", first + len(items))
            self._bump_generation()
        return ids

    def _next_chunk(self) -> int:
        row = self.conn.execute("SELECT MAX(chunk) FROM chunks").fetchone()
        return 1 if row[0] is None else int(row[0]) + 1

    def chunk_path(self, chunk: int) -> Path:
        return self.root / CHUNKS / f"c{chunk:08d}.npy"

    def _write_chunk(self, chunk: int, vectors: np.ndarray) -> str:
        path = self.chunk_path(chunk)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        self._mmaps.pop(chunk, None)
        return sha256_path(path)

    def drop_orphan_chunks(self) -> None:
        """Delete chunk files a crash left without rows (and temporary files)."""
        known = {int(r[0]) for r in self.conn.execute("SELECT chunk FROM chunks")}
        for p in (self.root / CHUNKS).glob("c*"):
            stem = p.name[1:].split(".")[0]
            if p.suffix == ".tmp" or not stem.isdigit() or int(stem) not in known:
                p.unlink(missing_ok=True)
        for p in self.root.glob("*.tmp"):
            p.unlink(missing_ok=True)

    # --- removing -----------------------------------------------------------------------------

    def remove_paths(self, paths: Iterable[str]) -> list[int]:
        """Forget files: their items go (or become tombstones), their file rows go.

        Files recorded as duplicates of a removed file lose their rows too, so the next
        add or sync indexes one of them in its place. Returns the removed item ids.
        """
        paths = list(paths)
        ids: list[int] = []
        with self.transaction():
            for p in paths:
                ids += [
                    int(r[0])
                    for r in self.conn.execute(
                        "SELECT id FROM items WHERE path = ? AND deleted = 0", (p,)
                    )
                ]
                self.conn.execute("DELETE FROM files WHERE path = ? OR duplicate_of = ?", (p, p))
            self._remove_items(ids)
            self._bump_generation()
        return ids

    def remove_ids(self, ids: Iterable[int]) -> list[int]:
        """Remove single items by id (the file row stays: the file is still known)."""
        wanted = [int(i) for i in ids]
        found = [
            int(r[0])
            for i in wanted
            for r in self.conn.execute("SELECT id FROM items WHERE id = ? AND deleted = 0", (i,))
        ]
        with self.transaction():
            self._remove_items(found)
            self._bump_generation()
        return found

    def _remove_items(self, ids: Sequence[int]) -> None:
        manifest = self._manifest_or_empty()
        for i in ids:
            row = self.conn.execute("SELECT modality FROM items WHERE id = ?", (i,)).fetchone()
            if row is None:
                continue
            entry = manifest.get("modalities", {}).get(row[0])
            removable = entry is None or IndexSpec.from_dict(entry["spec"]).removable
            if removable:
                self.conn.execute("DELETE FROM items WHERE id = ?", (i,))
            else:  # the vector stays in the graph until compaction: a tombstone row hides it
                self.conn.execute("UPDATE items SET deleted = 1 WHERE id = ?", (i,))

    # --- reading vectors ----------------------------------------------------------------------

    def live_ids(self, modality: str) -> np.ndarray:
        rows = self.conn.execute(
            "SELECT id FROM items WHERE modality = ? AND deleted = 0 ORDER BY id", (modality,)
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def tombstone_ids(self, modality: str) -> np.ndarray:
        rows = self.conn.execute(
            "SELECT id FROM items WHERE modality = ? AND deleted = 1 ORDER BY id", (modality,)
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def modalities(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT modality FROM items ORDER BY 1")]

    def source(self, modality: str) -> StoreSource:
        return StoreSource(self, self.live_ids(modality))

    def chunk_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk numbers, first ids, counts), ordered by first id."""
        rows = self.conn.execute("SELECT chunk, first_id, count FROM chunks ORDER BY first_id")
        arr = np.array([tuple(r) for r in rows], dtype=np.int64).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    def chunk_vectors(self, chunk: int) -> np.ndarray:
        """A chunk's (count, dim) float32 vectors, memory-mapped (a few kept open)."""
        arr = self._mmaps.get(chunk)
        if arr is None:
            arr = np.load(self.chunk_path(chunk), mmap_mode="r", allow_pickle=False)
            self._mmaps[chunk] = arr
            if len(self._mmaps) > 32:
                self._mmaps.popitem(last=False)
        else:
            self._mmaps.move_to_end(chunk)
        return arr

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of the given ids, (len(ids), dim) float32, in the order given."""
        chunks, firsts, counts = self.chunk_table()
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if not len(ids):
            return out
        pos = np.searchsorted(firsts, ids, side="right") - 1
        safe = np.maximum(pos, 0)
        if (pos < 0).any() or (ids >= firsts[safe] + counts[safe]).any():
            raise IndexCorrupt("an item id has no vector in any chunk")
        for p in np.unique(pos):
            sel = np.nonzero(pos == p)[0]
            out[sel] = self.chunk_vectors(int(chunks[p]))[ids[sel] - firsts[p]]
        return out

    # --- FAISS files and the manifest ---------------------------------------------------------

    def _manifest_or_empty(self) -> dict[str, Any]:
        try:
            return read_manifest(self.root)
        except IndexStoreError:
            return {}

    def refresh(
        self,
        factory: str | None = None,
        memory_budget: int | None = None,
        target_recall: float | None = None,
        rebuild: bool = False,
        log: Any = None,
    ) -> dict[str, Any]:
        """Bring every FAISS file in line with the database, then write the manifest.

        Per modality: a missing file, a different recipe (``factory``: ``auto`` or a factory
        string; default: what the last build used), or too many tombstones mean a rebuild
        (train on a sample, add in blocks, tune and record recall); otherwise the missing ids
        are added and the removed ones removed. Idempotent: rerun after any interruption.
        """
        options = dict(self.get_meta("index_options") or {})
        if factory is not None:
            options["factory"] = factory
        if memory_budget is not None:
            options["memory_budget"] = memory_budget
        if target_recall is not None:
            options["target_recall"] = target_recall
        options.setdefault("factory", "auto")
        options.setdefault("memory_budget", DEFAULT_MEMORY_BUDGET)
        options.setdefault("target_recall", TARGET_RECALL)
        with self.transaction():
            self.set_meta("index_options", options)
        old = self._manifest_or_empty().get("modalities", {})
        entries: dict[str, Any] = {}
        for m in sorted(set(self.modalities()) | set(old)):
            entry = self._refresh_modality(m, old.get(m), options, rebuild, log)
            if entry is not None:
                entries[m] = entry
        # Tombstones that no FAISS file holds any more (after a compaction) can go now.
        with self.transaction():
            for m in entries:
                if entries[m]["tombstones"] == 0:
                    self.conn.execute("DELETE FROM items WHERE modality = ? AND deleted = 1", (m,))
            self._bump_generation()
        for m in set(old) - set(entries):
            (self.root / f"{m}.faiss").unlink(missing_ok=True)
        manifest = self._manifest(entries)
        _atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=2).encode())
        return manifest

    def _refresh_modality(
        self,
        m: str,
        old: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        rebuild: bool,
        log: Any,
    ) -> dict[str, Any] | None:
        live = self.live_ids(m)
        path = self.root / f"{m}.faiss"
        if len(live) == 0:
            path.unlink(missing_ok=True)
            return None
        if options["factory"] == "auto":
            wanted = choose_spec(len(live), self.dim, int(options["memory_budget"]))
        else:
            wanted = IndexSpec.parse(str(options["factory"]))
        spec = None if old is None else IndexSpec.from_dict(old["spec"])
        recall = None if old is None else old.get("recall")
        index = None
        if spec is not None and path.is_file() and not rebuild and spec.factory == wanted.factory:
            index = faiss.read_index(str(path))
            present = index_ids(index)
            tombs = len(present) - np.isin(present, live).sum()
            if not spec.removable and tombs > COMPACT_TOMBSTONES * max(len(present), 1):
                index = None  # compaction: rebuild without the tombstones
        if index is None or spec is None:
            if log is not None:
                log(f"{m}: building {wanted.factory} over {len(live)} vectors")
            index, spec, report = train_and_fill(
                wanted, self.dim, self.source(m), float(options["target_recall"])
            )
            recall = None if report is None else report.to_dict()
            self._write_index(index, path)
        else:
            present = index_ids(index)
            add = np.setdiff1d(live, present)
            gone = np.setdiff1d(present, live)
            if spec.removable and len(gone):
                remove_ids(index, gone)
            if len(add):
                index.add_with_ids(self.gather(add), add)
            if len(add) or (spec.removable and len(gone)):
                self._write_index(index, path)
        ntotal = int(index.ntotal)
        return {
            "file": path.name,
            "spec": spec.to_dict(),
            "count": len(live),
            "ntotal": ntotal,
            "tombstones": ntotal - len(live),
            "removable": spec.removable,
            "recall": recall,
            "sha256": sha256_path(path),
        }

    @staticmethod
    def _write_index(index: faiss.Index, path: Path) -> None:
        tmp = path.with_suffix(".faiss.tmp")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def counts(self) -> dict[str, int]:
        def one(sql: str) -> int:
            return int(self.conn.execute(sql).fetchone()[0])

        return {
            "items": one("SELECT COUNT(*) FROM items WHERE deleted = 0"),
            "files": one("SELECT COUNT(*) FROM files WHERE status = 'indexed'"),
            "duplicates": one("SELECT COUNT(*) FROM files WHERE status = 'duplicate'"),
            "rejected": one("SELECT COUNT(*) FROM files WHERE status = 'rejected'"),
        }

    def _manifest(self, entries: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.fingerprint,
            "dim": self.dim,
            "metric": "inner_product",
            "score": "cosine (vectors are L2-normalised)",
            "checkpoint_path": self.get_meta("checkpoint_path"),
            "settings": self.settings,
            "index_options": self.get_meta("index_options"),
            "modalities": entries,
            "counts": self.counts(),
            "checksums": {
                "items_sha256": items_digest(self.conn),
                "chunks_sha256": chunks_digest(self.conn),
                **{e["file"]: e["sha256"] for e in entries.values()},
            },
            "generation": int(self.get_meta("generation") or 0),
            "next_id": int(self.get_meta("next_id") or 0),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


@dataclass
class StoreSource:
    """A modality's live vectors, read from the chunks (the store's ``VectorSource``)."""

    store: IndexStore
    ids_: np.ndarray

    @property
    def ids(self) -> np.ndarray:
        return self.ids_

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self.store.gather(ids)

    def blocks(self, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.ids_), size):
            ids = self.ids_[start : start + size]
            yield ids, self.store.gather(ids)


class _Transaction:
    """``with store.transaction():`` BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def items_digest(conn: sqlite3.Connection) -> str:
    """sha256 over (id, path, modality, sha256, deleted) of every item row, by id."""
    h = hashlib.sha256()
    for r in conn.execute("SELECT id, path, modality, sha256, deleted FROM items ORDER BY id"):
        h.update(f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\t{r[4]}\n".encode())
    return h.hexdigest()


def chunks_digest(conn: sqlite3.Connection) -> str:
    """sha256 over the chunk table (numbers, id ranges, file checksums)."""
    h = hashlib.sha256()
    for r in conn.execute("SELECT chunk, first_id, count, sha256 FROM chunks ORDER BY 1"):
        h.update(f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\n".encode())
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
