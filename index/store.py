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
import shutil
import sqlite3
import tempfile
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import faiss
import numpy as np

from encoders import Modality, sha256_file
from encoders.modality import TOWERS

from .calibration import Calibration
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


def chunk_file(root: Path, chunk: int) -> Path:
    """The file of chunk number ``chunk`` in the index at ``root`` (the one place it is named)."""
    return Path(root) / CHUNKS / f"c{chunk:08d}.npy"


def _chunk_number(path: Path) -> int | None:
    """The chunk number a committed chunk file name carries; None for any other file."""
    stem = path.name[1:].removesuffix(".npy")
    ok = path.name.startswith("c") and path.suffix == ".npy" and stem.isdigit()
    return int(stem) if ok else None


@dataclass(frozen=True)
class ModalityManifest:
    """One item modality's FAISS file in the manifest: its recipe, counts, recall, checksum."""

    file: str  # a file name inside the index directory, e.g. ``vision.faiss``
    spec: IndexSpec
    count: int  # live items
    ntotal: int  # vectors in the FAISS file (live items + tombstones)
    tombstones: int
    removable: bool
    sha256: str
    recall: Mapping[str, Any] | None = None  # ``RecallReport.to_dict()``; None: exact
    data_file: str | None = None  # an on-disk index's inverted lists (``index.ondisk``)
    data_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "file": self.file,
            "spec": self.spec.to_dict(),
            "count": self.count,
            "ntotal": self.ntotal,
            "tombstones": self.tombstones,
            "removable": self.removable,
            "recall": None if self.recall is None else dict(self.recall),
            "sha256": self.sha256,
        }
        if self.data_file is not None:
            out |= {"data_file": self.data_file, "data_sha256": self.data_sha256}
        return out


@dataclass(frozen=True)
class IndexManifest:
    """``manifest.json``, typed: written by ``IndexStore.refresh``, read by ``read_manifest``.

    The JSON layout is ``to_dict()``; ``from_dict`` is the one place it is read and validated.
    """

    model: Mapping[str, Any]  # the model fingerprint (``index.fingerprint``)
    dim: int
    modalities: Mapping[str, ModalityManifest]
    counts: Mapping[str, int]  # items, files, duplicates, rejected
    checksums: Mapping[str, str]  # items_sha256, chunks_sha256, one per FAISS file
    generation: int  # the database's generation this manifest was written at
    next_id: int
    updated: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    index_options: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None
    dtype: str | None = None  # what the vectors were embedded in ("bfloat16"; "+" if several)
    metric: str = "inner_product"
    version: int = FORMAT_VERSION
    # Per modality pair (``index.calibration``); None in manifests written before it existed:
    # search then merges by raw cosine and says so.
    calibration: Calibration | None = None

    def to_dict(self) -> dict[str, Any]:
        # ``dtype`` only when recorded: an index from before it keeps the layout it had.
        dtype = {} if self.dtype is None else {"dtype": self.dtype}
        return {
            "format": FORMAT,
            "format_version": self.version,
            "model": dict(self.model),
            "dim": self.dim,
            "metric": self.metric,
            "score": "cosine (vectors are L2-normalised)",
            "checkpoint_path": self.checkpoint_path,
            **dtype,
            "settings": dict(self.settings),
            "index_options": dict(self.index_options),
            "modalities": {m: e.to_dict() for m, e in self.modalities.items()},
            "counts": dict(self.counts),
            "checksums": dict(self.checksums),
            "generation": self.generation,
            "next_id": self.next_id,
            "updated": self.updated,
            # only when there is one: older readers and layouts stay as they were
            **({} if self.calibration is None else {"calibration": self.calibration.to_dict()}),
        }

    @classmethod
    def from_dict(cls, data: object, source: str | Path = MANIFEST) -> IndexManifest:
        """Validate a parsed manifest; ``IndexCorrupt`` naming ``source`` and what is wrong."""
        r = _Reader(str(source))
        d = r.obj(data, "the manifest")
        if d.get("format") != FORMAT:
            raise IndexCorrupt(f"{source} is not a bindsearch index manifest (no {FORMAT!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexCorrupt(
                f"{source} has format version {version!r}; this bindsearch reads version "
                f"{FORMAT_VERSION}: rebuild the index"
            )
        mods: dict[str, ModalityManifest] = {}
        for name, value in r.obj(r.key(d, "modalities"), "modalities").items():
            where = f"modalities.{name}"
            if name not in {m.value for m in Modality}:
                r.fail(f"{where} is not a modality ({', '.join(m.value for m in Modality)})")
            e = r.obj(value, where)
            file = r.str_(e, "file", where)
            if file != Path(file).name or not file.endswith(".faiss"):
                r.fail(f"{where}.file is {file!r}, not a .faiss file in the index folder")
            try:
                spec = IndexSpec.from_dict(r.obj(r.key(e, "spec", where), f"{where}.spec"))
            except (KeyError, TypeError, ValueError) as err:
                r.fail(f"{where}.spec is not an index recipe ({err})")
            recall = e.get("recall")
            data_file = e.get("data_file")
            if data_file is not None and (
                not isinstance(data_file, str)
                or data_file != Path(data_file).name
                or not data_file.endswith(".ivfdata")
            ):
                r.fail(f"{where}.data_file is {data_file!r}, not an .ivfdata file in the folder")
            mods[name] = ModalityManifest(
                file=file,
                spec=spec,
                count=r.int_(e, "count", where),
                ntotal=r.int_(e, "ntotal", where),
                tombstones=r.int_(e, "tombstones", where),
                removable=r.bool_(e, "removable", where),
                sha256=r.str_(e, "sha256", where),
                recall=None if recall is None else r.obj(recall, f"{where}.recall"),
                data_file=data_file,
                data_sha256=None if data_file is None else r.str_(e, "data_sha256", where),
            )
        counts = r.obj(r.key(d, "counts"), "counts")
        checksums = r.obj(r.key(d, "checksums"), "checksums")
        path = d.get("checkpoint_path")
        if path is not None and not isinstance(path, str):
            r.fail(f"checkpoint_path is {path!r}, not a string or null")
        dtype = d.get("dtype")
        if dtype is not None and not isinstance(dtype, str):
            r.fail(f"dtype is {dtype!r}, not a string or null")
        if r.int_(d, "dim") < 1:
            r.fail(f"dim is {d['dim']}, not a positive number of dimensions")
        calibration = None
        if d.get("calibration") is not None:
            try:
                calibration = Calibration.from_dict(r.obj(d["calibration"], "calibration"))
            except (KeyError, TypeError, ValueError) as err:
                r.fail(f"calibration is not a calibration ({err})")
        model = r.obj(r.key(d, "model"), "model")
        towers = model.get("towers")
        if towers is not None:
            # per-tower digests (``index.fingerprint``); absent from an index built before them
            tw = r.obj(towers, "model.towers")
            names = [t.value for t in TOWERS]
            for name in tw:
                if name not in names:
                    r.fail(f"model.towers.{name} is not a tower ({', '.join(names)})")
                r.str_(tw, name, "model.towers")
        return cls(
            model=model,
            dim=r.int_(d, "dim"),
            modalities=mods,
            counts={k: r.int_(counts, k, "counts") for k in counts},
            checksums={k: r.str_(checksums, k, "checksums") for k in checksums},
            generation=r.int_(d, "generation"),
            next_id=r.int_(d, "next_id"),
            updated=r.str_(d, "updated"),
            settings=r.obj(d.get("settings") or {}, "settings"),
            index_options=r.obj(d.get("index_options") or {}, "index_options"),
            checkpoint_path=path,
            dtype=dtype,
            metric=r.str_(d, "metric"),
            version=FORMAT_VERSION,
            calibration=calibration,
        )


class _Reader:
    """Typed reads of a parsed manifest: each failure is one ``IndexCorrupt`` line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, what: str) -> NoReturn:
        raise IndexCorrupt(f"{self.source} is malformed: {what}")

    def obj(self, value: object, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{where} is a JSON {_json_type(value)}, not an object")
        return value

    def key(self, d: Mapping[str, Any], key: str, where: str = "") -> Any:
        if key not in d:
            self.fail(f"{where + '.' if where else ''}{key} is missing")
        return d[key]

    def int_(self, d: Mapping[str, Any], key: str, where: str = "") -> int:
        value = self.key(d, key, where)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{where + '.' if where else ''}{key} is {value!r}, not an integer")
        return value

    def str_(self, d: Mapping[str, Any], key: str, where: str = "") -> str:
        value = self.key(d, key, where)
        if not isinstance(value, str):
            self.fail(f"{where + '.' if where else ''}{key} is {value!r}, not a string")
        return value

    def bool_(self, d: Mapping[str, Any], key: str, where: str = "") -> bool:
        value = self.key(d, key, where)
        if not isinstance(value, bool):
            self.fail(f"{where + '.' if where else ''}{key} is {value!r}, not true or false")
        return value


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_manifest(root: Path) -> IndexManifest:
    """The index's validated ``manifest.json``; ``IndexIncomplete`` if a build never finished.

    Raises ``IndexCorrupt`` (one line naming the file and what is wrong) when it is not JSON,
    not a manifest, of another format version, or has a field of the wrong type.
    """
    root = Path(root)
    path = root / MANIFEST
    if not (root / META).is_file():
        raise IndexNotFound(f"no index at {root} (no {META})")
    if not path.is_file():
        raise IndexIncomplete(
            f"the index at {root} is incomplete (its build was interrupted): rerun the build"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexCorrupt(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise IndexCorrupt(f"cannot read {path}: {e.strerror or e}") from None
    return IndexManifest.from_dict(data, path)


class IndexStore:
    """Read-write access to one index directory (the build, add, remove and sync commands)."""

    def __init__(self, root: Path, conn: sqlite3.Connection) -> None:
        self.root = root
        self.conn = conn
        # Open chunk files, least recently used first. Vectors are read with ``preadv`` into
        # private buffers: never a mapping (a chunk truncated under one is SIGBUS, and mapped
        # pages count in the process's resident set, fault-around included), never a whole chunk
        # for a few rows (re-ranking reads ``rerank`` rows per query, not gigabytes).
        self._chunk_fds: OrderedDict[int, _ChunkFile] = OrderedDict()
        # A snapshot checks each chunk file against its recorded sha256 when it opens it, and
        # keeps reading that file (that inode) even once a rebuild renames another into place.
        self._verify_chunks = False
        # (chunk, inode, size, mtime) of chunk files already checked: reopening one the LRU
        # closed does not read and hash it again (a replaced or rewritten file is checked anew).
        self._verified: set[tuple[int, int, int, int]] = set()

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

    @classmethod
    def open_readonly(cls, root: Path) -> IndexStore:
        """Open an index for reading only (search, verify, info): no repair, no writes."""
        root = Path(root)
        if not (root / META).is_file():
            raise IndexNotFound(f"no index at {root} (no {META})")
        return cls(root, connect(root / META, readonly=True))

    @classmethod
    def open_snapshot(cls, root: Path) -> IndexStore:
        """A consistent, private, read-only copy of the index's database (what a server serves).

        The copy is taken in one read transaction (SQLite's backup) into a temporary file that
        nothing else writes (unlinked once open), so later ``sync``/``add``/``remove``, a
        rebuild renamed into place or an ``rm -rf`` never change what this store answers, nor
        can its reads disturb them. Chunk files are read from ``root`` whole, each checked
        against its recorded sha256 (a chunk replaced under the snapshot is an error, never
        another vector). Raises ``IndexCorrupt`` (one line) when the database cannot be read.
        """
        root = Path(root)
        meta = root / META
        if not meta.is_file():
            raise IndexNotFound(f"no index at {root} (no {META})")
        private = Path(tempfile.mkdtemp(prefix="bindsearch-snapshot-"))
        copy = private / META
        try:
            _backup(meta, copy)
            store = cls(root, connect(copy, readonly=True))
            if store.get_meta("fingerprint") is None:
                store.close()
                raise IndexCorrupt(f"{meta} has no model fingerprint")
        except sqlite3.Error:
            shutil.rmtree(private, ignore_errors=True)
            raise _damaged(meta, "cannot be read", root) from None
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        store._verify_chunks = True
        # The open connection keeps reading the unlinked copy: nothing is left behind, even
        # when the process is killed.
        shutil.rmtree(private, ignore_errors=True)
        return store

    def close(self) -> None:
        self._close_chunk_files()
        self.conn.close()

    def _close_chunk_files(self) -> None:
        while self._chunk_fds:
            _, cf = self._chunk_fds.popitem()
            os.close(cf.fd)

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

    @property
    def generation(self) -> int:
        """Bumped by every committed change; the manifest records the one it was written at."""
        return int(self.get_meta("generation") or 0)

    def _bump_generation(self) -> None:
        self.set_meta("generation", self.generation + 1)

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
        return chunk_file(self.root, chunk)

    def _write_chunk(self, chunk: int, vectors: np.ndarray) -> str:
        path = self.chunk_path(chunk)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
        stale = self._chunk_fds.pop(chunk, None)
        if stale is not None:
            os.close(stale.fd)
        return sha256_path(path)

    def drop_orphan_chunks(self) -> None:
        """Delete chunk files a crash left without rows (and temporary files)."""
        known = {int(r[0]) for r in self.conn.execute("SELECT chunk FROM chunks")}
        for p in (self.root / CHUNKS).glob("c*"):
            if _chunk_number(p) not in known:
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
        manifest = self._manifest_or_none()
        entries = {} if manifest is None else manifest.modalities
        for i in ids:
            row = self.conn.execute("SELECT modality FROM items WHERE id = ?", (i,)).fetchone()
            if row is None:
                continue
            entry = entries.get(row[0])
            removable = entry is None or entry.spec.removable
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

    def tagged_ids(self, modality: str, tags: Sequence[str]) -> np.ndarray:
        """Live ids of ``modality`` whose items carry every one of ``tags``, ascending."""
        sql = "SELECT id FROM items WHERE modality = ? AND deleted = 0"
        args: list[Any] = [modality]
        for tag in dict.fromkeys(tags):
            # instr() on the stored JSON text skips most rows before json_each parses them.
            sql += (
                " AND instr(tags, ?) > 0"
                " AND EXISTS (SELECT 1 FROM json_each(items.tags) WHERE value = ?)"
            )
            args += [json.dumps(str(tag)), str(tag)]
        rows = self.conn.execute(sql + " ORDER BY id", args).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def item_metadata(
        self, ids: Sequence[int], cols: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Live items' metadata by id, one dict per id in order; ``{}`` for an unknown id.

        ``cols``: among ``ITEM_COLUMNS`` (default: all); ``tags`` come back as a list.
        """
        columns = list(ITEM_COLUMNS if cols is None else cols)
        unknown = sorted(set(columns) - set(ITEM_COLUMNS))
        if unknown:
            raise ValueError(f"unknown metadata columns {unknown}; accepted: {list(ITEM_COLUMNS)}")
        wanted = [int(i) for i in ids]
        fetch = ", ".join(sorted(set(columns) | {"id"}))
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(wanted), 500):
            part = [i for i in wanted[start : start + 500] if storable_id(i)]
            if not part:
                continue
            marks = ",".join("?" * len(part))
            sql = f"SELECT {fetch} FROM items WHERE deleted = 0 AND id IN ({marks})"
            for r in self.conn.execute(sql, part):
                found[int(r["id"])] = {c: _column(c, r[c]) for c in columns}
        return [found.get(i, {}) for i in wanted]

    def item_vector(self, item_id: int) -> np.ndarray | None:
        """A live item's stored (dim,) vector, exactly as embedded; None if there is none."""
        if not storable_id(item_id):
            return None
        row = self.conn.execute(
            "SELECT i.chunk, c.first_id FROM items i JOIN chunks c ON c.chunk = i.chunk "
            "WHERE i.id = ? AND i.deleted = 0",
            (int(item_id),),
        ).fetchone()
        if row is None:
            return None
        local = np.array([int(item_id) - int(row[1])], dtype=np.int64)
        vector: np.ndarray = self._read_rows(int(row[0]), local)[0]
        return vector

    def check_files(self, manifest: IndexManifest) -> None:
        """Check every chunk file against its recorded sha256 (cached by size and mtime).

        Raises ``IndexCorrupt`` naming the first damaged file. FAISS files are checked as
        they are read (``read_faiss``).
        """
        for chunk, _first, _count, digest in self.chunk_rows():
            _check_sha256(self.chunk_path(chunk), digest, self.root)

    def chunk_rows(self) -> list[tuple[int, int, int, str]]:
        """(chunk, first id, count, sha256) of every committed chunk, by chunk number."""
        rows = self.conn.execute("SELECT chunk, first_id, count, sha256 FROM chunks ORDER BY 1")
        return [(int(r[0]), int(r[1]), int(r[2]), str(r[3])) for r in rows]

    def item_chunks(self) -> list[tuple[int, int]]:
        """(item id, chunk) of every item row, tombstones included."""
        return [(int(r[0]), int(r[1])) for r in self.conn.execute("SELECT id, chunk FROM items")]

    def modality_rows(self, modality: str) -> list[tuple[int, int, bool]]:
        """(item id, chunk, deleted) of a modality's item rows, by id."""
        rows = self.conn.execute(
            "SELECT id, chunk, deleted FROM items WHERE modality = ? ORDER BY id", (modality,)
        )
        return [(int(r[0]), int(r[1]), bool(r[2])) for r in rows]

    def modalities(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT modality FROM items ORDER BY 1")]

    def source(self, modality: str) -> StoreSource:
        return StoreSource(self, self.live_ids(modality))

    def chunk_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk numbers, first ids, counts), ordered by first id."""
        rows = self.conn.execute("SELECT chunk, first_id, count FROM chunks ORDER BY first_id")
        arr = np.array([tuple(r) for r in rows], dtype=np.int64).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    def _chunk_file(self, chunk: int) -> _ChunkFile:
        """The open file of a committed chunk (a few kept open, least recently used closed)."""
        cf = self._chunk_fds.get(chunk)
        if cf is not None:
            self._chunk_fds.move_to_end(chunk)
            return cf
        cf = self._open_chunk(chunk)
        self._chunk_fds[chunk] = cf
        if len(self._chunk_fds) > MAX_OPEN_CHUNKS:
            _, old = self._chunk_fds.popitem(last=False)
            os.close(old.fd)
        return cf

    def _open_chunk(self, chunk: int) -> _ChunkFile:
        """Open a chunk file and check it is the (count, dim) float32 ``.npy`` its row says.

        Raises ``IndexCorrupt`` naming the file when it is missing, unreadable, not a plain
        ``.npy`` (a pickle, an archive), of another shape or dtype, or shorter than its header
        says; a snapshot also when its bytes are not the ones recorded.
        """
        path = self.chunk_path(chunk)
        row = self.conn.execute(
            "SELECT count, sha256 FROM chunks WHERE chunk = ?", (chunk,)
        ).fetchone()
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _damaged(path, "is missing", self.root) from None
        except OSError as e:
            raise _damaged(path, f"cannot be read ({_reason(e)})", self.root) from None
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                if self._verify_chunks and row is not None:
                    st = os.fstat(fd)
                    seen = (chunk, st.st_ino, st.st_size, st.st_mtime_ns)
                    if seen not in self._verified:
                        if hashlib.file_digest(f, "sha256").hexdigest() != row[1]:
                            raise _damaged(path, "does not match its recorded sha256", self.root)
                        f.seek(0)
                        self._verified.add(seen)
                offset, shape, dtype = _npy_header(f, path, self.root)
            count = None if row is None else int(row[0])
            if dtype != np.dtype("<f4") or shape != (count, self.dim):
                what = f"holds {shape} {dtype}, not ({count}, {self.dim}) float32"
                raise _damaged(path, what, self.root)
            size = os.fstat(fd).st_size
            if size < offset + int(np.prod(shape)) * 4:
                raise _damaged(path, "is truncated", self.root)
        except BaseException:
            os.close(fd)
            raise
        return _ChunkFile(fd, offset, int(shape[0]), path)

    def _read_rows(self, chunk: int, rows: np.ndarray) -> np.ndarray:
        """Vectors of a chunk's ``rows`` (positions in it), (len(rows), dim) float32, in order.

        Consecutive rows are read in one ``preadv`` straight into the result.
        """
        cf = self._chunk_file(chunk)
        want, inverse = np.unique(rows, return_inverse=True)
        if len(want) and (want[0] < 0 or want[-1] >= cf.count):
            raise IndexCorrupt(f"{cf.path} has no row {int(want[-1])}")
        buf = np.empty((len(want), self.dim), dtype=np.float32)
        row_bytes = self.dim * 4
        breaks = np.flatnonzero(np.diff(want) != 1) + 1
        starts = np.concatenate(([0], breaks)).astype(np.int64)
        ends = np.concatenate((breaks, [len(want)])).astype(np.int64)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            if a == b:
                continue
            view = memoryview(buf[a:b].data).cast("B")
            at = cf.offset + int(want[a]) * row_bytes
            try:
                got = os.preadv(cf.fd, [view], at)
            except OSError as e:
                raise _damaged(cf.path, f"cannot be read ({_reason(e)})", self.root) from None
            if got != len(view):  # cut short since it was opened
                raise _damaged(cf.path, "is truncated", self.root)
        if np.array_equal(want, rows):  # already sorted and unique: no copy
            return buf
        return buf[inverse.reshape(-1)]

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
            out[sel] = self._read_rows(int(chunks[p]), ids[sel] - firsts[p])
        return out

    # --- FAISS files and the manifest ---------------------------------------------------------

    def _manifest_or_none(self) -> IndexManifest | None:
        try:
            return read_manifest(self.root)
        except IndexStoreError:
            return None

    def refresh(
        self,
        factory: str | None = None,
        memory_budget: int | None = None,
        target_recall: float | None = None,
        rebuild: bool = False,
        log: Any = None,
        calibration: Calibration | None = None,
    ) -> IndexManifest:
        """Bring every FAISS file in line with the database, then write the manifest.

        ``calibration``: the manifest's new one (``index.calibration``); None keeps the last.

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
        previous = self._manifest_or_none()
        old = {} if previous is None else previous.modalities
        entries: dict[str, ModalityManifest] = {}
        for m in sorted(set(self.modalities()) | set(old)):
            entry = self._refresh_modality(m, old.get(m), options, rebuild, log)
            if entry is not None:
                entries[m] = entry
        # Tombstones that no FAISS file holds any more (after a compaction) can go now.
        with self.transaction():
            for m in entries:
                if entries[m].tombstones == 0:
                    self.conn.execute("DELETE FROM items WHERE modality = ? AND deleted = 1", (m,))
            self._bump_generation()
        for m in set(old) - set(entries):
            (self.root / f"{m}.faiss").unlink(missing_ok=True)
            (self.root / f"{m}.ivfdata").unlink(missing_ok=True)
        if calibration is None and previous is not None:
            calibration = previous.calibration
        manifest = self._manifest(entries, calibration)
        _atomic_write(self.root / MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode())
        return manifest

    def _refresh_modality(
        self,
        m: str,
        old: ModalityManifest | None,
        options: Mapping[str, Any],
        rebuild: bool,
        log: Any,
    ) -> ModalityManifest | None:
        live = self.live_ids(m)
        path = self.root / f"{m}.faiss"
        if len(live) == 0:
            path.unlink(missing_ok=True)
            return None
        if options["factory"] == "auto":
            wanted = choose_spec(len(live), self.dim, int(options["memory_budget"]))
        else:
            wanted = IndexSpec.parse(str(options["factory"]))
        if wanted.on_disk:
            from .ondisk import data_path, refresh_ondisk

            target = float(options["target_recall"])
            last = None if old is None else (old.spec, old.sha256, old.data_sha256, old.recall)
            built, report = refresh_ondisk(self, m, wanted, last, live, target, rebuild, log)
            data = data_path(path)
            return ModalityManifest(
                file=path.name,
                spec=built,
                count=len(live),
                ntotal=len(live),
                tombstones=0,
                removable=True,
                sha256=sha256_path(path),
                recall=report,
                data_file=data.name,
                data_sha256=sha256_file(data),
            )
        (self.root / f"{m}.ivfdata").unlink(missing_ok=True)  # was on disk, now in memory
        spec = None if old is None or old.spec.on_disk else old.spec
        recall = None if old is None else old.recall
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
        return ModalityManifest(
            file=path.name,
            spec=spec,
            count=len(live),
            ntotal=ntotal,
            tombstones=ntotal - len(live),
            removable=spec.removable,
            sha256=sha256_path(path),
            recall=recall,
        )

    @staticmethod
    def _write_index(index: faiss.Index, path: Path) -> None:
        tmp = path.with_suffix(".faiss.tmp")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)

    def counts(self) -> dict[str, int]:
        def one(sql: str) -> int:
            return int(self.conn.execute(sql).fetchone()[0])

        return {
            "items": one("SELECT COUNT(*) FROM items WHERE deleted = 0"),
            "files": one("SELECT COUNT(*) FROM files WHERE status = 'indexed'"),
            "duplicates": one("SELECT COUNT(*) FROM files WHERE status = 'duplicate'"),
            "rejected": one("SELECT COUNT(*) FROM files WHERE status = 'rejected'"),
        }

    def _manifest(
        self, entries: dict[str, ModalityManifest], calibration: Calibration | None = None
    ) -> IndexManifest:
        return IndexManifest(
            model=self.fingerprint,
            dim=self.dim,
            modalities=entries,
            counts=self.counts(),
            checksums={
                "items_sha256": items_digest(self.conn),
                "chunks_sha256": chunks_digest(self.conn),
                **{e.file: e.sha256 for e in entries.values()},
                **{e.data_file: e.data_sha256 or "" for e in entries.values() if e.data_file},
            },
            generation=self.generation,
            next_id=int(self.get_meta("next_id") or 0),
            updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            settings=self.settings,
            index_options=self.get_meta("index_options") or {},
            checkpoint_path=self.get_meta("checkpoint_path"),
            dtype=self.get_meta("dtype"),
            calibration=calibration,
        )


def _backup(src: Path, dst: Path) -> None:
    """Copy the database ``src`` to ``dst`` in one read transaction (SQLite's backup)."""
    uri = "file:" + urllib.parse.quote(str(Path(src).resolve())) + "?mode=ro"
    source = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        target = sqlite3.connect(dst)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()


def replacement_dir(out: Path) -> Path:
    """Where ``index build -o OUT`` writes: ``OUT`` itself, or a sibling it is renamed from.

    A complete index at ``OUT`` (a server may have its files open) is never written into: it is
    copied beside it, into ``.<name>.building`` (chunks hard-linked, the database copied), the
    build updates the copy and ``move_into_place`` renames it over ``OUT``. An interrupted
    replacement resumes from that directory. A new ``OUT``, or a build of ``OUT`` that never
    finished, is written in place as before.
    """
    out = Path(out)
    work = _work_dir(out)
    if work.is_dir() and (work / META).is_file():
        return work  # an interrupted replacement: resume it
    try:
        read_manifest(out)
    except IndexStoreError:
        return out  # nothing complete to protect
    shutil.rmtree(work, ignore_errors=True)
    tmp = work.with_name(work.name.replace(".building", ".seeding"))
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / CHUNKS).mkdir(parents=True)
    _backup(out / META, tmp / META)
    for chunk in (out / CHUNKS).glob("c*.npy"):
        try:
            os.link(chunk, tmp / CHUNKS / chunk.name)  # never written again once committed
        except OSError:
            shutil.copy2(chunk, tmp / CHUNKS / chunk.name)
    for f in [*out.glob("*.faiss"), out / MANIFEST]:
        shutil.copy2(f, tmp / f.name)  # replaced by rename when refreshed, but copied anyway
    for f in out.glob("*.ivfdata"):  # on-disk lists: replaced by rename too, never rewritten
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    os.replace(tmp, work)
    fsync_path(work.parent)
    return work


def _work_dir(out: Path) -> Path:
    # A mount point (a Docker volume) cannot be renamed: the copy lives inside it instead.
    if os.path.ismount(out):
        return out / ".building"
    return out.parent / f".{out.name}.building"


def move_into_place(work: Path, out: Path) -> None:
    """Rename a finished replacement ``work`` over ``out`` (the old index is then removed).

    ``work`` beside ``out``: two directory renames. ``work`` inside ``out`` (a mount point):
    file by file, each one linked and renamed over its old self, chunks first and the manifest
    last, so a crash leaves ``work`` whole and a rerun finishes the swap; readers refuse the
    mix meanwhile (the manifest's generation and checksums do not match).
    """
    work, out = Path(work), Path(out)
    if work == out:
        return
    if _same_index(work, out):  # a rerun that changed nothing: the served files stay as they are
        shutil.rmtree(work)
        return
    if work.parent == out:
        _swap_files(work, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    fsync_path(out.parent)
    for stale in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _same_index(a: Path, b: Path) -> bool:
    """Whether two complete indexes hold the same items, files, chunks and FAISS files."""
    try:
        one, two = read_manifest(a).to_dict(), read_manifest(b).to_dict()
    except IndexStoreError:
        return False
    for d in (one, two):
        d.pop("updated", None)
        d.pop("generation", None)
    return one == two


def _swap_files(work: Path, out: Path) -> None:
    (out / CHUNKS).mkdir(exist_ok=True)
    names = [f"{CHUNKS}/{p.name}" for p in sorted((work / CHUNKS).glob("c*.npy"))]
    names += [p.name for p in sorted(work.glob("*.ivfdata"))]
    names += [p.name for p in sorted(work.glob("*.faiss"))] + [META, MANIFEST]
    for name in names:
        src, dst = work / name, out / name
        if dst.exists() and os.path.samefile(src, dst):
            continue
        tmp = dst.with_name(dst.name + ".swap")
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    keep = set(names)
    for p in [*out.glob("*.faiss"), *out.glob("*.ivfdata")]:
        if p.name not in keep:
            p.unlink()
    fsync_path(out / CHUNKS)
    fsync_path(out)
    shutil.rmtree(work)


def read_faiss(path: Path, sha256: str, root: Path) -> faiss.Index:
    """A FAISS file, checked against its manifest sha256 as it is read (one read of the bytes).

    Raises ``IndexCorrupt`` (one line naming the file) when it is missing, does not match, or
    FAISS cannot read it.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise _damaged(path, "is missing", root) from None
    except OSError as e:
        raise _damaged(path, f"cannot be read ({_reason(e)})", root) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise _damaged(path, "does not match its sha256 in the manifest", root)
    try:
        index: faiss.Index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError:
        raise _damaged(path, "is not a FAISS index FAISS can read", root) from None
    return index


def _check_sha256(path: Path, digest: str, root: Path) -> None:
    problem = _sha256_problem(path, digest, "does not match its recorded sha256")
    if problem is not None:
        raise _damaged(path, problem, root)


def _sha256_problem(path: Path, digest: str, mismatch: str) -> str | None:
    """What is wrong with ``path`` against ``digest`` ("is missing", "cannot be read (...)",
    or ``mismatch``), or None when it matches. Hashes are memoised per (file, size, mtime,
    inode) by ``sha256_file``."""
    try:
        known = sha256_file(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({_reason(e)})"
    return None if known == digest else mismatch


def faiss_file_problems(root: Path, manifest: IndexManifest) -> list[str]:
    """What is wrong with each modality's FAISS files (an on-disk index's lists too), checked
    against the manifest's sha256 without loading them (``index info``).

    One phrase per damaged file, worded as ``read_faiss`` words it ("vision.faiss is
    missing"); empty when every file matches. Hashes are memoised per (file, size, mtime,
    inode) in the process, as the chunks' are.
    """
    out: list[str] = []
    for entry in manifest.modalities.values():
        files = [(entry.file, entry.sha256)]
        if entry.data_file is not None and entry.data_sha256 is not None:
            files.append((entry.data_file, entry.data_sha256))
        for name, digest in files:
            problem = _sha256_problem(
                Path(root) / name, digest, "does not match its sha256 in the manifest"
            )
            if problem is not None:
                out.append(f"{name} {problem}")
    return out


def damaged_error(root: Path, problems: Sequence[str]) -> IndexCorrupt:
    """The one line that refuses a damaged index: what is wrong with which files, what to do."""
    return IndexCorrupt(
        f"the index at {root} is damaged: {'; '.join(problems)}; "
        f"run `bindsearch index verify {root}`, then rebuild it"
    )


def _damaged(path: Path, what: str, root: Path) -> IndexCorrupt:
    return damaged_error(root, [f"{os.path.relpath(path, root)} {what}"])


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).split("\n")[0] or type(e).__name__


MAX_OPEN_CHUNKS = 64  # chunk files an open store keeps open


@dataclass(frozen=True)
class _ChunkFile:
    """An open chunk file: where its (count, dim) float32 rows start."""

    fd: int
    offset: int
    count: int
    path: Path


def _npy_header(f: Any, path: Path, root: Path) -> tuple[int, tuple[int, ...], np.dtype[Any]]:
    """(data offset, shape, dtype) of a C-ordered ``.npy``; ``IndexCorrupt`` for anything else."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format version {version}")
    except (OSError, ValueError, EOFError) as e:
        raise _damaged(path, f"is not a .npy array ({_reason(e)})", root) from None
    if fortran or dtype.hasobject:
        raise _damaged(path, "is not a plain C-ordered .npy array", root)
    return f.tell(), tuple(shape), dtype


def storable_id(item_id: int) -> bool:
    """Whether an id fits SQLite's (and FAISS's) int64; others cannot be in an index."""
    return -(1 << 63) <= item_id < (1 << 63)


def _column(name: str, value: Any) -> Any:
    if name == "tags":
        return json.loads(value) if value else []
    return value


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
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """``fsync`` a file or a folder (a folder: so that a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
