"""``run_eval``: a labelled manifest + a model (+ an index) -> the report of ``bindsearch eval``.

The vectors are the index's own (built from the manifest by ``index.pipeline.build_index`` unless
one is given), so the figures are those of what the service serves; labels, captions and which
item is which come from the manifest, read by the index's own reader (``index.corpus``).
"""

from __future__ import annotations

import hashlib
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from encoders import Modality, ModelRef
from index.calibration import MERGES as SEARCH_MERGES

from .metrics import (
    LabelSet,
    mean_estimate,
    prompt_classifiers,
    relevance,
    retrieval_metrics,
    score_rankings,
    summarise,
    zero_shot_accuracy,
)

if TYPE_CHECKING:
    from index.results import Hit
    from index.search import IndexSearcher

# How the any-to-any section merges the per-modality lists (the index's own merge modes:
# ``index.calibration``); passed to ``merged_search`` only.
MERGES: tuple[str, ...] = tuple(SEARCH_MERGES)
DEFAULT_PROMPTS = ("a {}",)
SEARCH_BATCH = 256  # query vectors per merged search


@dataclass
class EvalOptions:
    """What ``bindsearch eval`` measures, and how."""

    k: tuple[int, ...] = (1, 10)
    label_key: str | None = None  # binary relevance on this key; None: graded over every key
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    merge: str = "calibrated"
    # Text queries made from label combinations ("a {colour} {class} in the {scene}"): the
    # three ranking figures of docs/ranking.md (``index.ranking_eval``) for ``merge``.
    query_template: str | None = None
    max_queries: int = 2000  # per query modality, a seeded sample beyond it
    seed: int = 0
    soundtrack: bool = True  # build: a video's soundtrack is also an audio item
    allow_outside: bool = False  # build and manifest: paths outside the manifest's folder
    progress: bool | None = None  # None: when stderr is a terminal

    def check(self) -> None:
        """Refuse options that measure nothing, with the option's name (``ValueError``)."""
        if not self.k or min(self.k) < 1:
            raise ValueError(f"-k must be at least 1, got {list(self.k)}")
        if self.max_queries < 1:
            raise ValueError(f"--max-queries must be at least 1, got {self.max_queries}")
        if not self.prompts:
            raise ValueError("give at least one --prompt")
        check_merge(self.merge)
        if self.query_template is not None and not template_keys(self.query_template):
            raise ValueError(
                f"--query-template {self.query_template!r} names no label key: "
                'write them in braces, e.g. "a {colour} {class} in the {scene}"'
            )


def template_keys(template: str) -> list[str]:
    """The label keys a query template names (``{colour}`` ...), in order, or [] if none."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError:  # unbalanced braces
        return []


def check_merge(merge: str) -> None:
    """Refuse a merge mode ``merged_search`` does not know, naming those it does."""
    if merge not in MERGES:
        raise ValueError(f"unknown --merge {merge!r}; accepted: {', '.join(MERGES)}")


def merged_search(
    searcher: IndexSearcher, vectors: np.ndarray, k: int, merge: str, query_modality: str
) -> list[list[Hit]]:
    """Top-``k`` per query over every target modality, merged as ``merge`` says.

    Exactly what the service answers: ``IndexSearcher.search`` with all targets, the merge
    mode and the query's modality (whose calibration applies; docs/ranking.md).
    """
    check_merge(merge)
    return searcher.search(vectors, k, merge=merge, query_modalities=query_modality)


@dataclass(frozen=True)
class _Items:
    """The labelled rows of one query or target set: ids (-1: a caption), vectors, labels."""

    ids: np.ndarray
    vectors: np.ndarray
    labels: LabelSet


def run_eval(
    manifest: str | Path,
    ref: ModelRef | None = None,
    index: str | Path | None = None,
    options: EvalOptions | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every figure of ``bindsearch eval`` as one JSON-ready dict (docs/evaluation.md).

    Args:
        ref: the model (default: ``encoders.resolve_model()``, the default model).
        index: an index of the manifest's files built with ``ref``; default: build one into
            ``<cache>/eval/`` (resumable, reused by the next run on the same manifest and model).
    """
    from encoders import load_encoder, resolve_model
    from encoders.weights import cache_root
    from index.corpus import is_manifest, read_manifest_file, recorded_path
    from index.pipeline import BuildOptions, ModelSource, build_index
    from index.search import open_index

    opts = options or EvalOptions()
    opts.check()
    path = Path(manifest)
    if not path.is_file() or not is_manifest(path):
        raise ValueError(
            f"{path} is not a manifest: a .jsonl file, or a .csv with a 'path' column "
            "(docs/corpus.md), whose tags carry the labels as key:value"
        )
    entries = [e for e in read_manifest_file(path, opts.allow_outside) if e.error is None]
    rows = {e.key: e for e in entries}
    if not any(":" in t for e in entries for t in e.tags):
        raise ValueError(
            f"no row of {path} has a label: give each row tags of the form key:value "
            '(e.g. "tags": ["class:dog"])'
        )
    ref = ref if ref is not None else resolve_model()
    source = ModelSource.from_ref(ref, device)
    progress = sys.stderr.isatty() if opts.progress is None else opts.progress
    if index is None:
        digest = hashlib.sha256(
            f"{path.resolve()}\n{source.identity}\n{opts.soundtrack}\n{opts.allow_outside}".encode()
        ).hexdigest()[:16]
        out = cache_root(cache_dir) / "eval" / digest
        build = BuildOptions(
            workers=0,
            soundtrack=opts.soundtrack,
            allow_outside=opts.allow_outside,
            progress=progress,
        )
        build_index(path, out, source, build, log=log)
    else:
        out = Path(index)
    # Random weights depend on which towers are built (one RNG stream): all of them then.
    towers = None if ref.weights is None else [Modality.TEXT]
    text_encoder = load_encoder(ref, ref.config, device, modalities=towers, seed=ref.seed)

    def embed_text(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(text_encoder.embed_items(Modality.TEXT, list(texts), batch_size=64))

    with open_index(out, text_encoder, checkpoint=source.identity, gpu=False) as searcher:
        items, tags = _index_items(out, rows, recorded_path)
        targets = [m for m in Modality if m in items]
        if not targets:
            raise ValueError(f"the index at {out} holds none of the manifest's files")
        queries = {m: items[m] for m in targets}
        if Modality.TEXT not in items:  # the captions, embedded, ask as text
            captions = sorted({(e.caption, tuple(sorted(e.tags))) for e in entries if e.caption})
            if captions:
                vecs = embed_text([c for c, _ in captions])
                queries[Modality.TEXT] = (np.full(len(captions), -1), vecs)
                tags[Modality.TEXT] = [list(t) for _, t in captions]
        sets = _label_sets(queries, tags)
        keys = _keys(sets, opts.label_key)
        rng = np.random.default_rng(opts.seed)
        picked = {m: _sample(s, opts.max_queries, rng) for m, s in sets.items()}
        steps = len(picked) * (len(targets) + 1) + 1
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="eval", unit="step", disable=not progress, file=sys.stderr)
        pairs = []
        for qm, q in picked.items():
            for tm in targets:
                t = sets[tm]
                exclude = _positions(q.ids, t.ids) if qm == tm else None
                got = retrieval_metrics(
                    q.vectors, t.vectors, q.labels, t.labels, opts.k, keys, exclude
                )
                pairs.append({"query": qm.value, "target": tm.value, **got.to_dict()})
                bar.update(1)
        values = sets[targets[0]].labels.values
        classifiers = prompt_classifiers(embed_text, opts.prompts, values, keys)
        bar.update(1)
        zero_shot: dict[str, dict[str, Any]] = {}
        for m in targets:
            if m is Modality.TEXT:
                continue
            s = sets[m]
            zero_shot[m.value] = {
                key: {
                    **zero_shot_accuracy(s.vectors, clf, s.labels.member[key]).to_dict(),
                    "classes": len(clf),
                    "chance": 1.0 / len(clf),
                }
                for key, clf in classifiers.items()
                if len(clf) > 1
            }
        any_to_any = {
            qm.value: _any_to_any(searcher, qm, q, sets, targets, keys, opts, opts.merge, bar)
            for qm, q in picked.items()
        }
        # The issue-18 figures need the raw merge beside the chosen one (one more pass).
        raw = any_to_any
        if opts.merge != "raw":
            raw = {
                qm.value: _any_to_any(searcher, qm, q, sets, targets, keys, opts, "raw", None)
                for qm, q in picked.items()
            }
        templated = None
        if opts.query_template is not None:
            templated = _templated(searcher, embed_text, opts, keys, targets)
        bar.close()
    return {
        "manifest": str(path),
        "index": str(out),
        "model": {"name": ref.name, "identity": source.identity},
        "items": {m.value: len(s.ids) for m, s in sets.items()},
        "labels": {k: list(v) for k, v in values.items()},
        "relevance": (
            f"binary on {opts.label_key}"
            if opts.label_key
            else f"graded: shared values of {', '.join(keys)}"
        ),
        "k": list(opts.k),
        "prompts": list(opts.prompts),
        "pairs": pairs,
        "zero_shot": zero_shot,
        "any_to_any": {
            "merge": opts.merge,
            "k": max(opts.k),
            "by_query": any_to_any,
            "against": _against(any_to_any, raw, pairs),
        },
        "template_queries": templated,
    }


def _templated(
    searcher: IndexSearcher,
    embed_text: Callable[[Sequence[str]], np.ndarray],
    opts: EvalOptions,
    keys: list[str],
    targets: list[Modality],
) -> dict[str, Any]:
    """docs/ranking.md's figures for text queries made from ``opts.query_template``: one per
    combination of its keys present among the items of the first target modality that has
    them (vision first), all targets, merged by ``opts.merge`` (``index.ranking_eval``)."""
    from index.ranking_eval import ranking_figures, text_queries

    assert opts.query_template is not None
    wanted = template_keys(opts.query_template)
    unknown = [w for w in wanted if w not in keys]
    if unknown:
        raise ValueError(
            f"--query-template names {', '.join(unknown)}, no label key of the manifest "
            f"({', '.join(keys)})"
        )
    k = max(opts.k)
    for source in [m for m in targets if m is not Modality.TEXT]:
        queries = text_queries(searcher, embed_text, opts.query_template, wanted, source.value)
        if queries:
            got = ranking_figures(searcher, queries, opts.merge, k)
            return {"template": opts.query_template, "source": source.value, **got.to_dict()}
    raise ValueError(
        f"--query-template: no item carries all of {', '.join(wanted)} to make a query from"
    )


def _against(
    merged: dict[str, Any], raw: dict[str, Any], pairs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per query modality, the merge against its references (issue 18's three figures):
    recall@1 over the best single target modality's recall@1 (searched alone), the mean
    number of modalities in the top k, and matched labels over the raw merge's."""
    out: dict[str, Any] = {}
    for qm, v in merged.items():
        single = {
            p["target"]: p["recall@1"]["value"]
            for p in pairs
            if p["query"] == qm and p.get("recall@1", {}).get("value") is not None
        }
        best = max(single, key=lambda t: (single[t], t)) if single else None
        top1 = (v.get("recall@1") or {}).get("value")
        matched = v["matched_labels_in_top_k"]["value"]
        raw_matched = raw[qm]["matched_labels_in_top_k"]["value"]
        out[qm] = {
            "best_single": best,
            "best_single_recall@1": single.get(best) if best else None,
            "top1_vs_best_single": _ratio(top1, single.get(best) if best else None),
            "modalities_in_top_k": v["modalities_in_top_k"]["value"],
            "matched_vs_raw": _ratio(matched, raw_matched),
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _index_items(
    root: Path, rows: dict[str, Any], recorded_path: Callable[[str], str]
) -> tuple[dict[Modality, tuple[np.ndarray, np.ndarray]], dict[Modality, list[list[str]]]]:
    """Per modality, the (ids, vectors) of the index's items that are manifest rows, and their
    labels (the tags of the row the item came from; a soundtrack: its video's row)."""
    from index.store import IndexStore

    items: dict[Modality, tuple[np.ndarray, np.ndarray]] = {}
    tags: dict[Modality, list[list[str]]] = {}
    with IndexStore.open_readonly(root) as store:
        for name in store.modalities():
            ids = store.live_ids(name)
            meta = store.item_metadata(ids.tolist(), ["path"])
            keep = [i for i, d in enumerate(meta) if d and recorded_path(d["path"]) in rows]
            if not keep:
                continue
            m = Modality.parse(name)
            chosen = ids[keep]
            items[m] = (chosen, store.gather(chosen))
            tags[m] = [list(rows[recorded_path(meta[i]["path"])].tags) for i in keep]
    return items, tags


def _label_sets(
    queries: dict[Modality, tuple[np.ndarray, np.ndarray]], tags: dict[Modality, list[list[str]]]
) -> dict[Modality, _Items]:
    """One ``LabelSet`` over every row (one set of values per key), split by modality."""
    order = list(queries)
    everything = LabelSet.from_tags([t for m in order for t in tags[m]])
    out, start = {}, 0
    for m in order:
        ids, vecs = queries[m]
        n = len(ids)
        out[m] = _Items(ids, vecs, everything.take(np.arange(start, start + n)))
        start += n
    return out


def _keys(sets: dict[Modality, _Items], label_key: str | None) -> list[str]:
    keys = list(next(iter(sets.values())).labels.keys)
    if label_key is None:
        return keys
    if label_key not in keys:
        raise ValueError(
            f"--label-key {label_key!r} is no label of the manifest; label keys: {', '.join(keys)}"
        )
    return [label_key]


def _sample(items: _Items, limit: int, rng: np.random.Generator) -> _Items:
    if len(items.ids) <= limit:
        return items
    rows = np.sort(rng.choice(len(items.ids), limit, replace=False))
    return _Items(items.ids[rows], items.vectors[rows], items.labels.take(rows))


def _positions(ids: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Row of each id in ``gallery`` (-1: not there; captions have id -1 and match nothing)."""
    where = {int(i): r for r, i in enumerate(gallery.tolist()) if i >= 0}
    return np.array([where.get(int(i), -1) if i >= 0 else -1 for i in ids], dtype=np.int64)


def _any_to_any(
    searcher: IndexSearcher,
    qm: Modality,
    q: _Items,
    sets: dict[Modality, _Items],
    targets: list[Modality],
    keys: list[str],
    opts: EvalOptions,
    merge: str,
    bar: Any,
) -> dict[str, Any]:
    """One query set searched over every target modality at once, merged by ``merge``."""
    k = max(opts.k)
    ks = tuple(sorted({1, *opts.k}))  # recall@1: the first result matches fully
    gallery_ids = np.concatenate([sets[m].ids for m in targets])
    gallery_mod = np.concatenate([np.full(len(sets[m].ids), i) for i, m in enumerate(targets)])
    member = {key: np.concatenate([sets[m].labels.member[key] for m in targets]) for key in keys}
    gallery = LabelSet(sets[targets[0]].labels.values, member)
    row_of = {int(i): r for r, i in enumerate(gallery_ids.tolist())}
    exclude = _positions(q.ids, gallery_ids)
    parts, per_query = [], []
    for s in range(0, len(q.ids), SEARCH_BATCH):
        rows = np.arange(s, min(s + SEARCH_BATCH, len(q.ids)))
        found = merged_search(searcher, q.vectors[rows], k + 1, merge, qm.value)
        ranked = np.full((len(rows), k), -1, dtype=np.int64)
        for r, hits in enumerate(found):
            own = int(q.ids[rows[r]])
            # The query item itself is no answer; an item the manifest does not label holds
            # its place in the list (-2) and matches nothing.
            got = [row_of.get(h.item.id, -2) for h in hits if own < 0 or h.item.id != own][:k]
            ranked[r, : len(got)] = got
        rel, full, shared = relevance(q.labels.take(rows), gallery, keys)
        ex = exclude[rows]
        own_rows = np.nonzero(ex >= 0)[0]
        for a in (rel, full, *shared.values()):
            a[own_rows, ex[own_rows]] = 0
        labelled = np.where(ranked >= 0, ranked, -1)
        parts.append(score_rankings(labelled, rel, full, shared, ks))
        for r in range(len(rows)):
            got_rows = ranked[r][ranked[r] >= 0]
            placed = max(int((ranked[r] != -1).sum()), 1)
            per_query.append(
                (len(set(gallery_mod[got_rows].tolist())), float(rel[r, got_rows].sum()) / placed)
            )
    if bar is not None:
        bar.update(1)
    arr = np.array(per_query, dtype=np.float64).reshape(-1, 2)
    return {
        **summarise(parts, ks, len(q.ids)).to_dict(),
        "modalities_in_top_k": mean_estimate(arr[:, 0]).to_dict(),
        "matched_labels_in_top_k": mean_estimate(arr[:, 1]).to_dict(),
    }
