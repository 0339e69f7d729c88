"""Calibration per (query modality, target modality) pair: raw cosines made comparable.

Cosines of different modality pairs live on different scales (the modality gap), so merging
per-modality result lists by raw score lets one modality crowd out the others. At every commit
(build, add, sync) ``compute_calibration`` measures, for each pair, the scores of unrelated
pairs (the background) and of the true matches the corpus itself holds (positives: an item and
its own caption, items sharing a caption, a source file or a tag set), and fits maps from
score to relevance. ``merge="calibrated"`` uses ``graded``: the expected share of the query's
tags that the item carries, given the pair's score (the probability of a true match where
items carry no tags).
``Calibration.relevance`` applies it; docs/ranking.md compares the methods and says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from encoders import Modality

if TYPE_CHECKING:
    from .store import IndexStore

__all__ = [
    "BACKGROUND_CAPTIONS",
    "BACKGROUND_ITEMS",
    "CALIBRATION_VERSION",
    "MERGES",
    "METHODS",
    "NEUTRAL_CAPTIONS",
    "Calibration",
    "Merge",
    "Method",
    "PairCalibration",
    "Ranked",
    "compute_calibration",
    "merge_ranked",
    "query_weights",
    "rank_fusion",
]

CALIBRATION_VERSION = 1
Merge = Literal["calibrated", "raw", "rrf", "per_modality"]
MERGES: tuple[str, ...] = ("calibrated", "raw", "rrf", "per_modality")
# How a pair's score becomes a relevance; ``DEFAULT_METHOD`` is what ``calibrated`` uses
# (docs/ranking.md says why).
Method = Literal["zscore", "tail", "platt", "isotonic", "graded"]
METHODS: tuple[str, ...] = ("zscore", "tail", "platt", "isotonic", "graded")
DEFAULT_METHOD: Method = "graded"

# Sample caps (seeded): the cost is O(items x pairs), bounded whatever the corpus size.
BACKGROUND_ITEMS = 512  # stored vectors per modality, as queries and as targets
BACKGROUND_CAPTIONS = 256  # distinct captions embedded as text queries
MAX_POSITIVES = 4096  # positive pairs per modality pair
MAX_NEGATIVES = 16384  # background pairs in a fit
# pairs in the graded fit: every pair of a corpus of up to 256 items a modality (no sampling
# noise in what ``calibrated`` ranks by), 0.1 CPU-second of fit a pair at the cap
MAX_GRADED = 65536
MIN_BLOCK = 32  # pairs per block of the isotonic fit
FALLBACK_TARGETS = 100  # the least n of the unfitted pairs' 1 / (1 + (n-1) p)
DUPLICATE_COSINE = 0.9  # from here a fitted map rises to 1 at cosine 1 (near-duplicates)
MIN_POSITIVES = 8  # fewer: no fitted map for the pair, the tail probability instead
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009)
SEED = 0
# Upper-tail levels whose background quantiles are stored (tail probability by interpolation).
TAIL_LEVELS: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)

# Text background when the corpus has no captions: plain, unrelated descriptions.
NEUTRAL_CAPTIONS: tuple[str, ...] = (
    "a photo of something",
    "a picture of an object",
    "a sound recording",
    "the view from a window",
    "a person walking down the street",
    "a plate of food on a table",
    "a car parked outside a house",
    "a dog running in a field",
    "people talking in a room",
    "a bird singing in a tree",
    "rain falling on a roof",
    "a boat on the water",
    "a mountain under a cloudy sky",
    "a busy market in the morning",
    "an empty road at night",
    "a child playing with a ball",
    "music playing in the background",
    "a cup of coffee",
    "a bicycle leaning against a wall",
    "waves crashing on a beach",
    "a cat sleeping on a sofa",
    "a train passing by",
    "a forest path in autumn",
    "a close-up of a flower",
    "an old building in a city",
    "someone typing on a keyboard",
    "a crowd at a concert",
    "snow covering the ground",
    "a kitchen with a window",
    "a dark and quiet room",
    "a plane in the sky",
    "a bowl of fruit",
)


@dataclass(frozen=True)
class PairCalibration:
    """One (query modality, target modality) pair: its background and its fitted map.

    ``mean``/``std``: background cosines (unrelated pairs). ``tail``: their quantiles at
    ``TAIL_LEVELS``. ``slope``/``intercept``: P(true match) = sigmoid(slope * z + intercept),
    z = (score - mean) / std, fitted on the pair's positives against its background with the
    two classes weighted equally; None when the corpus held too few positives. ``knots``:
    the isotonic fit of P(true match); ``graded``: of the expected share of the query's tags
    that the target carries.
    """

    mean: float
    std: float
    tail: tuple[float, ...]
    background: int
    positives: int = 0
    targets: int = 1  # target items in the sample
    slope: float | None = None
    intercept: float | None = None
    knots: tuple[tuple[float, float], ...] = ()  # isotonic map: (score, P(match)), ascending
    graded: tuple[tuple[float, float], ...] = ()  # isotonic map: (score, E[share of query tags])

    def z(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, np.float64) - self.mean) / self.std

    def tail_relevance(self, scores: np.ndarray) -> np.ndarray:
        """-log10 of the background's tail probability P(unrelated >= score).

        Interpolated between the stored quantiles; below the median it is the normal tail,
        above the last quantile the last segment's slope continues (monotone throughout).
        """
        s = np.asarray(scores, np.float64)
        xs = np.array(self.tail, np.float64)
        ys = -np.log10(np.array(TAIL_LEVELS, np.float64))
        xs = np.maximum.accumulate(xs)  # quantiles never decrease; ties are stretched apart
        xs = xs + np.arange(len(xs)) * 1e-9
        out = np.interp(s, xs, ys)
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9)
        above = s > xs[-1]
        out[above] = ys[-1] + slope * (s[above] - xs[-1])
        below = s < xs[0]
        if below.any():  # P(S >= s) under a normal background, capped at 1
            z = (s[below] - self.mean) / self.std
            p = np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in z])
            out[below] = np.minimum(-np.log10(np.clip(p, 1e-300, 1.0)), ys[0])
        return out

    def platt(self, scores: np.ndarray) -> np.ndarray:
        if self.slope is None or self.intercept is None:
            raise ValueError("this pair has no fitted map")
        return _sigmoid(self.slope * self.z(scores) + self.intercept)

    def relevance(self, scores: np.ndarray, method: Method = DEFAULT_METHOD) -> np.ndarray:
        """The pair's relevance of ``scores`` (monotone non-decreasing in the score).

        Every 0..1 map rises linearly from its value at ``DUPLICATE_COSINE`` to 1 at cosine 1:
        a cosine of 1 is the same embedding (a duplicate), a certain match whatever the pair.
        """
        if method == "zscore":
            return self.z(scores)
        if method == "tail":
            return self.tail_relevance(scores)
        s = np.asarray(scores, np.float64)
        rel = self._probability(s, method)
        high = s > DUPLICATE_COSINE
        if high.any():
            at = self._probability(np.array([DUPLICATE_COSINE]), method)[0]
            ramp = at + (1.0 - at) * (s[high] - DUPLICATE_COSINE) / (1.0 - DUPLICATE_COSINE)
            rel[high] = np.maximum(rel[high], np.minimum(ramp, 1.0))
        return rel

    def _probability(self, scores: np.ndarray, method: Method) -> np.ndarray:
        """A 0..1 map: ``method``'s fit where the pair has one, else the tail fallback."""
        if method == "platt" and self.slope is not None:
            return self.platt(scores)
        if method == "graded" and self.graded:
            return _interp(self.graded, scores)
        if method in ("graded", "isotonic") and self.knots:
            return _interp(self.knots, scores)
        # No fitted map: an item as unusual as one in n of the background (tail probability
        # p) is taken for the one true match among n targets: 1 / (1 + (n-1) p), n at least
        # FALLBACK_TARGETS (with a handful of targets every item would look like the match).
        # A sample of m unrelated pairs resolves tail probabilities down to 1 / (m + 1) only.
        p = np.maximum(np.power(10.0, -self.tail_relevance(scores)), 1.0 / (self.background + 1))
        n = max(self.targets, FALLBACK_TARGETS)
        return np.asarray(1.0 / (1.0 + (n - 1) * p), np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "tail": list(self.tail),
            "background": self.background,
            "positives": self.positives,
            "targets": self.targets,
            "slope": self.slope,
            "intercept": self.intercept,
            "knots": [list(k) for k in self.knots],
            "graded": [list(k) for k in self.graded],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairCalibration:
        tail = tuple(float(v) for v in d["tail"])
        if len(tail) != len(TAIL_LEVELS):
            raise ValueError(f"tail has {len(tail)} quantiles, not {len(TAIL_LEVELS)}")
        std = float(d["std"])
        if not std > 0:
            raise ValueError(f"std is {std}, not positive")
        slope, intercept = d.get("slope"), d.get("intercept")
        return cls(
            mean=float(d["mean"]),
            std=std,
            tail=tail,
            background=int(d["background"]),
            positives=int(d.get("positives", 0)),
            targets=int(d.get("targets", 1)),
            slope=None if slope is None else float(slope),
            intercept=None if intercept is None else float(intercept),
            knots=tuple((float(x), float(y)) for x, y in d.get("knots", ())),
            graded=tuple((float(x), float(y)) for x, y in d.get("graded", ())),
        )


@dataclass(frozen=True)
class Calibration:
    """Every measured pair of an index, keyed ``(query modality, target modality)``."""

    pairs: Mapping[tuple[str, str], PairCalibration]
    text: str = "captions"  # the text background: "captions" (the corpus's) or "neutral"
    notes: tuple[str, ...] = ()
    method: Method = DEFAULT_METHOD
    version: int = CALIBRATION_VERSION

    def relevance(
        self,
        weights: Mapping[str, float],
        target: Modality | str,
        scores: np.ndarray,
        method: Method | None = None,
    ) -> np.ndarray:
        """Relevance of ``scores`` against ``target`` items for a query of ``weights``.

        ``weights``: query modality -> weight (``query_weights``); a mixed query's relevance
        is the weighted mean of each term modality's map applied to the same cosine. Pairs
        this index did not measure are left out; with none, the raw score.
        """
        t = Modality.parse(target).value
        total, acc = 0.0, np.zeros(len(scores), np.float64)
        for q, w in weights.items():
            pair = self.pairs.get((q, t))
            if pair is None or w <= 0:
                continue
            acc += w * pair.relevance(scores, method or self.method)
            total += w
        if total == 0:
            return np.asarray(scores, np.float64)
        return acc / total

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "method": self.method,
            "text": self.text,
            "notes": list(self.notes),
            "pairs": {f"{q}->{t}": p.to_dict() for (q, t), p in sorted(self.pairs.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Parse ``to_dict``'s layout; ``ValueError`` saying what is wrong."""
        if d.get("version") != CALIBRATION_VERSION:
            raise ValueError(
                f"calibration version {d.get('version')!r} is not {CALIBRATION_VERSION}"
            )
        method = d.get("method", DEFAULT_METHOD)
        if method not in METHODS:
            raise ValueError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
        pairs: dict[tuple[str, str], PairCalibration] = {}
        names = {m.value for m in Modality}
        for key, value in dict(d["pairs"]).items():
            q, _, t = str(key).partition("->")
            if q not in names or t not in names:
                raise ValueError(f"calibration pair {key!r} is not 'query->target' modalities")
            try:
                pairs[(q, t)] = PairCalibration.from_dict(value)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"calibration pair {key!r}: {e}") from None
        return cls(
            pairs=pairs,
            text=str(d.get("text", "captions")),
            notes=tuple(str(n) for n in d.get("notes", ())),
            method=method,
        )


def query_weights(
    query: Mapping[Modality | str, float] | Sequence[Modality | str] | Modality | str | None,
    known: Iterable[str] = (),
) -> dict[str, float]:
    """Normalise a query's modalities into {modality: weight}, weights summing to 1.

    ``query``: one modality, several (equal weights), or modality -> weight (a mixed query's
    terms: their absolute weights). None: every query modality in ``known``, equally.
    """
    if query is None:
        raw = dict.fromkeys(known, 1.0)
    elif isinstance(query, Modality | str):
        raw = {Modality.parse(query).value: 1.0}
    elif isinstance(query, Mapping):
        raw = {}
        for m, w in query.items():
            name = Modality.parse(m).value
            raw[name] = raw.get(name, 0.0) + abs(float(w))
    else:
        raw = {}
        for m in query:
            raw[Modality.parse(m).value] = 1.0
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()} if total > 0 else {}


def rank_fusion(ranks: np.ndarray) -> np.ndarray:
    """Reciprocal rank fusion of 0-based ranks within each list: 1 / (RRF_K + rank + 1)."""
    return 1.0 / (RRF_K + np.asarray(ranks, np.float64) + 1.0)


@dataclass(frozen=True)
class Ranked:
    """One merged result: an item id of a target modality, its cosine and its relevance."""

    id: int
    modality: str
    score: float
    relevance: float


def merge_ranked(
    lists: Sequence[tuple[str, np.ndarray, np.ndarray]],
    k: int,
    merge: str,
    calibration: Calibration | None,
    weights: Mapping[str, float],
) -> list[Ranked]:
    """Merge per-modality result lists (modality, scores, ids; best first) into one ranking.

    ``merge``: ``calibrated`` (by relevance), ``raw`` (by cosine), ``rrf`` (reciprocal rank
    fusion), ``per_modality`` (each list's top ``k`` in turn, up to ``k`` x lists), or one of
    ``METHODS`` (calibrated with that map: the evaluation's variants). Each result's
    ``relevance`` is the calibrated one whatever the order (the raw score without a
    calibration). Ties keep list order: deterministic.
    """
    if merge not in MERGES and merge not in METHODS:
        raise ValueError(f"merge is {merge!r}; accepted: {', '.join(MERGES)}")
    ids_, scores_, rel_, key_, mods_ = [], [], [], [], []
    for m, scores, ids in lists:
        scores = np.asarray(scores, np.float64)[:k]
        ids = np.asarray(ids, np.int64)[:k]
        if calibration is None:
            rel = scores
        else:
            rel = calibration.relevance(weights, m, scores)
        if merge == "raw" or merge == "per_modality":
            key = scores
        elif merge == "rrf":
            key = rank_fusion(np.arange(len(scores)))
        elif merge == "calibrated" or calibration is None:
            key = rel
        else:
            key = calibration.relevance(weights, m, scores, method=merge)  # type: ignore[arg-type]
        ids_.append(ids)
        scores_.append(scores)
        rel_.append(rel)
        key_.append(key)
        mods_ += [m] * len(ids)
    if not ids_:
        return []
    all_ids, all_scores = np.concatenate(ids_), np.concatenate(scores_)
    all_rel, all_key = np.concatenate(rel_), np.concatenate(key_)
    if merge == "per_modality":
        order = np.arange(len(all_ids))
    else:  # by key, then by cosine, then list order
        order = np.lexsort((np.arange(len(all_ids)), -all_scores, -all_key))[:k]
    return [
        Ranked(int(all_ids[i]), mods_[i], float(all_scores[i]), float(all_rel[i])) for i in order
    ]


# --- computing it -------------------------------------------------------------------------------


@dataclass
class _Sample:
    """A seeded sample of one modality's items: ids, vectors, and their positive-group keys."""

    ids: np.ndarray
    vectors: np.ndarray
    keys: list[frozenset[str]] = field(default_factory=list)
    tags: list[frozenset[str]] = field(default_factory=list)


def compute_calibration(
    store: IndexStore,
    embed_text: Callable[[Sequence[str]], np.ndarray] | None,
    seed: int = SEED,
) -> Calibration:
    """Measure every (query modality, target modality) pair of the index in ``store``.

    Queries are the corpus's own stored vectors of each modality (never re-embedded) and, for
    text, up to ``BACKGROUND_CAPTIONS`` of its captions embedded by ``embed_text`` (the build's
    model), or ``NEUTRAL_CAPTIONS`` when it has none; None: no text pairs. Positives are pairs
    that share a caption or a source file (an item and its caption; a video and its
    soundtrack); everything else is background. Deterministic for a given index and ``seed``.
    """
    rng = np.random.default_rng(seed)
    samples: dict[str, _Sample] = {}
    for m in sorted(store.modalities()):
        ids = store.live_ids(m)
        if not len(ids):
            continue
        if len(ids) > BACKGROUND_ITEMS:
            ids = np.sort(rng.choice(ids, BACKGROUND_ITEMS, replace=False))
        rows = store.item_metadata(ids.tolist(), ["caption", "path", "tags"])
        keys = [_keys(r.get("caption"), r.get("path"), r.get("tags")) for r in rows]
        tags = [frozenset(str(t) for t in (r.get("tags") or ())) for r in rows]
        samples[m] = _Sample(ids, np.asarray(store.gather(ids), np.float32), keys, tags)
    notes: list[str] = []
    text = "captions"
    if embed_text is not None and samples:
        captions = sorted(
            {
                c[len("caption:") :]
                for s in samples.values()
                for k in s.keys
                for c in k
                if c.startswith("caption:")
            }
        )
        if len(captions) > BACKGROUND_CAPTIONS:
            pick = rng.choice(len(captions), BACKGROUND_CAPTIONS, replace=False)
            captions = [captions[i] for i in sorted(pick)]
        if not captions:
            text, captions = "neutral", list(NEUTRAL_CAPTIONS)
            notes.append(
                "the corpus has no captions: text is calibrated against a shipped neutral "
                "caption set, with no positives (tail probability, no fitted map)"
            )
        vectors = np.asarray(embed_text(captions), np.float32)
        keys = [
            frozenset({f"caption:{c}"}) if text == "captions" else frozenset() for c in captions
        ]
        tag_of: dict[str, frozenset[str]] = {}
        for smp in samples.values():
            for ks, tg in zip(smp.keys, smp.tags, strict=True):
                for k in ks:
                    tag_of.setdefault(k, tg)
        ctags = [tag_of.get(f"caption:{c}", frozenset()) for c in captions]
        query_samples = {
            "text": _Sample(np.full(len(captions), -1, np.int64), vectors, keys, ctags)
        }
    else:
        query_samples = {}
        if samples:
            notes.append("no text encoder at calibration: text queries are ranked by raw score")
    query_samples.update(samples)
    pairs: dict[tuple[str, str], PairCalibration] = {}
    unfitted: list[str] = []
    for q, qs in query_samples.items():
        for t, ts in samples.items():
            pair = _measure(qs, ts, same=q == t, rng=rng)
            if pair is not None:
                pairs[(q, t)] = pair
                if pair.slope is None:
                    unfitted.append(f"{q}->{t}")
    if unfitted:
        notes.append(
            f"fewer than {MIN_POSITIVES} positive pairs (shared caption or source) for "
            f"{', '.join(unfitted)}: those pairs use the background tail probability"
        )
    return Calibration(pairs=pairs, text=text, notes=tuple(notes))


def _keys(caption: object, path: object, tags: object = None) -> frozenset[str]:
    keys = set()
    if isinstance(tags, list | tuple) and tags:
        keys.add("tags:" + "\x1f".join(sorted(str(t) for t in tags)))
    if isinstance(caption, str) and caption.strip():
        keys.add(f"caption:{caption.strip()}")
    if isinstance(path, str) and path:
        keys.add(f"path:{path}")
    return frozenset(keys)


def _measure(
    q: _Sample, t: _Sample, same: bool, rng: np.random.Generator
) -> PairCalibration | None:
    scores = q.vectors @ t.vectors.T  # (nq, nt) cosines
    positive = np.zeros(scores.shape, bool)
    if any(q.keys) and any(t.keys):  # positives: pairs sharing a key
        index: dict[str, list[int]] = {}
        for j, ks in enumerate(t.keys):
            for key in ks:
                index.setdefault(key, []).append(j)
        for i, ks in enumerate(q.keys):
            for key in ks:
                positive[i, index.get(key, [])] = True
    valid = np.ones(scores.shape, bool)
    if same:  # an item against itself is neither background nor a positive
        valid &= q.ids[:, None] != t.ids[None, :]
    background = scores[valid & ~positive]
    if len(background) < 2:
        return None
    mean, std = float(background.mean()), float(background.std())
    std = max(std, 1e-6)
    tail = tuple(float(np.quantile(background, 1.0 - p)) for p in TAIL_LEVELS)
    pos = scores[valid & positive]
    if len(pos) > MAX_POSITIVES:
        pos = rng.choice(pos, MAX_POSITIVES, replace=False)
    slope = intercept = None
    knots: tuple[tuple[float, float], ...] = ()
    if len(pos) >= MIN_POSITIVES:
        neg = background
        if len(neg) > MAX_NEGATIVES:
            neg = rng.choice(neg, MAX_NEGATIVES, replace=False)
        slope, intercept = _fit_platt((pos - mean) / std, (neg - mean) / std)
        # The fitted probability keeps the sample's base rate (positives among all pairs).
        n_pos = int(valid[positive].sum())
        knots = _fit_isotonic(pos, neg, n_pos / max(n_pos + len(background), 1))
    graded: tuple[tuple[float, float], ...] = ()
    if any(q.tags) and any(t.tags):
        vocab = {v: i for i, v in enumerate(sorted(set().union(*q.tags, *t.tags)))}
        a = np.zeros((len(q.tags), len(vocab)), np.float32)
        b = np.zeros((len(t.tags), len(vocab)), np.float32)
        for mat, sets in ((a, q.tags), (b, t.tags)):
            for i, tg in enumerate(sets):
                mat[i, [vocab[v] for v in tg]] = 1
        # The share of the query's tags that the target carries: how many of the query's
        # properties the item has (the user's question), not a symmetric overlap (Jaccard
        # divides by the union, so it also counts the target's other tags against it and,
        # convex in the shared count, rewards a rare full match over a reliable partial one).
        # A query without tags has no properties to share: its pairs are left out.
        qn = a.sum(1)[:, None]
        share = (a @ b.T) / np.maximum(qn, 1)
        labelled = valid & (qn > 0)
        xs, ys = scores[labelled], share[labelled]
        if len(xs) > MAX_GRADED:
            pick = rng.choice(len(xs), MAX_GRADED, replace=False)
            xs, ys = xs[pick], ys[pick]
        graded = _pav(xs.astype(np.float64), ys.astype(np.float64), np.ones(len(xs)))
    n = len(t.ids)
    return PairCalibration(
        mean, std, tail, len(background), len(pos), n, slope, intercept, knots, graded
    )


def _fit_isotonic(
    pos: np.ndarray, neg: np.ndarray, base_rate: float, max_knots: int = 64
) -> tuple[tuple[float, float], ...]:
    """Pool-adjacent-violators fit of P(positive | score), at most ``max_knots`` knots.

    Positives and negatives are weighted so that positives make up ``base_rate`` of the
    weight (the rate among all the pair's sampled pairs, whatever was subsampled). Blocks
    hold at least ``MIN_BLOCK`` pairs: a few lucky positives at the top would read P = 1.
    """
    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    w = np.concatenate(
        [np.full(len(pos), base_rate / len(pos)), np.full(len(neg), (1 - base_rate) / len(neg))]
    )
    return _pav(x, y, w, max_knots)


def _pav(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, max_knots: int = 64
) -> tuple[tuple[float, float], ...]:
    """Weighted isotonic regression of ``y`` on ``x``, as at most ``max_knots`` knots."""
    order = np.lexsort((y, x))
    # blocks: weighted mean y, weight, weighted sum of x, number of pairs
    means: list[float] = []
    weights: list[float] = []
    xsum: list[float] = []
    sizes: list[int] = []
    for xi, yi, wi in zip(x[order].tolist(), y[order].tolist(), w[order].tolist(), strict=True):
        means.append(yi)
        weights.append(wi)
        xsum.append(xi * wi)
        sizes.append(1)
        while len(means) > 1 and means[-2] >= means[-1]:
            _pool(means, weights, xsum, sizes)
    # From the top down, a block smaller than MIN_BLOCK joins the one below it (the merged
    # mean lies between the two: still monotone).
    for i in range(len(means) - 1, 0, -1):
        if sizes[i] < MIN_BLOCK:
            wt = weights[i - 1] + weights[i]
            means[i - 1] = (means[i - 1] * weights[i - 1] + means[i] * weights[i]) / wt
            weights[i - 1] = wt
            xsum[i - 1] += xsum[i]
            sizes[i - 1] += sizes[i]
            del means[i], weights[i], xsum[i], sizes[i]
    cx = np.array(xsum) / np.array(weights)  # each block's weighted mean score
    cy = np.array(means)
    if len(cx) > max_knots:  # keep the top blocks (where rankings are decided), thin the rest
        half = max_knots // 2
        low = np.linspace(0, len(cx) - half, half).astype(int)
        keep = np.unique(np.concatenate([low, np.arange(len(cx) - half, len(cx))]))
        cx, cy = cx[keep], cy[keep]
    return tuple((float(a), float(b)) for a, b in zip(cx, cy, strict=True))


def _pool(means: list[float], weights: list[float], xsum: list[float], sizes: list[int]) -> None:
    """Merge the last block into the one before it."""
    m2, w2, s2, n2 = means.pop(), weights.pop(), xsum.pop(), sizes.pop()
    wt = weights[-1] + w2
    means[-1] = (means[-1] * weights[-1] + m2 * w2) / wt
    weights[-1] = wt
    xsum[-1] += s2
    sizes[-1] += n2


def _fit_platt(pos: np.ndarray, neg: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """Logistic regression of label on z, both classes weighted equally (Newton's method).

    The slope is kept at least ``MIN_SLOPE``: a pair whose positives score no higher than
    its background gets a nearly flat map (it cannot tell a match), never a falling one.
    """
    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    w = np.concatenate([np.full(len(pos), 0.5 / len(pos)), np.full(len(neg), 0.5 / len(neg))])
    a, b = 1.0, 0.0
    ridge = 1e-4  # keeps a separable sample's slope finite
    for _ in range(iters):
        p = _sigmoid(a * x + b)
        g = np.array([np.sum(w * (p - y) * x) + ridge * a, np.sum(w * (p - y))])
        h = w * p * (1 - p)
        hess = np.array(
            [[np.sum(h * x * x) + ridge, np.sum(h * x)], [np.sum(h * x), np.sum(h) + 1e-12]]
        )
        step = np.linalg.solve(hess, g)
        a, b = a - float(step[0]), b - float(step[1])
        if np.abs(step).max() < 1e-10:
            break
    return max(a, MIN_SLOPE), b


MIN_SLOPE = 1e-3


def _interp(knots: Sequence[tuple[float, float]], scores: np.ndarray) -> np.ndarray:
    """A fitted map: linear between its knots, flat beyond them."""
    xs = [x for x, _ in knots]
    ys = [y for _, y in knots]
    out: np.ndarray = np.interp(np.asarray(scores, np.float64), np.array(xs), np.array(ys))
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))
