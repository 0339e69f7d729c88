"""``index.shard``: shards of an index, searched apart and joined, answer as the whole index.

No Ray here: the shards are ``IndexShard``s in this process, the router an ``IndexSearcher``
opened without its vectors (``open_index(vectors=False)``), as ``serve --engine ray`` runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from index import IndexIncomplete, open_index
from index.search import ModalitySearch, RunSearch
from index.shard import IndexShard, join_shards, shard_plan
from index.store import FileRecord, IndexStore, ItemRecord

from .test_index_snapshot import DIM, FP, unit_rows


def make_index(root: Path, n: int = 60) -> np.ndarray:
    """Vision and audio items, some tagged "red", one removed (a Flat index)."""
    x = unit_rows(n, seed=3)
    files, items = [], []
    for i in range(n):
        modality = "vision" if i % 3 else "audio"
        name = f"/c/{i}.{'png' if modality == 'vision' else 'wav'}"
        files.append(FileRecord(name, "indexed", f"{i:064x}", 1, modality=modality))
        tags = ("red",) if i % 4 == 0 else ()
        items.append(ItemRecord(name, modality, f"{i:064x}", 1, tags=tags))
    with IndexStore.create(root, FP, DIM, {}) as store:
        store.commit_chunk(files, items, x)
        store.remove_paths(["/c/5.png"])
        store.refresh()
    return x


def sharded(shards: list[IndexShard]) -> RunSearch:
    """The router's ``RunSearch``: each shard gets the tag ids it holds, answers are joined."""

    def run(q: np.ndarray, plan: Sequence[ModalitySearch]) -> list[tuple[np.ndarray, np.ndarray]]:
        n = len(shards)
        answers = []
        for s, shard in enumerate(shards):
            answers.append(shard.run_search(q, shard_plan(plan, s, n)))
        return join_shards(plan, answers)

    return run


@pytest.mark.parametrize("n_shards", [1, 2, 3, 7])
def test_shards_joined_answer_as_the_whole_index(tmp_path: Path, n_shards: int) -> None:
    root = tmp_path / "idx"
    make_index(root)
    whole = open_index(root, gpu=False)
    router = open_index(root, gpu=False, snapshot=True, vectors=False)
    shards = [
        IndexShard.load(root, s, n_shards, router.manifest.generation) for s in range(n_shards)
    ]
    held = sum(sum(s.counts().values()) for s in shards)
    assert held == 59  # every live item in exactly one shard (one of 60 was removed)
    run = sharded(shards)
    q = unit_rows(5, seed=9)
    for kwargs in (
        {"k": 10},
        {"k": 4, "merge": "per_modality"},
        {"k": 7, "merge": "raw", "targets": ["vision"]},
        {"k": 50, "tags": ["red"]},
        {"k": 3, "tags": ["red"], "merge": "rrf"},
        {"k": 5, "tags": ["nothing"]},
    ):
        want, got = whole.search(q, **kwargs), router.search(q, **kwargs, run=run)
        for w, g in zip(want, got, strict=True):
            assert [h.item.id for h in g] == [h.item.id for h in w], kwargs
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
        assert 5 not in {h.item.id for hs in got for h in hs}  # the removed item
    with pytest.raises(RuntimeError, match="without its vectors"):
        router.search(q, k=3)
    whole.close()
    router.close()


def test_a_shard_refuses_another_generation_and_bad_numbers(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    make_index(root)
    gen = open_index(root, gpu=False).manifest.generation
    with pytest.raises(IndexIncomplete, match="restart it"):
        IndexShard.load(root, 0, 2, gen + 1)
    with pytest.raises(ValueError, match=r"not one of 0\.\.1"):
        IndexShard.load(root, 2, 2)
    shard = IndexShard.load(root, 1, 2)
    assert set(shard.counts()) == {m for m in open_index(root, gpu=False).modalities}
    assert shard.nbytes == sum(shard.counts().values()) * (DIM * 4 + 8)
