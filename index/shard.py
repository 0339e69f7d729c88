"""One shard of an index for sharded serving, and the join of the shards' answers.

A shard holds the live items whose id is ``shard`` modulo ``shards``, of every modality, read
from the index's chunks (the truth the FAISS files are derived from) into an exact scan. The
router plans a search as ever (``IndexSearcher.search`` with ``run=``), each shard runs the plan
over its items (``IndexShard.run_search``), and ``join_shards`` keeps the top ``k`` of their
union per modality: the union of exact per-shard top-``k`` lists holds the exact top ``k``, so
a sharded Flat index answers what the single-process one does (docs/scale.md, "Sharded serving
on Ray Serve", says which recipes give identical answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoders import Modality

from .errors import IndexIncomplete
from .search import SCAN_BLOCK_BYTES, ModalitySearch, top_k
from .store import IndexStore, read_manifest


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard each id belongs to: ``id % shards`` (ids are dense, so shards are even)."""
    return np.asarray(ids, np.int64) % shards


def shard_plan(plan: Sequence[ModalitySearch], shard: int, shards: int) -> list[ModalitySearch]:
    """The part of a search plan one shard runs: each tag filter cut to the ids it holds."""
    return [
        ModalitySearch(
            ms.modality,
            ms.k,
            None if ms.allowed is None else ms.allowed[shard_of(ms.allowed, shards) == shard],
        )
        for ms in plan
    ]


@dataclass
class _Part:
    ids: np.ndarray  # ascending
    vectors: np.ndarray  # (len(ids), D) float32 unit rows, in ``ids`` order


class IndexShard:
    """The items of one shard, searched exactly; built once by ``load``, read-only after."""

    def __init__(
        self, shard: int, shards: int, generation: int, parts: dict[Modality, _Part]
    ) -> None:
        self.shard = shard
        self.shards = shards
        self.generation = generation
        self._parts = parts

    @classmethod
    def load(
        cls, root: str | Path, shard: int, shards: int, generation: int | None = None
    ) -> IndexShard:
        """Read shard ``shard`` of ``shards`` of the index at ``root``.

        ``generation``: the committed generation the router serves; an index on disk at
        another one is refused (``IndexIncomplete``), so router and shards never disagree.
        """
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
        root = Path(root)
        manifest = read_manifest(root)
        if generation is not None and manifest.generation != generation:
            raise IndexIncomplete(
                f"the index at {root} is at generation {manifest.generation}, the router serves "
                f"generation {generation}: it changed since the service started; restart it"
            )
        store = IndexStore.open_readonly(root)
        try:
            if store.generation != manifest.generation:
                raise IndexIncomplete(
                    f"the index at {root} changed after its manifest was written (an update "
                    "is running or was interrupted): serve it once the update is done"
                )
            store.check_files(manifest)  # a damaged chunk is refused in one line (IndexCorrupt)
            parts = {}
            for name in manifest.modalities:
                live = store.live_ids(name)
                ids = np.sort(live[shard_of(live, shards) == shard])
                parts[Modality.parse(name)] = _Part(ids, store.gather(ids))
        finally:
            store.close()
        return cls(shard, shards, manifest.generation, parts)

    def counts(self) -> dict[Modality, int]:
        """Items held, per modality."""
        return {m: len(p.ids) for m, p in self._parts.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of vectors and ids held."""
        return sum(p.vectors.nbytes + p.ids.nbytes for p in self._parts.values())

    def run_search(
        self, q: np.ndarray, plan: Sequence[ModalitySearch]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``RunSearch`` over this shard's items: exact top-``k`` per planned modality.

        A plan's ``allowed`` ids may include other shards' (they are skipped).
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = []
        for ms in plan:
            part = self._parts.get(ms.modality)
            if part is None or not len(part.ids):
                out.append(_empty(len(q)))
                continue
            if ms.allowed is None:
                rows = None
            else:
                rows = _rows_of(part.ids, ms.allowed)
                if not len(rows):
                    out.append(_empty(len(q)))
                    continue
            out.append(_scan(q, part, ms.k, rows))
        return out


def _rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of ``ids`` (ascending) holding one of ``wanted``, ascending."""
    pos = np.searchsorted(ids, wanted)
    ok = pos < len(ids)
    pos = pos[ok]
    return np.unique(pos[ids[pos] == np.asarray(wanted)[ok]])


def _scan(
    q: np.ndarray, part: _Part, k: int, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    step = max(k, SCAN_BLOCK_BYTES // (4 * len(q)))
    if rows is None:
        n = len(part.ids)
        blocks = ((part.vectors[s : s + step], part.ids[s : s + step]) for s in range(0, n, step))
    else:
        blocks = (
            (part.vectors[r], part.ids[r])
            for r in (rows[s : s + step] for s in range(0, len(rows), step))
        )
    return top_k(q, blocks, k)


def _empty(nq: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)


def join_shards(
    plan: Sequence[ModalitySearch], answers: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every shard's ``run_search`` answer to ``plan`` -> the plan's answer: per modality, the
    top ``k`` of the shards' lists together, best first ((nq, k') scores and ids)."""
    if not answers:
        raise ValueError("no shard answered")
    out = []
    for ms, *lists in zip(plan, *answers, strict=True):
        k = ms.k
        scores = np.concatenate([d for d, _ in lists], axis=1)
        ids = np.concatenate([i for _, i in lists], axis=1)
        kk = min(k, scores.shape[1])
        # stable: equal scores keep the shard order (ids differ, so results are still sound)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        out.append(
            (np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1))
        )
    return out
