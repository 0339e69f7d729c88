"""Exact search of a Flat index with torch (``index.torch_scan``): the ids and scores of FAISS.

The code path runs on CPU tensors in the default run; the same checks run on CUDA where torch
sees a GPU (skipped otherwise).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from index import open_index
from index import torch_scan as ts
from index.torch_scan import TorchScan, default_scan_device

from .test_index_store import fill, unit_rows

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU"),
    ),
]


def _flat(x: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    index.add_with_ids(x, ids)
    return index


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, faiss.Index]:
    x = unit_rows(3000, 48, seed=1)
    ids = np.random.default_rng(2).permutation(10_000)[:3000].astype(np.int64)  # not rows
    return x, ids, _flat(x, ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nq", [1, 7, 64])
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("block_bytes", [ts.SCAN_BLOCK_BYTES, 4096])
def test_same_ids_and_scores_as_faiss(
    data: tuple[np.ndarray, np.ndarray, faiss.Index],
    device: str,
    nq: int,
    k: int,
    block_bytes: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One block, or many small ones merged (4 KiB of scores: 16 to 1024 rows per block)."""
    monkeypatch.setattr(ts, "SCAN_BLOCK_BYTES", block_bytes)
    x, ids, index = data
    q = unit_rows(nq, x.shape[1], seed=3 + nq)
    want_s, want_i = index.search(q, k)
    got_s, got_i = TorchScan(index, device, ids).search(q, k)
    assert got_s.dtype == np.float32 and got_i.dtype == np.int64
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_filtered_rows_and_k_beyond_them(
    data: tuple[np.ndarray, np.ndarray, faiss.Index], device: str
) -> None:
    x, ids, index = data
    allowed = np.sort(ids[::37])  # 82 ids, ascending
    q = unit_rows(5, x.shape[1], seed=9)
    scan = TorchScan(index, device, ids)
    rows = scan.rows_of(allowed)
    np.testing.assert_array_equal(np.sort(ids[rows]), allowed)
    sel = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
    want_s, want_i = index.search(q, 10, params=sel)
    got_s, got_i = scan.search(q, 10, rows)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5, rtol=0)
    got_s, got_i = scan.search(q, 500, rows)  # k beyond the rows: every row, best first
    assert got_i.shape == (5, len(allowed))
    assert (np.diff(got_s, axis=1) <= 0).all()


def test_index_other_than_flat_ip_is_not_scanned() -> None:
    x = unit_rows(300, 16, seed=4)
    l2 = faiss.IndexIDMap2(faiss.IndexFlatL2(16))
    l2.add_with_ids(x, np.arange(300, dtype=np.int64))
    hnsw = faiss.IndexIDMap2(faiss.IndexHNSWFlat(16, 8, faiss.METRIC_INNER_PRODUCT))
    hnsw.add_with_ids(x, np.arange(300, dtype=np.int64))
    empty = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    assert not any(TorchScan.supports(i) for i in (l2, hnsw, empty))
    assert TorchScan.supports(_flat(x, np.arange(300, dtype=np.int64)))


def test_default_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda when torch sees a GPU and faiss-gpu is absent; never when the GPU is refused."""
    monkeypatch.setattr(ts, "gpu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_scan_device(None) == "cuda" and default_scan_device(True) == "cuda"
    assert default_scan_device(False) is None
    monkeypatch.setattr(ts, "gpu_available", lambda: True)  # faiss-gpu searches itself
    assert default_scan_device(None) is None
    monkeypatch.setattr(ts, "gpu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_scan_device(None) is None


@pytest.mark.parametrize("device", DEVICES)
def test_searcher_uses_it(tmp_path: Path, device: str) -> None:
    """``open_index(device=...)``: the searcher's results (tag filters too) are FAISS's."""
    x = unit_rows(400, 32, seed=5)
    tags = [("even",) if i % 2 == 0 else () for i in range(len(x))]
    with fill(tmp_path / "idx", x, tags) as store:
        store.refresh()
    q = unit_rows(3, 32, seed=6)
    with open_index(tmp_path / "idx", gpu=False) as plain:
        assert all(mi.device_scan is None for mi in plain._indexes.values())
        want = plain.search(q, k=10)
        want_tagged = plain.search(q, k=10, tags=["even"])
    with open_index(tmp_path / "idx", device=device) as scanned:
        assert all(mi.device_scan is not None for mi in scanned._indexes.values())
        got = scanned.search(q, k=10)
        got_tagged = scanned.search(q, k=10, tags=["even"])
    for a, b in [(got, want), (got_tagged, want_tagged)]:
        assert [[h.item.id for h in row] for row in a] == [[h.item.id for h in row] for row in b]
        for ra, rb in zip(a, b, strict=True):
            np.testing.assert_allclose([h.score for h in ra], [h.score for h in rb], atol=1e-5)
    assert all(h.item.id % 2 == 0 for row in got_tagged for h in row)
