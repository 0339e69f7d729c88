"""Searching an index: ``open_index(path) -> IndexSearcher``, the API the service uses.

Every item modality has its own FAISS index over one shared embedding space, so a query
vector of any modality searches any of them; results are merged by cosine score.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from encoders import Modality

from .errors import DimensionMismatch, IndexCorrupt, IndexIncomplete
from .fingerprint import check_fingerprint, encoder_fingerprint
from .spec import IndexSpec, apply_search_params, gpu_available, index_ids, to_gpu
from .store import ITEM_COLUMNS, META, connect, read_manifest


@dataclass(frozen=True)
class Hit:
    """One search result: the item, its cosine score, and where it sits in its file."""

    id: int
    score: float
    modality: str
    path: str
    start: float | None = None  # segment start, seconds (audio and video items)
    end: float | None = None
    caption: str | None = None
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d


class MetadataStore(Protocol):
    """Item metadata by id (clip-retrieval's provider interface)."""

    def get(
        self, ids: Sequence[int], cols: Sequence[str] | None = None
    ) -> list[dict[str, Any]]: ...


class SqliteMetadata:
    """``MetadataStore`` over ``meta.sqlite`` (thread-safe; removed items are not returned)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def get(self, ids: Sequence[int], cols: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One dict per id, in order; ``{}`` for an id that is not (or no longer) indexed."""
        columns = list(ITEM_COLUMNS if cols is None else cols)
        unknown = sorted(set(columns) - set(ITEM_COLUMNS))
        if unknown:
            raise ValueError(f"unknown metadata columns {unknown}; accepted: {list(ITEM_COLUMNS)}")
        wanted = [int(i) for i in ids]
        fetch = sorted(set(columns) | {"id"})
        found: dict[int, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(wanted), 500):
                part = [i for i in wanted[start : start + 500] if _storable(i)]
                if not part:
                    continue
                marks = ",".join("?" * len(part))
                rows = self._conn.execute(
                    f"SELECT {', '.join(fetch)} FROM items WHERE deleted = 0 AND id IN ({marks})",
                    part,
                )
                for r in rows:
                    found[int(r["id"])] = {c: _column(c, r[c]) for c in columns}
        return [found.get(i, {}) for i in wanted]


def _storable(item_id: int) -> bool:
    """Whether an id fits SQLite's (and FAISS's) int64; others cannot be indexed."""
    return -(1 << 63) <= item_id < (1 << 63)


def _column(name: str, value: Any) -> Any:
    if name == "tags":
        return json.loads(value) if value else []
    return value


# Exact search of a CPU ``Flat`` index: FAISS scores a single query one stored vector at a time
# on one thread, about half the machine's memory bandwidth. One BLAS matrix-vector product over
# the index's own vectors (no copy) and a partial sort reach 0.9 of it (``python -m bench --only
# index``, ratio 7): what the service runs per request. Measured on 30k and 100k x 1024 (2 cores):
# for 16 to 64 queries one matrix product is also 1.8-3.8x faster than FAISS (which still scans
# query by query there); for 2 to 8 FAISS's queries in parallel threads and from 128 its own BLAS
# path are faster, so those stay with FAISS.
SCAN_BLOCK_BYTES = 1 << 26  # scores held at once: (rows in a block) x (queries) x 4 bytes


class FlatScan:
    """Exact inner-product top-k over the vectors of a CPU ``IDMap2(Flat)`` index, in place."""

    def __init__(self, index: faiss.Index, ids: np.ndarray | None = None) -> None:
        """``ids``: the index's ``index_ids`` when the caller has them already."""
        inner: Any = faiss.downcast_index(index.index)  # type: ignore[attr-defined]
        n, d = int(inner.ntotal), int(inner.d)
        self._owner = index  # ``vectors`` is a view of its memory
        self.vectors = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d)
        self.ids = index_ids(index) if ids is None else ids

    @staticmethod
    def supports(index: faiss.Index) -> bool:
        """A CPU ``IDMap2`` over an inner-product ``IndexFlat`` holding vectors."""
        if not isinstance(index, faiss.IndexIDMap2) or index.ntotal == 0:
            return False
        inner = faiss.downcast_index(index.index)
        ip = inner.metric_type == faiss.METRIC_INNER_PRODUCT
        return isinstance(inner, faiss.IndexFlat) and ip

    @staticmethod
    def wants(queries: int) -> bool:
        """Whether this scan beats FAISS's own search for a batch of ``queries``."""
        return queries == 1 or 16 <= queries <= 64

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, k) scores and ids, best first, as ``Index.search`` (``k`` <= ntotal)."""
        # float32 as FAISS takes it: a float64 query would upcast (copy) every stored vector.
        q = np.ascontiguousarray(q, dtype=np.float32).reshape(-1, self.vectors.shape[1])
        n, nq = len(self.vectors), len(q)
        rows = max(k, SCAN_BLOCK_BYTES // (4 * nq))
        best_s, best_i = [], []
        for start in range(0, n, rows):
            block = self.vectors[start : start + rows]
            s = (block @ q[0])[None] if nq == 1 else np.ascontiguousarray((block @ q.T).T)
            kk = min(k, s.shape[1])
            top = np.argpartition(s, s.shape[1] - kk, axis=1)[:, s.shape[1] - kk :]
            best_s.append(np.take_along_axis(s, top, axis=1))
            best_i.append(top + start)
        scores, rows_ = np.concatenate(best_s, axis=1), np.concatenate(best_i, axis=1)
        if scores.shape[1] > k:
            top = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k :]
            scores = np.take_along_axis(scores, top, axis=1)
            rows_ = np.take_along_axis(rows_, top, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        return (
            np.take_along_axis(scores, order, axis=1),
            self.ids[np.take_along_axis(rows_, order, axis=1)],
        )


@dataclass
class _ModalityIndex:
    index: faiss.Index
    spec: IndexSpec
    tombstones: np.ndarray  # ids still in the FAISS index whose rows are marked deleted
    scan: FlatScan | None = None  # CPU Flat indexes: FlatScan for the batch sizes it wins

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.scan is not None and FlatScan.wants(len(q)):
            return self.scan.search(q, k)
        dist, ids = self.index.search(q, k)
        return dist, ids


class IndexSearcher:
    """A loaded index: ``search`` by vectors, ``get`` metadata, ``vector`` of a stored item."""

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        conn: sqlite3.Connection,
        indexes: dict[Modality, _ModalityIndex],
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.metadata = SqliteMetadata(conn)
        self._conn = conn
        self._lock = threading.Lock()
        self._indexes = indexes

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """The item modalities this index holds."""
        return tuple(self._indexes)

    @property
    def fingerprint(self) -> dict[str, Any]:
        value: dict[str, Any] = self.manifest["model"]
        return value

    def counts(self) -> dict[Modality, int]:
        return {m: int(self.manifest["modalities"][m.value]["count"]) for m in self._indexes}

    def search(
        self,
        vectors: np.ndarray,
        k: int = 10,
        targets: Sequence[Modality | str] | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` items per query row over the ``targets`` modalities (default: all).

        Args:
            vectors: (N, D) float32 query embeddings (rows are L2-normalised here).
            targets: item modalities to search; ones the index does not hold add nothing.
        Returns: per query, up to ``k`` hits by descending cosine score.
        """
        q = self._check_queries(vectors)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        chosen = self.modalities if targets is None else [Modality.parse(t) for t in targets]
        scored: list[tuple[np.ndarray, np.ndarray, Modality]] = []
        for m in dict.fromkeys(chosen):
            mi = self._indexes.get(m)
            if mi is None or mi.index.ntotal == 0:
                continue
            # Tombstoned ids (HNSW cannot remove) are fetched and dropped: over-fetch by them.
            kk = min(k + len(mi.tombstones), int(mi.index.ntotal))
            dist, ids = mi.search(q, kk)
            if len(mi.tombstones):
                dead = np.isin(ids, mi.tombstones)
                ids = np.where(dead, -1, ids)
                dist = np.where(dead, -np.inf, dist)
            scored.append((dist, ids, m))
        if not scored:
            return [[] for _ in range(len(q))]
        dist = np.concatenate([d for d, _, _ in scored], axis=1)
        ids = np.concatenate([i for _, i, _ in scored], axis=1)
        mods = np.concatenate([np.full(i.shape[1], n) for n, (_, i, _) in enumerate(scored)])
        order = np.argsort(-dist, axis=1, kind="stable")[:, :k]
        picks = [
            [(int(ids[r, c]), float(dist[r, c]), scored[mods[c]][2]) for c in row if ids[r, c] >= 0]
            for r, row in enumerate(order)
        ]
        meta = self.metadata.get(
            sorted({i for row in picks for i, _, _ in row}),
            ["id", "path", "start_s", "end_s", "caption", "tags"],
        )
        by_id = {int(d["id"]): d for d in meta if d}
        out: list[list[Hit]] = []
        for row in picks:
            hits = []
            for i, score, m in row:
                d = by_id.get(i)
                if d is None:  # removed between the FAISS file and now: not a result
                    continue
                hits.append(
                    Hit(
                        i,
                        score,
                        m.value,
                        d["path"],
                        d["start_s"],
                        d["end_s"],
                        d["caption"],
                        tuple(d["tags"]),
                    )
                )
            out.append(hits)
        return out

    def get(self, ids: Sequence[int], cols: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Metadata rows by id (``MetadataStore.get``)."""
        return self.metadata.get(ids, cols)

    def vector(self, item_id: int) -> np.ndarray:
        """The stored (D,) unit vector of an item, exactly as embedded (search by item id)."""
        if not _storable(item_id):
            raise KeyError(f"no item with id {item_id} in the index")
        with self._lock:
            row = self._conn.execute(
                "SELECT i.chunk, c.first_id FROM items i JOIN chunks c ON c.chunk = i.chunk "
                "WHERE i.id = ? AND i.deleted = 0",
                (int(item_id),),
            ).fetchone()
        if row is None:
            raise KeyError(f"no item with id {item_id} in the index")
        path = self.root / "chunks" / f"c{int(row[0]):08d}.npy"
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return np.array(arr[int(item_id) - int(row[1])], dtype=np.float32)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> IndexSearcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_queries(self, vectors: np.ndarray) -> np.ndarray:
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2:
            raise ValueError(f"query vectors must be (N, D), got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise DimensionMismatch(expected=self.dim, got=q.shape[1])
        if not np.isfinite(q).all():
            raise ValueError("query vectors contain NaN or infinity")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError("a query vector is all zeros")
        return np.ascontiguousarray(q / norms, dtype=np.float32)


def open_index(
    path: str | Path,
    encoder: Any = None,
    *,
    checkpoint: str | Path | None = None,
    gpu: bool | None = None,
) -> IndexSearcher:
    """Load an index for searching; checks that vector ids and metadata rows agree.

    Args:
        encoder: the ``encoders.Encoder`` queries will come from: refused (``ModelMismatch``)
            when its fingerprint is not the one the index was built with.
        checkpoint: the encoder's weights identity when it does not record its sha256 (a
            file, ``sha256:<hex>`` or ``random:<seed>``); see ``encoder_fingerprint``.
        gpu: search on the GPU (faiss-gpu); default: when one is available.
    """
    root = Path(path)
    manifest = read_manifest(root)
    if encoder is not None:
        check_fingerprint(manifest["model"], encoder_fingerprint(encoder, checkpoint), str(root))
    conn = connect(root / META, readonly=True)
    try:
        indexes = _load_indexes(root, manifest, conn, gpu_available() if gpu is None else gpu)
    except Exception:
        conn.close()
        raise
    return IndexSearcher(root, manifest, conn, indexes)


def _load_indexes(
    root: Path, manifest: dict[str, Any], conn: sqlite3.Connection, gpu: bool
) -> dict[Modality, _ModalityIndex]:
    generation = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    if generation is None or int(json.loads(generation[0])) != int(manifest.get("generation", -1)):
        raise IndexIncomplete(
            f"the index at {root} changed after its manifest was written (an update was "
            "interrupted): rerun the command that was interrupted (build, add, remove or sync)"
        )
    dim = int(manifest["dim"])
    out: dict[Modality, _ModalityIndex] = {}
    for name, entry in manifest["modalities"].items():
        m = Modality.parse(name)
        file = root / entry["file"]
        if not file.is_file():
            raise IndexCorrupt(f"{file} is missing")
        index = faiss.read_index(str(file))
        if index.d != dim:
            raise IndexCorrupt(f"{file} holds {index.d}-d vectors; the manifest says {dim}")
        present = index_ids(index)
        live, dead = _ids(conn, name, 0), _ids(conn, name, 1)
        # vector id == metadata row id: every live row is in FAISS, and FAISS holds nothing
        # else than live rows and tombstones (HNSW keeps removed vectors until compaction).
        missing = np.setdiff1d(live, present)
        extra = np.setdiff1d(present, np.union1d(live, dead))
        if len(missing) or len(extra):
            raise IndexCorrupt(
                f"{file} and {META} disagree: {len(missing)} item rows without a vector, "
                f"{len(extra)} vectors without a row; run `bindsearch index verify`"
            )
        spec = IndexSpec.from_dict(entry["spec"])
        apply_search_params(index, spec)
        scan = None
        if gpu:
            index = to_gpu(index)
        elif FlatScan.supports(index):
            scan = FlatScan(index, present)
        out[m] = _ModalityIndex(index, spec, np.intersect1d(present, dead), scan)
    return out


def _ids(conn: sqlite3.Connection, modality: str, deleted: int) -> np.ndarray:
    rows = conn.execute(
        "SELECT id FROM items WHERE modality = ? AND deleted = ? ORDER BY id", (modality, deleted)
    ).fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
