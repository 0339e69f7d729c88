"""A CPU ``IDMap2(Flat)`` inner-product index's vectors, read in place: what both exact scans
share (``search.FlatScan`` with BLAS on the CPU, ``torch_scan.TorchScan`` on a torch device)."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from .spec import index_ids


class FlatVectors:
    """The index's (n, d) float32 vectors as a view of its memory, its ids in row order, and
    the rows of given ids."""

    def __init__(self, index: faiss.Index, ids: np.ndarray | None = None) -> None:
        """``ids``: the index's ``index_ids`` when the caller has them already."""
        inner: Any = faiss.downcast_index(index.index)  # type: ignore[attr-defined]
        n, d = int(inner.ntotal), int(inner.d)
        self._owner = index  # ``vectors`` is a view of its memory
        self.vectors = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d)
        self.ids = index_ids(index) if ids is None else np.asarray(ids, dtype=np.int64)
        self._order = np.argsort(self.ids, kind="stable")  # rows by ascending id

    @staticmethod
    def supports(index: faiss.Index) -> bool:
        """A CPU ``IDMap2`` over an inner-product ``IndexFlat`` holding vectors."""
        if not isinstance(index, faiss.IndexIDMap2) or index.ntotal == 0:
            return False
        inner = faiss.downcast_index(index.index)
        ip = inner.metric_type == faiss.METRIC_INNER_PRODUCT
        return isinstance(inner, faiss.IndexFlat) and ip

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ``ids`` (all held by the index), ascending."""
        pos = np.searchsorted(self.ids[self._order], ids)
        return np.sort(self._order[pos])
