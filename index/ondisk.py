"""On-disk IVF-PQ: inverted lists memory-mapped from a file, candidates re-ranked exactly.

``--factory auto`` picks it when the float32 vectors do not fit the memory budget
(``spec.choose_spec``). One modality's index is two files beside the chunks::

    <modality>.faiss     the coarse quantizer, the PQ codebooks and the list directory (small,
                         read whole)
    <modality>.ivfdata   every list's PQ codes and ids (FAISS ``OnDiskInvertedLists``),
                         memory-mapped: only the lists a query probes are paged in

A search scans ``nprobe`` lists by PQ distance, keeps the best ``rerank`` candidates, scores
them exactly against their float32 vectors (gathered from the memory-mapped chunks) and returns
the top k. Both parameters are tuned at build time against exact search on held-out vectors,
recorded in the manifest (``search_params``) and can be overridden per query.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from encoders import sha256_file

from .errors import IndexCorrupt
from .spec import (
    MAX_QUERIES,
    RECALL_K,
    IndexSpec,
    RecallReport,
    VectorSource,
    drop_self,
    exact_knn,
    ivf_of,
    recall_at_k,
    train_index,
)

if TYPE_CHECKING:
    from .store import IndexStore

DATA_SUFFIX = ".ivfdata"
RERANK = "rerank"  # search parameter: PQ candidates scored exactly against float32 vectors
NPROBE = "nprobe"
RERANK_FACTORS = (2, 4, 8, 16, 32, 64)  # candidates tried, as multiples of k
TUNE_QUERIES = 250  # held-out vectors the build tunes nprobe and rerank on (each costs a gather)
_IDS_BYTES = 16  # the searcher keeps each id twice in memory (as listed and sorted)

Gather = Callable[[np.ndarray], np.ndarray]


def data_path(index_file: Path) -> Path:
    """The inverted-list file beside an on-disk index's ``.faiss`` file."""
    return Path(index_file).with_suffix(DATA_SUFFIX)


_STDOUT_LOCK = threading.Lock()


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """FAISS's on-disk lists print progress with C ``printf``: keep it off our stdout (JSON)."""
    libc = ctypes.CDLL(None)
    with _STDOUT_LOCK:
        sys.stdout.flush()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)


# --- building -----------------------------------------------------------------------------------


def build_ondisk(
    spec: IndexSpec,
    dim: int,
    source: VectorSource,
    path: Path,
    target_recall: float,
    seed: int = 0,
    block_size: int = 65536,
) -> tuple[IndexSpec, RecallReport | None]:
    """Train ``spec`` (IVF-PQ) on a sample, add every vector, tune, and write both files.

    The PQ codes are built in memory (code size + 8 bytes per vector, never the float32
    vectors), then merged into the on-disk lists. Files appear by rename: ``path`` last.
    """
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = ivf_of(index)
    if ivf is None:
        raise ValueError(f"an on-disk index needs an IVF recipe, not {spec.factory!r}")
    ids = source.ids
    n = len(ids)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    nq = min(TUNE_QUERIES, MAX_QUERIES, n // 20)
    query_ids = np.sort(ids[perm[:nq]])
    pool = perm[nq:] if n - nq >= (spec.train_size or 1) else perm
    train_size = min(len(pool), spec.train_size or len(pool))
    train_index(index, source.gather(np.sort(ids[pool[:train_size]])), spec)
    for block_ids, vecs in source.blocks(block_size):
        index.add_with_ids(vecs, block_ids)
    params: dict[str, int] = {NPROBE: 1, RERANK: 2 * RECALL_K}
    report = None
    if nq:
        report = tune(index, source, source.gather(query_ids), query_ids, target_recall)
        params = dict(report.search_params)
    tuned = IndexSpec(spec.factory, spec.metric, params, train_size, storage="disk")
    _write(index, Path(path))
    return tuned, report


def _write(index: faiss.Index, path: Path) -> None:
    ivf = ivf_of(index)
    data = data_path(path)
    tmp_data = data.with_name(data.name + ".tmp")
    tmp_index = path.with_name(path.name + ".tmp")
    tmp_data.unlink(missing_ok=True)
    lib: Any = faiss  # the stubs lack the SWIG vector of list pointers
    lists: Any
    with quiet_stdout():
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp_data))
        pointers = lib.InvertedListsPtrVector()
        pointers.push_back(ivf.invlists)
        lists.merge_from_multiple(pointers.data(), pointers.size(), False, False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and frees) the lists now
    lists.filename = str(data)  # what the header records; read back from the index's folder
    faiss.write_index(index, str(tmp_index))
    for p in (tmp_data, tmp_index):  # the lists were written through a mapping: fsync them
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp_data, data)
    os.replace(tmp_index, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tune(
    index: faiss.Index,
    source: VectorSource,
    queries: np.ndarray,
    query_ids: np.ndarray,
    target_recall: float,
    k: int = RECALL_K,
) -> RecallReport:
    """The cheapest (``nprobe``, ``rerank``) whose re-ranked recall@k reaches the target.

    ``nprobe`` grows by powers of two; for each, the fewest candidates (``rerank``) that reach
    the target win; else the best pair tried. Queries are indexed vectors, each query's own id
    excluded from both result lists (as ``spec.tune``).
    """
    _, exact = exact_knn(queries, source, k + 1)
    truth = drop_self(exact, query_ids, k)
    ivf = ivf_of(index)
    nlist = int(ivf.nlist)
    nprobes = [1 << i for i in range(int(math.log2(nlist)) + 1)]
    nprobes += [nlist] if nprobes[-1] != nlist else []
    reranks = [f * k for f in RERANK_FACTORS]
    tried: list[tuple[int | tuple[int, int], float]] = []
    best: tuple[float, int, int] = (-1.0, 1, reranks[0])
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        _, cand = index.search(queries, reranks[-1] + 1)
        scores = _exact_scores(queries, cand, source.gather)  # once; each rerank is a prefix
        for rerank in reranks:
            got = _top(scores[:, : rerank + 1], cand[:, : rerank + 1], k + 1)
            r = recall_at_k(drop_self(got, query_ids, k), truth, k)
            tried.append(((nprobe, rerank), r))
            if r > best[0] + 1e-9:
                best = (r, nprobe, rerank)
            if r >= target_recall:
                best = (r, nprobe, rerank)
                break
        if best[0] >= target_recall:
            break
    params = {NPROBE: best[1], RERANK: best[2]}
    return RecallReport(best[0], k, len(queries), int(index.ntotal), target_recall, params, tried)


def _exact_scores(q: np.ndarray, cand: np.ndarray, gather: Gather) -> np.ndarray:
    """(nq, R) exact inner products of each query with its candidates (-inf where none)."""
    out = np.full(cand.shape, -np.inf, dtype=np.float32)
    for s in range(0, len(q), 32):  # each batch gathers (32 x R) float32 vectors at most
        c = cand[s : s + 32]
        uniq = np.unique(c[c >= 0])
        if not len(uniq):
            continue
        vecs = gather(uniq)
        for r, row in enumerate(c):
            ok = row >= 0
            out[s + r, ok] = vecs[np.searchsorted(uniq, row[ok])] @ q[s + r]
    return out


def _top(scores: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` best-scored candidates per row, best first (-1 where fewer)."""
    kk = min(k, scores.shape[1])
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    top_s = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_s, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    ids = np.take_along_axis(cand, top, axis=1)
    return np.where(np.isfinite(np.take_along_axis(scores, top, axis=1)), ids, -1)


def rerank_search(
    q: np.ndarray, cand: np.ndarray, gather: Gather, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of each query among its candidate ids (-1: none).

    The candidates' float32 vectors are gathered once for the whole batch (unique ids).
    """
    nq = len(q)
    out_d = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    flat = cand[cand >= 0]
    if not len(flat):
        return out_d, out_i
    uniq = np.unique(flat)
    vecs = gather(uniq)
    for r in range(nq):
        c = cand[r][cand[r] >= 0]
        if not len(c):
            continue
        rows = np.searchsorted(uniq, c)
        s = vecs[rows] @ q[r]
        kk = min(k, len(c))
        top = np.argpartition(-s, kk - 1)[:kk]
        top = top[np.argsort(-s[top], kind="stable")]
        out_d[r, :kk] = s[top]
        out_i[r, :kk] = c[top]
    return out_d, out_i


# --- reading and searching ----------------------------------------------------------------------


def read_ondisk(path: Path, sha256: str, data_sha256: str | None, root: Path) -> faiss.Index:
    """An on-disk index, both files checked against the manifest; lists memory-mapped."""
    data = data_path(path)
    for file, digest in ((path, sha256), (data, data_sha256)):
        if digest is None:
            continue
        try:
            ok = sha256_file(file) == digest  # memoised per (file, size, mtime, inode)
        except OSError:
            ok = False
        if not ok:
            raise _damaged(root, f"{file.name} is missing or does not match its sha256")
    with quiet_stdout():
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError:
            raise _damaged(root, f"{path.name} or {data.name} cannot be read") from None
    return index


def _damaged(root: Path, what: str) -> IndexCorrupt:
    return IndexCorrupt(
        f"the index at {root} is damaged: {what}; "
        f"run `bindsearch index verify {root}`, then rebuild it"
    )


def list_ids(index: faiss.Index) -> np.ndarray:
    """Every id an IVF index holds, ascending (read from its lists)."""
    ivf = ivf_of(index)
    lists = ivf.invlists
    parts = []
    for n in range(int(ivf.nlist)):
        size = int(lists.list_size(n))
        if size:
            ptr = lists.get_ids(n)
            parts.append(np.array(faiss.rev_swig_ptr(ptr, size), dtype=np.int64))
            lists.release_ids(n, ptr)
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


class OnDiskIndex:
    """Search of an on-disk IVF-PQ with exact re-ranking (``_ModalityIndex`` holds one)."""

    def __init__(self, index: faiss.Index, spec: IndexSpec, gather: Gather) -> None:
        self.index = index
        self.spec = spec
        self.gather = gather
        self.overrides: dict[str, int] = {}

    @property
    def params(self) -> dict[str, int]:
        """The recorded search parameters, with any per-query overrides applied."""
        values = {NPROBE: 1, RERANK: 2 * RECALL_K, **dict(self.spec.search_params)}
        values.update(self.overrides)
        return values

    def search(
        self, q: np.ndarray, k: int, sel: faiss.IDSelector | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        values = self.params
        params: Any = faiss.SearchParametersIVF()
        params.nprobe = int(values[NPROBE])
        if sel is not None:
            params.sel = sel
        want = max(k, int(values[RERANK]))
        _, cand = self.index.search(q, want, params=params)
        return rerank_search(q, cand, self.gather, k)


def check_overrides(values: Mapping[str, int | None]) -> dict[str, int]:
    """Per-query ``nprobe``/``rerank`` (None: the recorded value), each at least 1."""
    out = {}
    for name, v in values.items():
        if v is None:
            continue
        if name not in (NPROBE, RERANK):
            raise ValueError(f"unknown search parameter {name!r}; accepted: nprobe, rerank")
        if v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")
        out[name] = int(v)
    return out


# --- the store's refresh and sizes --------------------------------------------------------------


def refresh_ondisk(
    store: IndexStore,
    m: str,
    wanted: IndexSpec,
    old: tuple[IndexSpec, str, str | None, Any] | None,
    live: np.ndarray,
    target_recall: float,
    rebuild: bool,
    log: Any,
) -> tuple[IndexSpec, Any]:
    """``IndexStore.refresh`` of one on-disk modality: (spec, recall report dict or None).

    ``old``: the last manifest's (spec, sha256, data_sha256, recall). The files are kept when
    they hold exactly the live ids, else rebuilt whole (on-disk lists are not updated in place).
    """
    path = store.root / f"{m}.faiss"
    if old is not None and not rebuild:
        spec, digest, data_digest, recall = old
        if spec.on_disk and spec.factory == wanted.factory and data_digest is not None:
            try:
                index = read_ondisk(path, digest, data_digest, store.root)
                if np.array_equal(list_ids(index), live):
                    return spec, recall
            except IndexCorrupt:
                pass
    if log is not None:
        log(f"{m}: building {wanted.factory} on disk over {len(live)} vectors")
    spec, report = build_ondisk(wanted, store.dim, store.source(m), path, target_recall)
    return spec, None if report is None else report.to_dict()


def sizes(root: Path, file: str, data_file: str | None, ntotal: int, dim: int) -> dict[str, int]:
    """A modality's bytes held in memory by a searcher, and read from mapped files on demand.

    ``resident_bytes``: the ``.faiss`` file (read whole: for an on-disk index only the
    quantizer, codebooks and list directory) plus the ids the searcher keeps. ``on_disk_bytes``:
    what a search reads through memory maps, paged in as touched: the inverted lists and the
    float32 vectors re-ranked (0 for an index held in memory).
    """
    resident = (Path(root) / file).stat().st_size + _IDS_BYTES * ntotal
    mapped = 0
    if data_file is not None:
        mapped = (Path(root) / data_file).stat().st_size + 4 * dim * ntotal
    return {"resident_bytes": resident, "on_disk_bytes": mapped}
