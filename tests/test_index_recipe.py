"""Index recipes: ``--factory auto`` from corpus size and memory budget, recall@10 recorded
against exact search, forced factory strings (HNSW, IVF-PQ) through the same store."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from encoders.config import resolve_config
from index import (
    IndexSpec,
    IndexStoreError,
    choose_spec,
    model_fingerprint,
    open_index,
    recall_at_k,
    verify_index,
)
from index.spec import parse_size
from index.store import IndexStore, ItemRecord

FP = model_fingerprint(resolve_config("imagebind_test"), "random:0")


def clustered(n: int, d: int, centers: int, seed: int = 0, spread: float = 0.8) -> np.ndarray:
    """Unit vectors around random centres (a stand-in for real embeddings' cluster structure)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def fill(root: Path, x: np.ndarray, chunk: int = 50_000) -> IndexStore:
    store = IndexStore.create(root, FP, x.shape[1], {})
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        items = [
            ItemRecord(f"/v/{start + i}", "vision", f"{start + i:064x}", 1)
            for i in range(len(part))
        ]
        store.commit_chunk([], items, part)
    return store


def test_choose_spec_and_sizes() -> None:
    assert choose_spec(50_000, 1024) == IndexSpec("Flat")
    big = choose_spec(200_000, 64, parse_size("4GB"))
    assert big.factory == "IVF512,Flat" and big.train_size == 512 * 40
    short = choose_spec(200_000, 64, parse_size("20MB"))  # flat vectors alone need 51 MB
    assert short.factory.startswith("IVF512,PQ") and short.factory.endswith("np")
    assert 200_000 * (int(short.factory[9:-2]) + 8) <= 20e6
    with pytest.raises(IndexStoreError, match="too small"):
        choose_spec(200_000, 64, parse_size("1MB"))
    assert parse_size("4GB") == 4 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("512mb") == 512 * 10**6 and parse_size("1e9") == 10**9
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")
    assert IndexSpec.parse("IDMap2,HNSW32").factory == "HNSW32"
    assert not IndexSpec("HNSW32").removable and IndexSpec("IVF64,Flat").removable


@pytest.mark.slow
def test_auto_recipe_on_200k_vectors_is_approximate_with_recall_recorded(tmp_path: Path) -> None:
    d = 64
    x = clustered(200_000, d, 1000)
    with fill(tmp_path / "idx", x) as store:
        manifest = store.refresh(factory="auto")
    entry = manifest.modalities["vision"]
    spec = entry.spec.to_dict()
    assert spec["factory"] == "IVF512,Flat"  # non-flat above 100k vectors
    nprobe = spec["search_params"]["nprobe"]
    assert entry.recall is not None
    assert entry.recall["recall_at_10"] >= 0.95 and entry.recall["queries"] == 1000
    assert nprobe <= 512 // 4  # far from scanning every list
    # The recorded recall holds on queries the index has never seen, against an exact oracle.
    centres = np.random.default_rng(0).standard_normal((1000, d)).astype(np.float32)  # as above
    q = centres[np.random.default_rng(1).integers(0, 1000, 500)]
    q = q + 0.8 * np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, exact = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    with open_index(tmp_path / "idx") as s:
        got = np.array([[h.item.id for h in hits] for hits in s.search(q, 10)])
    assert recall_at_k(got, exact, 10) >= 0.93
    assert verify_index(tmp_path / "idx").ok


@pytest.mark.parametrize("factory", ["HNSW16", "IVF16,PQ8np", "IVF32,Flat", "Flat"])
def test_forced_factories(tmp_path: Path, factory: str) -> None:
    x = clustered(4000, 32, 50)
    with fill(tmp_path / "idx", x, chunk=1500) as store:
        manifest = store.refresh(factory=factory)
    entry = manifest.modalities["vision"]
    assert entry.spec.factory == factory and entry.count == 4000
    assert (entry.recall is None) == (factory == "Flat")
    with open_index(tmp_path / "idx") as s:
        hits = s.search(x[:20], 5)
    top = [h[0].item.id for h in hits]
    assert sum(t == i for i, t in enumerate(top)) >= 18  # each vector finds itself
    assert verify_index(tmp_path / "idx").ok


def test_bad_factory_is_refused(tmp_path: Path) -> None:
    x = clustered(100, 16, 5)
    with fill(tmp_path / "idx", x) as store, pytest.raises(ValueError, match="FAISS cannot"):
        store.refresh(factory="NotAnIndex42")


@pytest.mark.parametrize("nq", [1, 2, 4, 37])
@pytest.mark.parametrize("block_bytes", [1 << 26, 4 * 1000])
def test_flat_scan_matches_faiss(
    nq: int, block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact scan of few queries returns FAISS's ids and scores, one block or many."""
    from index import search as search_mod

    monkeypatch.setattr(search_mod, "SCAN_BLOCK_BYTES", block_bytes)
    x = clustered(3000, 48, 40, seed=3)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(48))
    ids = np.random.default_rng(0).permutation(10_000)[:3000].astype(np.int64) * 7
    index.add_with_ids(x, ids)
    q = clustered(nq, 48, 40, seed=4)
    assert search_mod.FlatScan.supports(index)
    scan = search_mod.FlatScan(index)
    for k in (1, 10, 3000):
        want_d, want_i = index.search(q, k)
        got_d, got_i = scan.search(q, k)
        assert got_i.shape == (nq, k) and got_i.dtype == np.int64
        np.testing.assert_allclose(got_d, want_d, atol=2e-6)
        # Each id is returned with its own score (ids may differ from FAISS's only where two
        # scores tie in float32), and the best match is FAISS's.
        vec = index.reconstruct_batch(got_i.ravel()).reshape(nq, k, 48)
        np.testing.assert_allclose((vec @ q[:, :, None])[..., 0], got_d, atol=2e-6)
        assert (got_i[:, 0] == want_i[:, 0]).all()
        assert len(np.unique(got_i[0])) == k
    # A float64 query is searched as float32, as FAISS's wrapper does.
    for a, b in zip(scan.search(q.astype(np.float64), 5), scan.search(q, 5), strict=True):
        np.testing.assert_array_equal(a, b)


def test_flat_scan_serves_open_index_and_skips_other_recipes(tmp_path: Path) -> None:
    x = clustered(2000, 32, 30, seed=5)
    for factory, scanned in (("Flat", True), ("HNSW16", False)):
        with fill(tmp_path / factory, x, chunk=700) as store:
            store.refresh(factory=factory)
        with open_index(tmp_path / factory) as s:
            mi = s._indexes[next(iter(s._indexes))]
            assert (mi.scan is not None) == scanned
            one = s.search(x[5], 10)[0]
            assert one[0].item.id == 5 and abs(one[0].score - 1) < 1e-5  # id = row here
            batch = s.search(x[:20], 10)  # 16-64 queries: one matrix product too
            assert [h[0].item.id for h in batch] == list(range(20))
            assert [h.item.id for h in batch[5]] == [h.item.id for h in one]
