"""The three figures of a cross-modal ranking (issue 18), from an index whose items carry tags.

Queries name factors (``key:value`` tags: ``class:star``, ``scene:snow``); a hit matches a
factor when it carries that tag. Over all queries, for one merge mode and ``k``:

- ``top1``: how often the first hit matches every named factor, beside ``best_single_top1``,
  the same for the best target modality searched alone;
- ``distinct``: the mean number of different modalities among the top ``k``;
- ``matched``: the mean number of matched factors per hit over the top ``k``, beside
  ``raw_matched``, the same for the raw-cosine merge.

``text_queries`` and ``item_queries`` make the queries of docs/ranking.md; ``ranking_figures``
computes the figures (``bench.ranking`` prints them for every merge; ``bindsearch eval`` can).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import merge_ranked, query_weights

if TYPE_CHECKING:
    from .search import IndexSearcher

__all__ = [
    "TEXT_TEMPLATE",
    "RankingFigures",
    "RankingQuery",
    "item_queries",
    "ranking_figures",
    "text_queries",
]

TEXT_TEMPLATE = "a {colour} {class} in the {scene}"


@dataclass(frozen=True)
class RankingQuery:
    """One query: its vector, its modality (or a mixed query's weights), the factors it names."""

    vector: np.ndarray
    modality: str | Mapping[str, float]
    factors: Mapping[str, str]  # tag key -> value, e.g. {"class": "star", "scene": "snow"}
    exclude: int | None = None  # the query's own item (an item query): never a result
    text: str = ""


@dataclass(frozen=True)
class RankingFigures:
    """The figures of one merge mode over a query set (see the module docstring)."""

    merge: str
    queries: int
    k: int
    top1: float
    best_single_top1: float
    best_single: str
    distinct: float
    matched: float
    raw_matched: float

    @property
    def top1_ratio(self) -> float:
        """``top1`` / ``best_single_top1`` (the issue's bar: at least 0.9)."""
        return self.top1 / self.best_single_top1 if self.best_single_top1 else float("nan")

    @property
    def matched_ratio(self) -> float:
        """``matched`` / ``raw_matched`` (the issue's bar: at least 0.95)."""
        return self.matched / self.raw_matched if self.raw_matched else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "merge": self.merge,
            "queries": self.queries,
            "k": self.k,
            "top1": self.top1,
            "best_single_top1": self.best_single_top1,
            "best_single": self.best_single,
            "top1_ratio": self.top1_ratio,
            "distinct": self.distinct,
            "matched": self.matched,
            "raw_matched": self.raw_matched,
            "matched_ratio": self.matched_ratio,
        }


def _tag_factors(tags: Sequence[str], keys: Sequence[str]) -> dict[str, str] | None:
    found = {}
    for tag in tags:
        key, sep, value = str(tag).partition(":")
        if sep and key in keys:
            found[key] = value
    return found if all(k in found for k in keys) else None


def _items(searcher: IndexSearcher, modality: str) -> list[tuple[int, list[str]]]:
    ids = [int(i) for i in searcher.item_ids(modality)]
    rows = searcher.get(ids, ["id", "tags"])
    return [(i, list(r["tags"])) for i, r in zip(ids, rows, strict=True) if r]


def text_queries(
    searcher: IndexSearcher,
    embed_text: Callable[[Sequence[str]], np.ndarray],
    template: str = TEXT_TEMPLATE,
    factors: Sequence[str] = ("colour", "class", "scene"),
    source: str = "vision",
) -> list[RankingQuery]:
    """One text query per combination of ``factors`` present among ``source`` items' tags.

    The text is ``template`` filled with the values (``"a {colour} {class} in the {scene}"``),
    embedded by ``embed_text`` (the index's model). Sorted, so deterministic.
    """
    combos = {
        tuple(sorted(f.items()))
        for _, tags in _items(searcher, source)
        if (f := _tag_factors(tags, factors)) is not None
    }
    wanted = [dict(c) for c in sorted(combos)]
    texts = [template.format(**f) for f in wanted]
    if not texts:
        return []
    vectors = np.asarray(embed_text(texts), np.float32)
    return [
        RankingQuery(v, "text", f, None, t) for v, f, t in zip(vectors, wanted, texts, strict=True)
    ]


def item_queries(
    searcher: IndexSearcher,
    modality: str = "vision",
    factors: Sequence[str] = ("class", "scene"),
    limit: int | None = None,
) -> list[RankingQuery]:
    """Every stored ``modality`` item carrying all ``factors`` as a query (itself left out).

    ``limit``: the first ``limit`` items by id only.
    """
    out = []
    for i, tags in _items(searcher, modality):
        f = _tag_factors(tags, factors)
        if f is not None:
            out.append(RankingQuery(searcher.vector(i), modality, f, i))
        if limit is not None and len(out) >= limit:
            break
    return out


def ranking_figures(
    searcher: IndexSearcher,
    queries: Sequence[RankingQuery],
    merge: str = "calibrated",
    k: int = 10,
    targets: Sequence[str] | None = None,
) -> RankingFigures:
    """The three figures of ``merge`` at ``k``: a search merge mode or ``calibration.METHODS``.

    Every target modality is searched once per query (``per_modality``); the merges are
    computed from those lists exactly as ``IndexSearcher.search`` does (``merge_ranked``).
    """
    mods = [str(m.value) for m in searcher.modalities] if targets is None else list(targets)
    calibration = searcher.calibration
    known = sorted({q for q, _ in calibration.pairs}) if calibration else ()
    top1 = distinct = matched = raw_matched = 0.0
    single = dict.fromkeys(mods, 0.0)
    for query in queries:
        extra = 1 if query.exclude is not None else 0
        (hits,) = searcher.search(
            query.vector[None],
            k=k + extra,
            targets=mods,
            merge="per_modality",
            query_modalities=_weights_arg(query.modality),
        )
        lists: dict[str, tuple[list[float], list[int]]] = {m: ([], []) for m in mods}
        tags: dict[int, tuple[str, ...]] = {}
        for h in hits:
            if h.item.id == query.exclude:
                continue
            s, i = lists[h.item.modality.value]
            s.append(h.score)
            i.append(h.item.id)
            tags[h.item.id] = h.item.tags
        arrays = [(m, np.array(s), np.array(i, np.int64)) for m, (s, i) in lists.items()]
        weights = query_weights(_weights_arg(query.modality), known)
        merged = merge_ranked(arrays, k, merge, calibration, weights)
        raw = merge_ranked(arrays, k, "raw", calibration, weights)

        n = len(query.factors)
        got = [_matched(tags[r.id], query.factors) for r in merged]
        top1 += bool(got) and got[0] == n
        distinct += len({r.modality for r in merged})
        matched += float(np.mean(got)) if got else 0.0
        raw_got = [_matched(tags[r.id], query.factors) for r in raw]
        raw_matched += float(np.mean(raw_got)) if raw_got else 0.0
        for m, _, ids in arrays:
            if len(ids):
                single[m] += _matched(tags[int(ids[0])], query.factors) == n
    nq = max(len(queries), 1)
    best = max(single, key=lambda m: (single[m], m)) if single else ""
    return RankingFigures(
        merge=merge,
        queries=len(queries),
        k=k,
        top1=top1 / nq,
        best_single_top1=single.get(best, 0.0) / nq,
        best_single=best,
        distinct=distinct / nq,
        matched=matched / nq,
        raw_matched=raw_matched / nq,
    )


def _matched(tags: Sequence[str], factors: Mapping[str, str]) -> int:
    return sum(f"{key}:{value}" in tags for key, value in factors.items())


def _weights_arg(modality: str | Mapping[str, float]) -> str | dict[str, float]:
    return modality if isinstance(modality, str) else dict(modality)
