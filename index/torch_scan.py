"""Exact inner-product search of a Flat index with torch, on any torch device.

faiss-gpu is often not installable (its wheels are CUDA-specific and large) while torch sees the
GPU. ``TorchScan`` copies a CPU ``IDMap2(Flat)`` index's vectors onto a torch device once and
answers ``search`` with a matrix product and ``topk`` per block of stored vectors, merging the
blocks' top-k: the same ids and scores as FAISS's exhaustive search (tests/test_dtype_scan.py,
against FAISS on CPU). IVF and HNSW indexes stay on CPU FAISS.
"""

from __future__ import annotations

import faiss
import numpy as np

from .flat import FlatVectors
from .spec import gpu_available

SCAN_BLOCK_BYTES = 256 << 20  # scores of one block of stored vectors: (queries, rows) float32


def default_scan_device(gpu: bool | None) -> str | None:
    """Where Flat indexes are scanned with torch by default: "cuda" when torch sees a GPU that
    faiss cannot use (faiss-cpu installed) and the GPU was not refused (``gpu=False``)."""
    if gpu is False or gpu_available():
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else None


class TorchScan:
    """Exact inner-product top-k over a CPU ``IDMap2(Flat)`` index's vectors on ``device``."""

    def __init__(self, index: faiss.Index, device: str, ids: np.ndarray) -> None:
        """``ids``: the index's ids (``index_ids``), in its row order."""
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but torch sees no CUDA GPU")
        self._host = FlatVectors(index, ids)
        # On the CPU a view of the index's memory (kept alive through _host), else one copy.
        self.vectors = torch.from_numpy(self._host.vectors).to(self.device)
        self.ids = self._host.ids
        self._ids = torch.from_numpy(self.ids).to(self.device)

    supports = staticmethod(FlatVectors.supports)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ``ids`` (all held by the index), ascending."""
        return self._host.rows_of(ids)

    def search(
        self, q: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(nq, k') float32 scores and int64 ids, best first, k' = min(k, rows scanned).

        ``rows``: scan only these row positions (a filtered search), else every row.
        """
        import torch

        d = self.vectors.shape[1]
        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32).reshape(-1, d))
        qt = qt.to(self.device)
        nq = qt.shape[0]
        n = self.vectors.shape[0] if rows is None else len(rows)
        rows_t = None if rows is None else torch.from_numpy(np.asarray(rows, np.int64))
        step = max(k, SCAN_BLOCK_BYTES // (4 * max(nq, 1)))
        best_s = torch.empty(nq, 0, device=self.device)
        best_r = torch.empty(nq, 0, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for s in range(0, n, step):
                if rows_t is None:
                    block, pos = self.vectors[s : s + step], None
                else:
                    pos = rows_t[s : s + step].to(self.device)
                    block = self.vectors.index_select(0, pos)
                scores = qt @ block.T  # (nq, rows in block)
                top_s, top_j = scores.topk(min(k, scores.shape[1]), dim=1)
                top_r = top_j + s if pos is None else pos[top_j]
                best_s = torch.cat([best_s, top_s], dim=1)
                best_r = torch.cat([best_r, top_r], dim=1)
                if best_s.shape[1] > k:  # keep the running top-k only
                    best_s, j = best_s.topk(k, dim=1)
                    best_r = best_r.gather(1, j)
            order = best_s.argsort(dim=1, descending=True, stable=True)
            best_s, best_r = best_s.gather(1, order), best_r.gather(1, order)
            ids = self._ids[best_r]
        return best_s.cpu().numpy().astype(np.float32), ids.cpu().numpy()
