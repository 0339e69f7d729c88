"""Searching an index: ``open_index(path) -> IndexSearcher``, the ``Searcher`` the service uses.

Every item modality has its own FAISS index over one shared embedding space, so a query
vector of any modality searches any of them; the per-modality lists are merged by calibrated
relevance (``index.calibration``, docs/ranking.md) and come out as ``index.results.Hit``
(the service's result type). Tag filters are applied inside: the
ids carrying the tags come from SQLite and restrict the search itself (see ``search``).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from encoders import Modality

from .calibration import MERGES, Calibration, Merge, merge_ranked, query_weights
from .errors import DimensionMismatch, IndexCorrupt, IndexIncomplete
from .fingerprint import check_fingerprint, encoder_fingerprint
from .flat import FlatVectors
from .ondisk import OnDiskIndex, check_overrides, list_ids, read_ondisk
from .results import Hit, IndexInfo, Item
from .spec import (
    IndexSpec,
    apply_search_params,
    gpu_available,
    index_ids,
    search_parameters,
    to_gpu,
)
from .store import (
    META,
    IndexManifest,
    IndexStore,
    ModalityManifest,
    read_faiss,
    read_manifest,
)
from .torch_scan import TorchScan, default_scan_device


class MetadataStore(Protocol):
    """Item metadata by id (clip-retrieval's provider interface)."""

    def get(
        self, ids: Sequence[int], cols: Sequence[str] | None = None
    ) -> list[dict[str, Any]]: ...


# Exact search of a CPU ``Flat`` index: FAISS scores a single query one stored vector at a time
# on one thread, about half the machine's memory bandwidth. One BLAS matrix-vector product over
# the index's own vectors (no copy) and a partial sort reach 0.9 of it (``python -m bench --only
# index``, ratio 7): what the service runs per request. Measured on 30k and 100k x 1024 (2 cores):
# for 16 to 64 queries one matrix product is also 1.8-3.8x faster than FAISS (which still scans
# query by query there); for 2 to 8 FAISS's queries in parallel threads and from 128 its own BLAS
# path are faster, so those stay with FAISS.
SCAN_BLOCK_BYTES = 1 << 26  # scores held at once: (rows in a block) x (queries) x 4 bytes


# A filtered search over at most this many matching items scores them exactly, from their
# stored vectors, whatever the index type: exact and cheaper than an approximate index's
# filtered search, whose recall drops when few items match (HNSW's graph most of all).
FILTER_EXACT_MAX = 16384


class FlatScan(FlatVectors):
    """Exact inner-product top-k over the vectors of a CPU ``IDMap2(Flat)`` index, in place."""

    @staticmethod
    def wants(queries: int) -> bool:
        """Whether this scan beats FAISS's own search for a batch of ``queries``."""
        return queries == 1 or 16 <= queries <= 64

    def search(
        self, q: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(nq, k) scores and ids, best first, as ``Index.search`` (``k`` <= rows scanned).

        ``rows``: scan only these row positions (a filtered search), else every row.
        """
        # float32 as FAISS takes it: a float64 query would upcast (copy) every stored vector.
        q = np.ascontiguousarray(q, dtype=np.float32).reshape(-1, self.vectors.shape[1])
        step = max(k, SCAN_BLOCK_BYTES // (4 * len(q)))
        blocks: Iterator[tuple[np.ndarray, np.ndarray]]
        if rows is None:  # slices: views of the index's memory, no copy
            n = len(self.vectors)
            blocks = (
                (self.vectors[s : s + step], self.ids[s : s + step]) for s in range(0, n, step)
            )
        else:
            blocks = (
                (self.vectors[r], self.ids[r])
                for r in (rows[s : s + step] for s in range(0, len(rows), step))
            )
        return top_k(q, blocks, k)


def top_k(
    q: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of (nq, d) queries over (vectors, ids) blocks.

    Returns (nq, k') scores and ids, best first, k' = min(k, vectors seen).
    """
    nq = len(q)
    best_s, best_i = [], []
    for block, ids in blocks:
        if not len(block):
            continue
        s = (block @ q[0])[None] if nq == 1 else np.ascontiguousarray((block @ q.T).T)
        kk = min(k, s.shape[1])
        top = np.argpartition(s, s.shape[1] - kk, axis=1)[:, s.shape[1] - kk :]
        best_s.append(np.take_along_axis(s, top, axis=1))
        best_i.append(ids[top])
    if not best_s:
        return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)
    scores, ids_ = np.concatenate(best_s, axis=1), np.concatenate(best_i, axis=1)
    if scores.shape[1] > k:
        top = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k :]
        scores = np.take_along_axis(scores, top, axis=1)
        ids_ = np.take_along_axis(ids_, top, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids_, order, axis=1)


@dataclass(frozen=True)
class ModalitySearch:
    """One target modality's part of a search: the top ``k`` of its items (among ``allowed``)."""

    modality: Modality
    k: int
    allowed: np.ndarray | None = None  # ascending ids a tag filter leaves (all held); None: all


# (nq, D) unit queries and a search plan -> per planned modality, (nq, k') scores and ids, best
# first (k' <= k; an id of -1 is no result). ``IndexSearcher.run_search`` runs the plan here;
# the sharded service runs it on its shards and joins their lists (``index.shard``).
RunSearch = Callable[[np.ndarray, Sequence[ModalitySearch]], list[tuple[np.ndarray, np.ndarray]]]


@dataclass
class _ModalityIndex:
    index: faiss.Index
    spec: IndexSpec
    ids: np.ndarray  # the ids the FAISS index holds, ascending
    tombstones: np.ndarray  # ids still in the FAISS index whose rows are marked deleted
    scan: FlatScan | None = None  # CPU Flat indexes: FlatScan for the batch sizes it wins
    gpu: bool = False
    device_scan: TorchScan | None = None  # Flat indexes scanned with torch (GPU, no faiss-gpu)
    ondisk: OnDiskIndex | None = None  # IVF-PQ with lists on disk, re-ranked exactly

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ondisk is not None:
            return self.ondisk.search(q, k)
        if self.device_scan is not None:
            return self.device_scan.search(q, k)
        if self.scan is not None and FlatScan.wants(len(q)):
            return self.scan.search(q, k)
        dist, ids = self.index.search(q, k)
        return dist, ids

    def search_among(
        self,
        q: np.ndarray,
        k: int,
        allowed: np.ndarray,
        gather: Callable[[np.ndarray], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` among the ``allowed`` ids only (ascending, all held by this index).

        CPU Flat: the masked exact scan. Few matches, or a GPU index (faiss-gpu takes no
        ``IDSelector``): exact over their stored vectors (``gather``). Otherwise FAISS
        itself, restricted by an ``IDSelectorBatch``. Never asks for more than ``k``.
        """
        k = min(k, len(allowed))
        if self.device_scan is not None:
            return self.device_scan.search(q, k, self.device_scan.rows_of(allowed))
        if self.scan is not None:
            return self.scan.search(q, k, self.scan.rows_of(allowed))
        if self.gpu or len(allowed) <= FILTER_EXACT_MAX:
            step = max(k, FILTER_EXACT_MAX)
            parts = (allowed[s : s + step] for s in range(0, len(allowed), step))
            return top_k(q, ((gather(p), p) for p in parts), k)
        sel = faiss.IDSelectorBatch(allowed)  # referenced until the search returns
        if self.ondisk is not None:
            return self.ondisk.search(q, k, sel)
        params = search_parameters(self.index, self.spec, sel)
        dist, ids = self.index.search(q, k, params=params)
        return dist, ids


class IndexSearcher:
    """A loaded index: ``search`` by vectors (and tags), items and their stored vectors.

    It is the service's ``Searcher``: results are ``Hit``/``Item``, ``info()`` lists
    ``IndexInfo``. Thread-safe: store reads are serialised on one lock.
    """

    def __init__(
        self,
        root: Path,
        manifest: IndexManifest,
        store: IndexStore,
        indexes: dict[Modality, _ModalityIndex],
    ) -> None:
        self.root = root
        self.manifest = manifest
        self._store = store
        self._lock = threading.Lock()
        self._indexes = indexes
        # Towers of the querying model that differ from the index's (``check_fingerprint``):
        # the calibration of queries they embed was measured with the old tower.
        self.stale_towers: frozenset[str] = frozenset()
        self.holds_vectors = True  # False: opened with vectors=False (a sharded router)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def calibration(self) -> Calibration | None:
        """The index's calibration per modality pair; None for an index built before it.

        Pairs whose query modality is embedded by a ``stale_towers`` tower are left out: such
        queries are ranked as an unmeasured pair is, by raw cosine (``calibration_note``).
        """
        cal = self.manifest.calibration
        if cal is None or not self.stale_towers:
            return cal
        pairs = {
            (q, t): p
            for (q, t), p in cal.pairs.items()
            if Modality.parse(q).tower.value not in self.stale_towers
        }
        return dataclasses.replace(cal, pairs=pairs)

    @property
    def stale_pairs(self) -> list[tuple[Modality, Modality]]:
        """The calibrated (query, target) pairs left out for ``stale_towers``, sorted."""
        cal = self.manifest.calibration
        if cal is None:
            return []
        pairs = [(Modality.parse(q), Modality.parse(t)) for q, t in sorted(cal.pairs)]
        return [(q, t) for q, t in pairs if q.tower.value in self.stale_towers]

    @property
    def calibration_note(self) -> str | None:
        """Why results are not calibrated, when they are not (an index built before it, or a
        query tower changed since the calibration was measured)."""
        return self.calibration_note_for()

    def calibration_note_for(
        self,
        query_modalities: Iterable[Modality | str] | None = None,
        targets: Iterable[Modality | str] | None = None,
    ) -> str | None:
        """``calibration_note`` about one search: only the stale pairs from one of its
        ``query_modalities`` to one of its ``targets`` (None: any). An index without a
        calibration has the note whatever the search."""
        if self.manifest.calibration is None:
            return (
                f"the index at {self.root} has no calibration (built by an older bindsearch): "
                "results are merged by raw cosine; `bindsearch index sync` or a rebuild adds it"
            )
        queries = (
            None if query_modalities is None else {Modality.parse(m) for m in query_modalities}
        )
        wanted = None if targets is None else {Modality.parse(m) for m in targets}
        stale = [
            (q, t)
            for q, t in self.stale_pairs
            if (queries is None or q in queries) and (wanted is None or t in wanted)
        ]
        if not stale:
            return None
        towers = ", ".join(sorted({q.tower.value for q, _ in stale}))
        names = ", ".join(f"{q.value}->{t.value}" for q, t in stale)
        return (
            f"the index at {self.root} was calibrated with another {towers} tower: the "
            f"{names} pairs are stale and ranked by raw cosine; "
            "`bindsearch index sync` with this model measures them again"
        )

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """The item modalities this index holds."""
        return tuple(self._indexes)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.manifest.model)

    def counts(self) -> dict[Modality, int]:
        return {m: self.manifest.modalities[m.value].count for m in self._indexes}

    def info(self) -> list[IndexInfo]:
        """One ``IndexInfo`` per item modality: its count and recipe (``/v1/info``)."""
        return [
            IndexInfo(self.root.name, m, n, self.manifest.modalities[m.value].spec.to_dict())
            for m, n in sorted(self.counts().items())
        ]

    def search(
        self,
        vectors: np.ndarray,
        k: int = 10,
        targets: Sequence[Modality | str] | None = None,
        tags: Sequence[str] | None = None,
        merge: Merge | str = "calibrated",
        query_modalities: Mapping[Modality | str, float]
        | Sequence[Modality | str]
        | Modality
        | str
        | None = None,
        run: RunSearch | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` items per query row over the ``targets`` modalities (default: all).

        Args:
            vectors: (N, D) float32 query embeddings (rows are L2-normalised here).
            targets: item modalities to search; ones the index does not hold add nothing.
            tags: only items carrying every one of these tags; the ids come from SQLite and
                restrict the search inside each modality's index (no over-fetching).
            merge: how the per-modality lists become one: ``calibrated`` (by relevance),
                ``raw`` (by cosine), ``rrf`` (reciprocal rank fusion) or ``per_modality``
                (the top ``k`` of each target modality, one modality after another).
            query_modalities: the modality the query vectors come from, or a mixed query's
                term modalities with their weights ({"text": 0.7, "vision": 0.3}); the
                calibration of those (query, target) pairs is applied. None: all measured
                query modalities, equally weighted.
            run: who runs the per-modality vector searches (``RunSearch``); default: this
                process (``run_search``). The sharded service passes its shards' fan-out, so
                the plan, the metadata and the merge stay this one code path.
        Returns: per query, up to ``k`` hits (``per_modality``: ``k`` per target modality),
            each with its cosine ``score`` and calibrated ``relevance``.
        """
        q = self._check_queries(vectors)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if merge not in MERGES:
            raise ValueError(f"merge is {merge!r}; accepted: {', '.join(MERGES)}")
        calibration = self.calibration
        weights = query_weights(
            query_modalities,
            known=sorted({qm for qm, _ in calibration.pairs}) if calibration else (),
        )
        chosen = self.modalities if targets is None else [Modality.parse(t) for t in targets]
        plan: list[ModalitySearch] = []
        for m in dict.fromkeys(chosen):
            mi = self._indexes.get(m)
            if mi is None or not len(mi.ids):
                continue
            allowed = None
            if tags:
                with self._lock:
                    allowed = self._store.tagged_ids(m.value, tags)
                # Only what this snapshot's FAISS file holds (rows committed since are not).
                allowed = allowed[np.isin(allowed, mi.ids, assume_unique=True)]
                if not len(allowed):
                    continue
            plan.append(ModalitySearch(m, k, allowed))
        found_lists = (run or self.run_search)(q, plan) if plan else []
        scored = [(d, i, ms.modality) for ms, (d, i) in zip(plan, found_lists, strict=True)]
        if not scored:
            return [[] for _ in range(len(q))]
        cols = ["id", "path", "start_s", "end_s", "caption", "tags"]
        with self._lock:
            found = np.unique(np.concatenate([ids.ravel() for _, ids, _ in scored]))
            meta = self._store.item_metadata(found[found >= 0].tolist(), cols)
        by_id = {int(d["id"]): d for d in meta if d}
        out: list[list[Hit]] = []
        for r in range(len(q)):
            lists = []
            for dist, ids, m in scored:
                # removed between the FAISS file and now (or a tombstone): not a result
                keep = np.array([int(i) in by_id for i in ids[r]], bool)
                lists.append((m.value, dist[r][keep], ids[r][keep]))
            ranked = merge_ranked(lists, k, merge, calibration, weights)
            out.append(
                [
                    Hit(_item(h.id, Modality.parse(h.modality), by_id[h.id]), h.score, h.relevance)
                    for h in ranked
                ]
            )
        return out

    def run_search(
        self, q: np.ndarray, plan: Sequence[ModalitySearch]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``RunSearch`` of this process: each planned modality on its loaded index."""
        if not self.holds_vectors:
            raise RuntimeError(
                "this searcher was opened without its vectors (open_index(vectors=False)): "
                "search it with run= (the shards' search)"
            )
        out = []
        for ms in plan:
            mi = self._indexes[ms.modality]
            if ms.allowed is not None:
                out.append(mi.search_among(q, ms.k, ms.allowed, self._gather))
                continue
            # Tombstoned ids (HNSW cannot remove) are fetched and dropped: over-fetch by them.
            kk = min(ms.k + len(mi.tombstones), int(mi.index.ntotal))
            dist, ids = mi.search(q, kk)
            if len(mi.tombstones):
                dead = np.isin(ids, mi.tombstones)
                ids = np.where(dead, -1, ids)
                dist = np.where(dead, -np.inf, dist)
            out.append((dist, ids))
        return out

    def item_ids(self, modality: Modality | str) -> np.ndarray:
        """The ids of this snapshot's live items of ``modality``, ascending (none: empty)."""
        mi = self._indexes.get(Modality.parse(modality))
        if mi is None:
            return np.empty(0, np.int64)
        return np.setdiff1d(mi.ids, mi.tombstones)

    def get(self, ids: Sequence[int], cols: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Metadata rows by id (``MetadataStore.get``); ``{}`` for an id not in the index."""
        with self._lock:
            return self._store.item_metadata(ids, cols)

    def get_item(self, item_id: int) -> Item | None:
        """The item with this id, or None when it is not (or no longer) in the index."""
        cols = ["id", "modality", "path", "start_s", "end_s", "caption", "tags"]
        row = self.get([int(item_id)], cols)[0]
        return _item(int(item_id), Modality.parse(row["modality"]), row) if row else None

    def vector(self, item_id: int) -> np.ndarray:
        """The stored (D,) unit vector of an item, exactly as embedded (search by item id)."""
        with self._lock:
            v = self._store.item_vector(int(item_id))
        if v is None:
            raise KeyError(f"no item with id {item_id} in the index")
        return v

    def item_vector(self, item_id: int) -> np.ndarray | None:
        """``vector``, or None for an id that is not in the index (``Searcher``)."""
        try:
            return self.vector(item_id)
        except KeyError:
            return None

    def item_media_path(self, item_id: int) -> Path | None:
        """The file an item came from as stored at indexing time; relative to the index."""
        item = self.get_item(item_id)
        if item is None or item.path is None:
            return None
        p = Path(item.path)
        return p if p.is_absolute() else self.root / p

    def set_search_params(self, nprobe: int | None = None, rerank: int | None = None) -> None:
        """Override an on-disk index's tuned ``nprobe``/``rerank`` for the searches that follow
        (``index query --nprobe/--rerank``); None keeps the recorded value."""
        values = check_overrides({"nprobe": nprobe, "rerank": rerank})
        for mi in self._indexes.values():
            if mi.ondisk is not None:
                mi.ondisk.overrides = dict(values)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> IndexSearcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gather(self, ids: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._store.gather(ids)

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


def _item(item_id: int, modality: Modality, row: dict[str, Any]) -> Item:
    return Item(
        id=item_id,
        modality=modality,
        path=row["path"],
        start=row["start_s"],
        end=row["end_s"],
        caption=row["caption"],
        tags=tuple(str(t) for t in row["tags"]),
    )


def open_index(
    path: str | Path,
    encoder: Any = None,
    *,
    checkpoint: str | Path | None = None,
    gpu: bool | None = None,
    snapshot: bool = False,
    device: str | None = None,
    vectors: bool = True,
) -> IndexSearcher:
    """Load an index for searching; checks its files and that vector ids and metadata agree.

    Every chunk and FAISS file is checked against the sha256 the index recorded (chunk hashes
    are cached by size and mtime, so reopening is fast): a damaged index is refused with one
    line (``IndexCorrupt``) naming the file.

    Args:
        encoder: the ``encoders.Encoder`` queries will come from: refused (``ModelMismatch``)
            when its fingerprint is not the one the index was built with.
        checkpoint: the encoder's weights identity when it does not record its sha256 (a
            file, ``sha256:<hex>`` or ``random:<seed>``); see ``encoder_fingerprint``.
        gpu: search on the GPU (faiss-gpu); default: when one is available.
        device: a torch device ("cuda", "cuda:1", "cpu") on which Flat indexes are searched
            exactly with torch (``index.torch_scan``); default: "cuda" when torch sees a GPU
            and faiss-gpu is absent (unless ``gpu=False``), else none.
        snapshot: search a private copy of the database (``IndexStore.open_snapshot``), so
            that later changes to the index on disk never reach this searcher (the service).
        vectors: False loads no FAISS file, only each modality's live ids: metadata, items
            and search plans, with the vector search run elsewhere (``search(run=...)``, the
            sharded service's router, whose shards hold the vectors).
    """
    root = Path(path)
    manifest = read_manifest(root)
    stale: frozenset[str] = frozenset()
    if encoder is not None:
        # Only the towers that made the index's vectors must match (per-tower fingerprints).
        stale = check_fingerprint(
            manifest.model,
            encoder_fingerprint(encoder, checkpoint),
            str(root),
            holds=manifest.modalities,
        )
    unreadable = IndexCorrupt(
        f"the index at {root} is damaged: {META} cannot be read; "
        f"run `bindsearch index verify {root}`, then rebuild it"
    )
    try:
        store = IndexStore.open_snapshot(root) if snapshot else IndexStore.open_readonly(root)
    except sqlite3.Error:
        raise unreadable from None
    try:
        scan_device = device if device is not None else default_scan_device(gpu)
        use_gpu = gpu_available() if gpu is None else gpu
        if vectors:
            indexes = _load_indexes(root, manifest, store, use_gpu, scan_device)
        else:
            indexes = _load_ids(root, manifest, store)
    except sqlite3.Error:
        store.close()
        raise unreadable from None
    except BaseException:
        store.close()
        raise
    searcher = IndexSearcher(root, manifest, store, indexes)
    searcher.stale_towers = stale
    searcher.holds_vectors = vectors
    for mi in indexes.values():
        if mi.ondisk is not None:
            mi.ondisk.gather = searcher._gather  # re-ranking reads the store under its lock
    return searcher


def _load_indexes(
    root: Path, manifest: IndexManifest, store: IndexStore, gpu: bool, device: str | None = None
) -> dict[Modality, _ModalityIndex]:
    if store.generation != manifest.generation:
        raise IndexIncomplete(
            f"the index at {root} changed after its manifest was written (an update was "
            "interrupted): rerun the command that was interrupted (build, add, remove or sync)"
        )
    store.check_files(manifest)
    dim = manifest.dim
    out: dict[Modality, _ModalityIndex] = {}
    for name, entry in manifest.modalities.items():
        m = Modality.parse(name)
        file = root / entry.file
        if entry.spec.on_disk:
            out[m] = _load_ondisk(file, entry, store, root)
            continue
        index = read_faiss(file, entry.sha256, root)
        if index.d != dim:
            raise IndexCorrupt(f"{file} holds {index.d}-d vectors; the manifest says {dim}")
        present = index_ids(index)
        live, dead = store.live_ids(name), store.tombstone_ids(name)
        # vector id == metadata row id: every live row is in FAISS, and FAISS holds nothing
        # else than live rows and tombstones (HNSW keeps removed vectors until compaction).
        missing = np.setdiff1d(live, present)
        extra = np.setdiff1d(present, np.union1d(live, dead))
        if len(missing) or len(extra):
            raise IndexCorrupt(
                f"{file} and {META} disagree: {len(missing)} item rows without a vector, "
                f"{len(extra)} vectors without a row; run `bindsearch index verify`"
            )
        apply_search_params(index, entry.spec)
        scan, on_gpu = None, False
        if gpu:
            cpu, index = index, to_gpu(index)
            on_gpu = index is not cpu  # types without a GPU version stay on the CPU
        elif FlatScan.supports(index):
            scan = FlatScan(index, present)
        tombstones = np.intersect1d(present, dead)
        out[m] = _ModalityIndex(index, entry.spec, np.sort(present), tombstones, scan, on_gpu)
        if device is not None and not on_gpu and TorchScan.supports(index):
            out[m].device_scan = TorchScan(index, device, present)
    return out


def _load_ids(
    root: Path, manifest: IndexManifest, store: IndexStore
) -> dict[Modality, _ModalityIndex]:
    """Each modality's live ids, no vectors: an empty placeholder index stands for its FAISS
    file (``open_index(vectors=False)``)."""
    if store.generation != manifest.generation:
        raise IndexIncomplete(
            f"the index at {root} changed after its manifest was written (an update was "
            "interrupted): rerun the command that was interrupted (build, add, remove or sync)"
        )
    store.check_files(manifest)  # stored vectors are read from the chunks (search by item id)
    out: dict[Modality, _ModalityIndex] = {}
    for name, entry in manifest.modalities.items():
        placeholder = faiss.IndexIDMap2(faiss.IndexFlatIP(manifest.dim))
        live = store.live_ids(name)
        out[Modality.parse(name)] = _ModalityIndex(
            placeholder, entry.spec, np.sort(live), np.zeros(0, np.int64)
        )
    return out


def _load_ondisk(
    file: Path, entry: ModalityManifest, store: IndexStore, root: Path
) -> _ModalityIndex:
    """An on-disk modality: lists memory-mapped, checked like the others (ids == live rows)."""
    index = read_ondisk(file, entry.sha256, entry.data_sha256, root)
    if index.d != store.dim:
        raise IndexCorrupt(f"{file} holds {index.d}-d vectors; the index holds {store.dim}")
    present = list_ids(index)
    live = store.live_ids(file.stem)
    if not np.array_equal(present, live):
        raise IndexCorrupt(
            f"{file} and {META} disagree: {len(np.setdiff1d(live, present))} item rows without "
            f"a vector, {len(np.setdiff1d(present, live))} vectors without a row; "
            "run `bindsearch index verify`"
        )
    ondisk = OnDiskIndex(index, entry.spec, store.gather)
    return _ModalityIndex(index, entry.spec, present, np.zeros(0, np.int64), ondisk=ondisk)
