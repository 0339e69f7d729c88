"""Retrieval and zero-shot metrics on unit embeddings and labels, each with its sampling error.

What ``bindsearch eval`` computes on an index and ``bindsearch demo eval`` on its in-memory
embeddings: the definitions are in docs/evaluation.md. Pure numpy, no index, no model.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# A template field: "{}" (the key being classified) or "{key}" (every value of that key).
FIELD = re.compile(r"\{([^{}]*)\}")
# Distinct prompt texts one classification may embed (templates x combinations of values).
MAX_PROMPT_TEXTS = 50_000
# Scores held at once while ranking: (queries in a block) x (gallery items).
BLOCK_CELLS = 1 << 23


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` independent trials and its standard error (``nan`` when ``n`` is 0)."""

    value: float
    stderr: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``value``, ``stderr``, ``n`` (``null`` figures when nothing was measured)."""
        if self.n == 0:
            return {"value": None, "stderr": None, "n": 0}
        return {"value": self.value, "stderr": self.stderr, "n": self.n}

    def __format__(self, spec: str) -> str:
        if self.n == 0:
            return "-"
        return f"{self.value:.3f}±{self.stderr:.3f}"


def proportion(hits: np.ndarray) -> Estimate:
    """A hit rate with its binomial standard error sqrt(p (1 - p) / n)."""
    h = np.asarray(hits, dtype=bool).ravel()
    n = int(h.size)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    p = float(h.mean())
    return Estimate(p, math.sqrt(p * (1 - p) / n), n)


def mean_estimate(values: np.ndarray) -> Estimate:
    """A mean with its standard error s / sqrt(n) (s: the sample standard deviation)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = int(x.size)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    s = float(x.std(ddof=1)) if n > 1 else 0.0
    return Estimate(float(x.mean()), s / math.sqrt(n), n)


def split_label(tag: str) -> tuple[str, str] | None:
    """``"key:value"`` -> (key, value), both stripped; None for a tag that is not a label."""
    key, sep, value = tag.partition(":")
    key, value = key.strip(), value.strip()
    return (key, value) if sep and key and value else None


@dataclass(frozen=True)
class LabelSet:
    """Labels of ``n`` items: per key its values, and which of them each item carries.

    An item may carry no value of a key (it is then left out of what that key measures), one,
    or several (a match on any counts).
    """

    values: Mapping[str, tuple[str, ...]]  # key -> its values, sorted
    member: Mapping[str, np.ndarray]  # key -> (n, len(values[key])) bool

    @classmethod
    def from_tags(cls, tags: Sequence[Iterable[str]]) -> LabelSet:
        """From each item's tags; ``key:value`` tags are labels, other tags are ignored."""
        parsed = [[kv for t in row if (kv := split_label(str(t))) is not None] for row in tags]
        keys = sorted({k for row in parsed for k, _ in row})
        values = {k: tuple(sorted({v for row in parsed for kk, v in row if kk == k})) for k in keys}
        member = {k: np.zeros((len(parsed), len(values[k])), dtype=bool) for k in keys}
        pos = {k: {v: j for j, v in enumerate(vs)} for k, vs in values.items()}
        for i, row in enumerate(parsed):
            for k, v in row:
                member[k][i, pos[k][v]] = True
        return cls(values, member)

    @classmethod
    def from_codes(
        cls, codes: Mapping[str, np.ndarray], values: Mapping[str, Sequence[str]]
    ) -> LabelSet:
        """From one value index per item and key (``codes[key][i]`` indexes ``values[key]``)."""
        member = {}
        for k, c in codes.items():
            c = np.asarray(c, dtype=np.int64)
            m = np.zeros((len(c), len(values[k])), dtype=bool)
            m[np.arange(len(c)), c] = True
            member[k] = m
        return cls({k: tuple(values[k]) for k in codes}, member)

    def __len__(self) -> int:
        return next((len(m) for m in self.member.values()), 0)

    @property
    def keys(self) -> tuple[str, ...]:
        """The label keys, sorted."""
        return tuple(self.values)

    def take(self, rows: np.ndarray | Sequence[int]) -> LabelSet:
        """The labels of these rows, with the same values per key."""
        r = np.asarray(rows, dtype=np.int64)
        return LabelSet(self.values, {k: m[r] for k, m in self.member.items()})

    def shared(self, other: LabelSet, key: str) -> np.ndarray:
        """(len(self), len(other)) bool: the two items share a value of ``key``."""
        a = self.member[key].astype(np.float32)
        b = other.member[key].astype(np.float32)
        return np.asarray((a @ b.T) > 0)


def relevance(
    queries: LabelSet, gallery: LabelSet, keys: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Graded relevance of every gallery item to every query.

    Returns (rel, full, shared): ``rel`` (nq, ng) the number of ``keys`` on which the two share
    a value; ``full`` (nq, ng) bool, the item shares every key the query carries a value of;
    ``shared[key]`` (nq, ng) bool per key.
    """
    shared = {k: queries.shared(gallery, k) for k in keys}
    rel = np.zeros((len(queries), len(gallery)), dtype=np.int32)
    for s in shared.values():
        rel += s
    carried = np.zeros(len(queries), dtype=np.int32)
    for k in keys:
        carried += queries.member[k].any(1)
    full = (rel == carried[:, None]) & (carried[:, None] > 0)
    return rel, full, shared


@dataclass(frozen=True)
class RankingScores:
    """Per-query outcomes of ranked lists (``nan``/``False`` rows are left out of the means)."""

    hit: dict[int, np.ndarray]  # k -> (nq,) bool: a fully relevant item in the top k
    hit_valid: np.ndarray  # (nq,) bool: the gallery holds a fully relevant item
    ndcg: dict[int, np.ndarray]  # k -> (nq,) float, nan where no item is relevant at all
    key_hit: dict[str, dict[int, np.ndarray]]  # key -> k -> (nq,) bool
    key_valid: dict[str, np.ndarray]  # key -> (nq,) bool: some item shares the query's value


def score_rankings(
    ranked: np.ndarray,
    rel: np.ndarray,
    full: np.ndarray,
    shared: Mapping[str, np.ndarray],
    ks: Sequence[int],
) -> RankingScores:
    """Outcomes of (nq, K) ranked gallery rows (-1: no item there) against the relevance.

    nDCG@k: gain = ``rel`` (shared label values), discount log2(rank + 1), ideal = the best
    ordering of the whole gallery; recall@k: a fully relevant item among the top k.
    """
    nq = len(rel)
    ok = ranked >= 0
    safe = np.where(ok, ranked, 0)
    rows = np.arange(nq)[:, None]
    got_full = full[rows, safe] & ok
    gains = np.where(ok, rel[rows, safe], 0).astype(np.float64)
    kmax = max(ks)
    ideal = -np.sort(-rel, axis=1)[:, :kmax].astype(np.float64)
    disc = 1.0 / np.log2(np.arange(kmax) + 2.0)
    hit: dict[int, np.ndarray] = {}
    ndcg: dict[int, np.ndarray] = {}
    for k in ks:
        hit[k] = np.asarray(got_full[:, :k].any(1))
        kk = min(k, ranked.shape[1])
        dcg = gains[:, :kk] @ disc[:kk]
        idcg = ideal[:, :k] @ disc[: min(k, ideal.shape[1])]
        with np.errstate(invalid="ignore", divide="ignore"):
            ndcg[k] = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)
    key_hit: dict[str, dict[int, np.ndarray]] = {}
    key_valid: dict[str, np.ndarray] = {}
    for key, s in shared.items():
        got = s[rows, safe] & ok
        key_hit[key] = {k: np.asarray(got[:, :k].any(1)) for k in ks}
        key_valid[key] = np.asarray(s.any(1))
    return RankingScores(hit, np.asarray(full.any(1)), ndcg, key_hit, key_valid)


@dataclass(frozen=True)
class RetrievalMetrics:
    """recall@k and nDCG@k of one query set against one gallery, and per-key hit rates."""

    queries: int
    recall: dict[int, Estimate]
    ndcg: dict[int, Estimate]
    by_key: dict[str, dict[int, Estimate]]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``queries``, ``recall@K``, ``ndcg@K`` and ``by_key`` (key -> ``recall@K``)."""
        out: dict[str, Any] = {"queries": self.queries}
        for k, e in self.recall.items():
            out[f"recall@{k}"] = e.to_dict()
        for k, e in self.ndcg.items():
            out[f"ndcg@{k}"] = e.to_dict()
        out["by_key"] = {
            key: {f"recall@{k}": e.to_dict() for k, e in per.items()}
            for key, per in self.by_key.items()
        }
        return out


def summarise(parts: Sequence[RankingScores], ks: Sequence[int], nq: int) -> RetrievalMetrics:
    """The means (with standard errors) of per-block ``score_rankings`` outcomes."""

    def cat(arrays: Iterable[np.ndarray]) -> np.ndarray:
        got = list(arrays)
        return np.concatenate(got) if got else np.zeros(0)

    valid = cat(p.hit_valid for p in parts).astype(bool)
    recall = {k: proportion(cat(p.hit[k] for p in parts)[valid]) for k in ks}
    ndcg = {}
    for k in ks:
        x = cat(p.ndcg[k] for p in parts)
        ndcg[k] = mean_estimate(x[~np.isnan(x)])
    by_key = {}
    for key in parts[0].key_hit if parts else {}:
        kv = cat(p.key_valid[key] for p in parts).astype(bool)
        by_key[key] = {k: proportion(cat(p.key_hit[key][k] for p in parts)[kv]) for k in ks}
    return RetrievalMetrics(nq, recall, ndcg, by_key)


def retrieval_metrics(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_labels: LabelSet,
    gallery_labels: LabelSet,
    ks: Sequence[int] = (1, 10),
    keys: Sequence[str] | None = None,
    exclude: np.ndarray | None = None,
) -> RetrievalMetrics:
    """Rank ``gallery`` (ng, D) by cosine for each of ``queries`` (nq, D); unit rows both.

    Args:
        keys: the label keys relevance counts (default: every key of the labels); one key
            makes relevance binary.
        exclude: (nq,) gallery row to leave out per query (the query itself), -1 for none.
    """
    keys = list(query_labels.keys if keys is None else keys)
    nq, ng = len(queries), len(gallery)
    kmax = max(ks)
    block = max(1, BLOCK_CELLS // max(ng, 1))
    parts = []
    for s in range(0, nq, block):
        sims = queries[s : s + block] @ gallery.T  # (b, ng)
        ql = query_labels.take(np.arange(s, min(s + block, nq)))
        rel, full, shared = relevance(ql, gallery_labels, keys)
        if exclude is not None:
            ex = np.asarray(exclude[s : s + block])
            r = np.nonzero(ex >= 0)[0]
            sims[r, ex[r]] = -np.inf
            rel[r, ex[r]] = 0
            full[r, ex[r]] = False
            for m in shared.values():
                m[r, ex[r]] = False
        kk = min(kmax, ng)
        top = (
            np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            if kk < ng
            else np.tile(np.arange(ng), (len(sims), 1))
        )
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        ranked = np.take_along_axis(top, order, axis=1)
        if exclude is not None:  # the excluded row, ranked last at -inf, is no result
            ranked = np.where(np.take_along_axis(sims, ranked, axis=1) == -np.inf, -1, ranked)
        parts.append(score_rankings(ranked, rel, full, shared, ks))
    return summarise(parts, ks, nq)


def zero_shot_accuracy(items: np.ndarray, classifiers: np.ndarray, truth: np.ndarray) -> Estimate:
    """Top-1 accuracy of (n, D) unit embeddings against (C, D) class embeddings.

    ``truth`` (n, C) bool: the classes each item carries; items carrying none are left out.
    """
    pred = np.asarray((items @ classifiers.T).argmax(1))
    carries = truth.any(1)
    hit = truth[np.arange(len(items)), pred]
    return proportion(hit[carries])


def template_fields(template: str) -> list[str]:
    """The fields of a prompt template: ``""`` for ``{}``, else the label key named."""
    return [f.strip() for f in FIELD.findall(template)]


def prompt_texts(
    template: str, key: str, values: Mapping[str, Sequence[str]]
) -> list[list[str]] | None:
    """Per value of ``key``, the template filled with it (``{}`` or ``{key}``) and with every
    combination of values of the other keys it names; None when it names neither."""
    fields = list(dict.fromkeys(template_fields(template)))
    if "" not in fields and key not in fields:
        return None
    unknown = [f for f in fields if f and f not in values]
    if unknown:
        raise ValueError(
            f"prompt {template!r} names {unknown[0]!r}, which no label has; "
            f"label keys: {', '.join(values) or 'none'}"
        )
    others = [f for f in fields if f and f != key]
    combos = list(itertools.product(*(values[o] for o in others)))
    out = []
    for v in values[key]:
        texts = []
        for combo in combos:
            fill = {key: v, "": v, **dict(zip(others, combo, strict=True))}
            texts.append(FIELD.sub(_filler(fill), template))
        out.append(texts)
    return out


def _filler(fill: Mapping[str, str]) -> Callable[[re.Match[str]], str]:
    return lambda m: fill[m.group(1).strip()]


def prompt_classifiers(
    embed_text: Callable[[Sequence[str]], np.ndarray],
    templates: Sequence[str],
    values: Mapping[str, Sequence[str]],
    keys: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per label key, (values, D) unit class embeddings from prompt templates (an ensemble).

    A class embedding is the mean, over the templates that name the key (``{}`` or
    ``{key}``), of the mean embedding of the template filled with the class's value and with
    every combination of values of the other keys it names; renormalised. Keys no template
    names are left out. Every distinct text is embedded once, by ``embed_text``.
    """
    chosen = list(values if keys is None else keys)
    plan: dict[str, list[list[list[str]]]] = {}
    for key in chosen:
        per_t = [t for t in (prompt_texts(tpl, key, values) for tpl in templates) if t]
        if per_t:
            plan[key] = per_t
    distinct: dict[str, int] = {}
    for per_t in plan.values():
        for per_value in per_t:
            for texts in per_value:
                for text in texts:
                    distinct.setdefault(text, len(distinct))
                    if len(distinct) > MAX_PROMPT_TEXTS:
                        raise ValueError(
                            f"the prompts name too many label combinations (over "
                            f"{MAX_PROMPT_TEXTS} texts); name fewer keys in a template"
                        )
    if not distinct:
        return {}
    emb = np.asarray(embed_text(list(distinct)), dtype=np.float32)
    out = {}
    for key, per_t in plan.items():
        cls = np.zeros((len(values[key]), emb.shape[1]), dtype=np.float64)
        for per_value in per_t:
            for j, texts in enumerate(per_value):
                cls[j] += emb[[distinct[t] for t in texts]].mean(0)
        cls /= len(per_t)
        out[key] = (cls / np.linalg.norm(cls, axis=1, keepdims=True)).astype(np.float32)
    return out
