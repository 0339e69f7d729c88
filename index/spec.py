"""The index recipe as data: a FAISS factory string, its search parameters, and how it was chosen.

``choose_spec`` is ``--factory auto``: exact ``Flat`` below ``FLAT_MAX_VECTORS``; above, an
inverted file (``IVF<nlist>,Flat``) when the vectors fit the memory budget, else
``IVF<nlist>,PQ<m>`` with its inverted lists on disk and exact re-ranking (``index.ondisk``).
``train_and_fill`` trains on a sample, adds every vector in blocks and, for approximate
indexes, tunes the search parameter (``nprobe`` / ``efSearch``) on held-out queries until
recall@10 against exact search reaches the target, and reports it.

Every index held in memory is wrapped in ``IDMap2`` so FAISS ids are the metadata row ids (an
on-disk index keeps the ids in its lists).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import faiss
import numpy as np

from .errors import IndexStoreError

FLAT_MAX_VECTORS = 100_000  # exact search is fast enough below this (one matmul per query batch)
TARGET_RECALL = 0.95
RECALL_K = 10
MAX_QUERIES = 1000  # held-out queries for measuring recall
TRAIN_POINTS_PER_LIST = 40  # FAISS asks for at least 39 training points per centroid
PQ_TRAIN_POINTS = 256 * 40  # 8-bit PQ: 256 centroids per sub-quantizer
DEFAULT_MEMORY_BUDGET = 4 * 10**9
ONDISK_MIN_VECTORS = 4096  # PQ training wants 256 points per codebook; below, no disk index
_ID_BYTES = 8  # IDMap2 keeps an int64 per vector (plus a reverse map of similar size)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class IndexSpec:
    """One modality's index recipe, saved in ``manifest.json``.

    ``factory`` is a FAISS index-factory string without the ``IDMap2`` wrapper; the metric is
    always inner product on L2-normalised vectors, i.e. cosine.
    """

    factory: str
    metric: str = "ip"
    search_params: Mapping[str, int] = field(default_factory=dict)
    train_size: int = 0
    storage: str = "memory"  # "disk": inverted lists memory-mapped, re-ranked (index.ondisk)

    @classmethod
    def parse(cls, factory: str) -> IndexSpec:
        """A user's factory string (an ``IDMap``/``IDMap2`` prefix is accepted and dropped)."""
        text = factory.strip()
        text = re.sub(r"^IDMap2?,", "", text)
        if not text:
            raise ValueError("empty FAISS factory string")
        return cls(text)

    @property
    def faiss_factory(self) -> str:
        return f"IDMap2,{self.factory}"

    @property
    def on_disk(self) -> bool:
        return self.storage == "disk"

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"

    @property
    def removable(self) -> bool:
        """Whether FAISS can remove ids from it (HNSW and NSG graphs cannot: tombstones)."""
        upper = self.factory.upper()
        return "HNSW" not in upper and "NSG" not in upper

    def parameter_string(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.search_params.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "factory": self.factory,
            "faiss_factory": self.factory if self.on_disk else self.faiss_factory,
            "metric": self.metric,
            "search_params": dict(self.search_params),
            "train_size": self.train_size,
            "storage": self.storage,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IndexSpec:
        return cls(
            factory=str(d["factory"]),
            metric=str(d.get("metric", "ip")),
            search_params={str(k): int(v) for k, v in dict(d.get("search_params", {})).items()},
            train_size=int(d.get("train_size", 0)),
            storage=str(d.get("storage", "memory")),
        )


@dataclass(frozen=True)
class RecallReport:
    """Recall@k of an approximate index against exact search, on held-out queries."""

    recall: float
    k: int
    queries: int
    vectors: int
    target: float
    search_params: Mapping[str, int]
    # (parameter value, recall) in the order tried; on-disk IVF-PQ: ((nprobe, rerank), recall)
    tried: Sequence[tuple[int | tuple[int, int], float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            f"recall_at_{self.k}": round(self.recall, 4),
            "k": self.k,
            "queries": self.queries,
            "vectors": self.vectors,
            "target": self.target,
            "search_params": dict(self.search_params),
            "tried": [[list(v) if isinstance(v, tuple) else v, round(r, 4)] for v, r in self.tried],
            "oracle": "exact inner-product search (IndexFlatIP); queries held out of training, "
            "each query's own vector excluded",
        }


class VectorSource(Protocol):
    """Vectors with their ids, readable in blocks or by id (the store, or an array in tests)."""

    @property
    def ids(self) -> np.ndarray: ...  # (n,) int64, ascending

    def gather(self, ids: np.ndarray) -> np.ndarray: ...  # (len(ids), d) float32

    def blocks(self, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class ArraySource:
    """A ``VectorSource`` over arrays in memory (benchmarks and tests)."""

    vectors: np.ndarray  # (n, d) float32
    ids_: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        if self.ids_ is None:
            return np.arange(len(self.vectors), dtype=np.int64)
        return self.ids_

    def gather(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.ids, ids)
        return np.ascontiguousarray(self.vectors[pos], dtype=np.float32)

    def blocks(self, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = self.ids
        for start in range(0, len(ids), size):
            yield (
                ids[start : start + size],
                np.ascontiguousarray(self.vectors[start : start + size], dtype=np.float32),
            )


def parse_size(text: str | int) -> int:
    """``4GB`` (10^9), ``4GiB`` (2^30), ``512MB``, ``1e9`` or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; e.g. 4GB, 512MB, 2GiB")
    number, unit, binary = m.groups()
    power = " kmgt".index(unit.lower() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


def choose_spec(n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> IndexSpec:
    """``--factory auto``: the recipe for ``n`` vectors of ``dim`` floats within a memory budget.

    Exact ``Flat`` below ``FLAT_MAX_VECTORS``, ``IVF-Flat`` above, both while the vectors fit
    the budget; otherwise IVF-PQ with its inverted lists on disk (``storage="disk"``,
    ``index.ondisk``), which holds only the centroids, the codebooks and the ids in memory.
    """
    flat_bytes = n * (4 * dim + _ID_BYTES)
    # sqrt(n) lists, a power of two: ~450 vectors per list at 200k, short to train on 2 cores.
    nlist = int(2 ** round(math.log2(math.sqrt(max(n, 1)))))
    nlist = max(64, min(nlist, 65536))
    train = min(n, TRAIN_POINTS_PER_LIST * nlist)
    centroid_bytes = nlist * dim * 4
    if n < FLAT_MAX_VECTORS and flat_bytes <= memory_budget:
        return IndexSpec("Flat")
    if n >= FLAT_MAX_VECTORS and flat_bytes + centroid_bytes <= memory_budget:
        return IndexSpec(f"IVF{nlist},Flat", train_size=train)
    # Memory is short: PQ codes in lists on disk. What stays resident: the coarse centroids,
    # the codebooks (256 centroids per sub-quantizer) and the ids the searcher keeps.
    resident = centroid_bytes + 256 * dim * 4 + n * 2 * _ID_BYTES
    # At least 4 dimensions per 8-bit code (and as many codes as would fit memory).
    per_vector = (memory_budget - centroid_bytes) / n - _ID_BYTES
    fitting = [m for m in range(1, dim // 4 + 1) if dim % m == 0 and m <= per_vector]
    if n < ONDISK_MIN_VECTORS or resident > memory_budget or not fitting:
        need = max(resident, n * (1 + _ID_BYTES) + centroid_bytes)
        raise IndexStoreError(
            f"the memory budget of {memory_budget / 1e9:.3f} GB is too small for {n} vectors "
            f"of {dim} floats: exact search needs {flat_bytes / 1e9:.3f} GB"
            + (
                f", an index on disk about {need / 1e9:.3f} GB"
                if n >= ONDISK_MIN_VECTORS
                else f" (an index on disk needs at least {ONDISK_MIN_VECTORS} vectors)"
            )
        )
    m = max(fitting)
    # "np": no polysemous training (it only serves Hamming-filtered search, and is slow).
    return IndexSpec(
        f"IVF{nlist},PQ{m}np",
        train_size=min(n, max(train, PQ_TRAIN_POINTS)),
        storage="disk",
    )


def new_index(spec: IndexSpec, dim: int) -> faiss.Index:
    """An empty FAISS index for ``spec`` (``IDMap2`` around it); ValueError for a bad string."""
    try:
        return faiss.index_factory(dim, spec.faiss_factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(
            f"FAISS cannot build {spec.factory!r} for {dim}-d vectors: {_faiss_message(e)}"
        ) from None


def train_and_fill(
    spec: IndexSpec,
    dim: int,
    source: VectorSource,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
    block_size: int = 65536,
) -> tuple[faiss.Index, IndexSpec, RecallReport | None]:
    """Build ``spec`` over every vector of ``source``: train on a sample, add in blocks, tune.

    Returns the index, the spec with its tuned search parameters and training size, and the
    recall report (None for exact indexes or when there are too few vectors to hold out).
    """
    index = new_index(spec, dim)
    ids = source.ids
    n = len(ids)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    nq = 0 if spec.exact else min(MAX_QUERIES, n // 20)
    query_ids = np.sort(ids[perm[:nq]])
    train_size = 0
    if not index.is_trained:
        pool = perm[nq:] if n - nq >= (spec.train_size or 1) else perm
        train_size = min(len(pool), spec.train_size or len(pool))
        train_ids = np.sort(ids[pool[:train_size]])
        train_index(index, source.gather(train_ids), spec)
    for block_ids, vecs in source.blocks(block_size):
        index.add_with_ids(vecs, block_ids)
    spec = IndexSpec(spec.factory, spec.metric, dict(spec.search_params), train_size)
    if nq == 0:
        return index, spec, None
    report = tune(index, spec, source, source.gather(query_ids), query_ids, target_recall)
    return index, IndexSpec(spec.factory, spec.metric, report.search_params, train_size), report


def tune(
    index: faiss.Index,
    spec: IndexSpec,
    source: VectorSource,
    queries: np.ndarray,
    query_ids: np.ndarray | None,
    target_recall: float = TARGET_RECALL,
    k: int = RECALL_K,
) -> RecallReport:
    """Smallest ``nprobe``/``efSearch`` whose recall@k reaches the target (else the best tried).

    ``query_ids``: the queries' own ids, excluded from both result lists (queries drawn from the
    indexed vectors); None for queries that are not in the index.
    """
    extra = 0 if query_ids is None else 1
    _, exact = exact_knn(queries, source, k + extra)
    truth = drop_self(exact, query_ids, k)
    name, values = _search_parameter(index)
    tried: list[tuple[int, float]] = []
    best: tuple[float, int] = (-1.0, 0)
    for value in values or [0]:
        if name:
            faiss.ParameterSpace().set_index_parameter(index, name, value)
        _, got = index.search(queries, k + extra)
        r = recall_at_k(drop_self(got, query_ids, k), truth, k)
        tried.append((value, r))
        if r > best[0] + 1e-9:
            best = (r, value)
        if r >= target_recall:
            best = (r, value)
            break
    params = {name: best[1]} if name else {}
    if name:
        faiss.ParameterSpace().set_index_parameter(index, name, best[1])
    return RecallReport(best[0], k, len(queries), int(index.ntotal), target_recall, params, tried)


def exact_knn(queries: np.ndarray, source: VectorSource, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours (ids from ``source``), streamed over its blocks."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vecs in source.blocks():
        kk = min(k, len(vecs))
        dist, pos = faiss.knn(queries, vecs, kk, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(dist, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(got: np.ndarray, truth: np.ndarray, k: int = RECALL_K) -> float:
    """Mean over queries of |top-k found ∩ exact top-k| / k."""
    if len(truth) == 0:
        return 1.0
    hits = 0
    for g, t in zip(got[:, :k], truth[:, :k], strict=True):
        hits += len(set(g[g >= 0].tolist()) & set(t[t >= 0].tolist()))
    return hits / (k * len(truth))


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """Set the recorded ``nprobe``/``efSearch`` on a loaded index."""
    for name, value in spec.search_params.items():
        if name != "rerank":  # not FAISS's: the on-disk re-ranking's (index.ondisk)
            faiss.ParameterSpace().set_index_parameter(index, name, value)


def gpu_available() -> bool:
    """faiss-gpu installed and a GPU visible (faiss-cpu has no ``StandardGpuResources``)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` for searching when faiss-gpu is present; else ``index`` itself.

    Index types without a GPU version (HNSW, ...) stay on the CPU.
    """
    if not gpu_available():
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index


def train_index(index: faiss.Index, x: np.ndarray, spec: IndexSpec) -> None:
    """Train ``index`` on ``x`` (k-means on the GPU when there is one); one-line errors."""
    ivf = ivf_of(index)
    if ivf is not None and gpu_available():
        # k-means on the GPU; the trained centroids land in the CPU quantizer (same files).
        flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
    try:
        index.train(x)
    except RuntimeError as e:
        raise IndexStoreError(
            f"cannot train {spec.factory!r} on {len(x)} vectors: {_faiss_message(e)}"
        ) from None


def ivf_of(index: faiss.Index) -> Any:
    """The ``IndexIVF`` inside ``index`` (through wrappers), or None when it has none."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def _search_parameter(index: faiss.Index) -> tuple[str | None, list[int]]:
    ivf = ivf_of(index)
    if ivf is not None:
        nlist = int(ivf.nlist)
        values = [1 << i for i in range(int(math.log2(nlist)) + 1)]
        return "nprobe", values + ([nlist] if values[-1] != nlist else [])
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if hasattr(inner, "hnsw"):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024]
    return None, []


def drop_self(result: np.ndarray, own: np.ndarray | None, k: int) -> np.ndarray:
    """The first ``k`` ids of each row other than the query's own id (``own``), -1 padded."""
    if own is None:
        return result[:, :k]
    out = np.full((len(result), k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(result, own, strict=True)):
        kept = row[row != me][:k]
        out[i, : len(kept)] = kept
    return out


def _faiss_message(e: RuntimeError) -> str:
    """The useful line of a FAISS C++ exception (its text starts with the source location)."""
    text = str(e).strip().splitlines()
    for line in text:
        if "Error" in line and ":" in line:
            return line.rsplit(": ", 1)[-1].strip() or line
    return text[-1] if text else "unknown FAISS error"


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids an ``IDMap2`` index holds, (ntotal,) int64, in insertion order."""
    wrapped: Any = index  # the stubs type read_index() as the base Index
    return np.asarray(faiss.vector_to_array(wrapped.id_map), dtype=np.int64)


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ``ids`` from an index that supports removal; returns how many went."""
    wrapped: Any = index  # the Python wrapper takes an id array (the stubs want an IDSelector)
    return int(wrapped.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))


def search_parameters(
    index: faiss.Index, spec: IndexSpec, sel: faiss.IDSelector
) -> faiss.SearchParameters:
    """Per-search parameters restricting ``index`` to the ids ``sel`` accepts.

    Parameters given with a search replace the index's own, so the recorded ``nprobe`` /
    ``efSearch`` of ``spec`` go in the same object (IVF: ``SearchParametersIVF``, HNSW:
    ``SearchParametersHNSW``, otherwise the plain ``SearchParameters``).
    """
    inner: Any = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    values = dict(spec.search_params)
    params: Any
    if ivf_of(index) is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(values.get("nprobe", ivf_of(index).nprobe))
    elif hasattr(inner, "hnsw"):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = int(values.get("efSearch", inner.hnsw.efSearch))
    else:
        params = faiss.SearchParameters()
    params.sel = sel
    out: faiss.SearchParameters = params
    return out
