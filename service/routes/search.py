"""``POST /v1/search``: by upload (multipart), text, item id, base64 data, or a weighted mix."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..deps import PipelineDep, SearcherDep, SettingsDep, require_api_key
from ..errors import InvalidContent, MalformedRequest, NotFound
from ..pipeline import BlobInput, Input, Pipeline, TextInput, decode_base64, mix, parse_modality
from ..schemas import (
    MERGE_HELP,
    MODALITY_HELP,
    Merge,
    QueryEcho,
    ResultOut,
    SearchForm,
    SearchRequest,
    SearchResponse,
    TermEcho,
)
from ..searchers import Item, Searcher, calibration_note, searcher_has_model
from ..settings import ServiceSettings
from . import body_ref, error_responses
from ._body import (
    FilePart,
    content_kind,
    read_form,
    read_json,
    split_list,
    validation_message,
)
from .items import item_out

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_api_key)])

# The multipart fields of a mix of files (search and generate share them).
MIX_FILES: dict[str, Any] = {
    "file": {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": "One or more files; several make a weighted mix.",
    },
    "modality": {
        "type": "array",
        "items": {"type": "string"},
        "description": "One for all files or one per file: " + MODALITY_HELP,
    },
    "item_id": {
        "type": "array",
        "items": {"type": "integer"},
        "description": "Stored items as terms, alone or beside files (repeat, or comma-separated).",
    },
    "weights": {
        "type": "array",
        "items": {"type": "number"},
        "description": "One per term (default 1.0 each): the files in order, then the item ids.",
    },
}

_MULTIPART = {
    "type": "object",
    "properties": {
        **MIX_FILES,
        "k": {"type": "integer", "minimum": 1, "description": "Results wanted (default 10)."},
        "target": {"type": "array", "items": {"type": "string"}},
        "tags": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Only items carrying every one of these (repeat, or comma-separated).",
        },
        "tag": {"type": "array", "items": {"type": "string"}, "description": "Alias of `tags`."},
        "merge": {
            "type": "string",
            "enum": ["calibrated", "raw", "rrf", "per_modality"],
            "description": MERGE_HELP,
        },
    },
}


@dataclass
class Term:
    """One weighted term of a query: an input to embed, or a stored item's id."""

    weight: float
    echo: TermEcho
    input: Input | None = None
    item_id: int | None = None
    vector: np.ndarray | None = None  # a query embedding given as it is (``vector``)


@dataclass
class Query:
    """A parsed search query: its terms, how many results, target modalities, tag filter."""

    terms: list[Term]
    k: int | None
    target: list[str]
    tags: list[str]
    merge: Merge = "calibrated"


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 503),
    openapi_extra=body_ref("SearchRequest", _MULTIPART),
)
async def search(
    request: Request, pipeline: PipelineDep, searcher: SearcherDep, settings: SettingsDep
) -> SearchResponse:
    """Nearest items to a query: JSON (text, item_id, data or terms) or multipart files/item_id.

    A mix normalises each term, weights it, sums and renormalises; items used as terms are
    left out of the results. ``tags`` (alias ``tag``) keeps items carrying every tag; ``k`` is
    capped. A text longer than the model reads is cut, and its term echo says so.
    """
    t0 = time.perf_counter()
    if content_kind(request) == "json":
        q = from_json(await read_json(request, SearchRequest, settings))
    else:
        q = await _from_form(request, settings)
    k = min(q.k or settings.default_k, settings.max_k)
    targets = [m for t in q.target if (m := parse_modality(t, "target")) is not None] or None
    vectors = await term_vectors(q.terms, pipeline, searcher)
    query = mix(vectors, [t.weight for t in q.terms])
    exclude = {t.item_id for t in q.terms if t.item_id is not None}
    # A bare vector has no modality: every measured query modality, equally weighted,
    # as IndexSearcher.search (and `index query --vector`) does without one.
    modalities = query_modalities(q.terms) or None
    hits = (
        await run_in_threadpool(
            searcher.search, query[None], k + len(exclude), targets, q.tags, q.merge, modalities
        )
    )[0]
    # Up to k results in all; per_modality: up to k of each modality.
    per_modality = q.merge == "per_modality"
    kept: dict[str, int] = {}
    results = []
    for h in hits:
        group = h.item.modality.value if per_modality else ""
        if h.item.id in exclude or kept.get(group, 0) >= k:
            continue
        kept[group] = kept.get(group, 0) + 1
        results.append(
            ResultOut(score=h.score, relevance=h.calibrated, **item_out(h.item).model_dump())
        )
    echo = QueryEcho(
        terms=[t.echo for t in q.terms],
        k=k,
        target=None if targets is None else [m.value for m in targets],
        tags=q.tags,
        merge=q.merge,
    )
    return SearchResponse(
        results=results,
        query=echo,
        took_ms=round((time.perf_counter() - t0) * 1e3, 3),
        # Which of this search's pairs (its term modalities to its targets) are not calibrated.
        calibration_note=calibration_note(searcher, q.merge, modalities, targets),
    )


def from_json(body: SearchRequest) -> Query:
    """A JSON search body (one ``query``, weighted ``terms`` or a ``vector``) -> a query."""
    terms: list[Term] = []
    target = [body.target] if isinstance(body.target, str) else (body.target or [])
    if body.vector is not None:
        echo = TermEcho(kind="vector", weight=1.0, modality="")
        terms.append(Term(1.0, echo, vector=np.asarray(body.vector, dtype=np.float64)))
        return Query(terms, body.k, split_list(target), body.tag_filter, body.merge)
    for i, t in enumerate(body.as_terms()):
        name = f"terms[{i}]" if body.terms is not None else "query"
        if t.text is not None:
            echo = TermEcho(kind="text", weight=t.weight, modality="text", text=t.text)
            terms.append(Term(t.weight, echo, input=TextInput(t.text, name)))
        elif t.item_id is not None:
            echo = TermEcho(kind="item", weight=t.weight, modality="", item_id=t.item_id)
            terms.append(Term(t.weight, echo, item_id=t.item_id))
        else:
            data = decode_base64(t.data or "", name)
            m = parse_modality(t.modality, f"{name}.modality")
            echo = TermEcho(
                kind="data",
                weight=t.weight,
                modality=m.value if m else "",
                filename=t.filename,
                bytes=len(data),
            )
            terms.append(Term(t.weight, echo, input=BlobInput(data, m, name, t.filename)))
    return Query(terms, body.k, split_list(target), body.tag_filter, body.merge)


def query_modalities(terms: list[Term]) -> dict[str, float]:
    """The calibration's view of a query: each term's modality with its absolute weight."""
    out: dict[str, float] = {}
    for t in terms:
        if t.echo.modality:
            out[t.echo.modality] = out.get(t.echo.modality, 0.0) + abs(t.weight)
    return out


async def _from_form(request: Request, settings: ServiceSettings) -> Query:
    files, fields = await read_form(request, settings)
    return form_query(files, fields)


def form_query(files: list[FilePart], fields: dict[str, list[str]]) -> Query:
    """A multipart query from ``read_form``'s files and other fields.

    Its terms are the files, in order, then the ``item_id`` values; ``weights`` gives one per
    term in that order. ``tag`` is an alias of ``tags``.
    """
    if "tag" in fields and "tags" in fields:
        raise MalformedRequest("give `tags` or its alias `tag`, not both")
    try:
        form = SearchForm.model_validate(
            {
                "modality": fields.pop("modality", []),
                "weights": fields.pop("weights", []),
                "k": (fields.pop("k", [None]) or [None])[-1],
                "target": fields.pop("target", []),
                "tags": fields.pop("tags", []) + fields.pop("tag", []),
                "item_id": split_list(fields.pop("item_id", [])),
                **({"merge": fields.pop("merge")[-1]} if fields.get("merge") else {}),
                **fields,
            }
        )
    except ValidationError as e:
        raise MalformedRequest(validation_message(e, "form")) from None
    if not files and not form.item_id:
        raise MalformedRequest(
            "no file and no item_id: send files in the `file` field and/or `item_id` values"
        )
    n = len(files) + len(form.item_id)
    mods = split_list(form.modality)
    if len(mods) not in (0, 1, len(files)):
        raise MalformedRequest(
            f"{len(mods)} modality values for {len(files)} files: give 1 or {len(files)}"
        )
    weights = form.weights
    if len(weights) not in (0, n):
        raise MalformedRequest(
            f"{len(weights)} weights for {n} terms ({len(files)} files, then "
            f"{len(form.item_id)} item ids): give {n}"
        )
    if any(not math.isfinite(w) for w in weights):
        raise MalformedRequest("weights must be finite numbers")
    terms = []
    for i, f in enumerate(files):
        m = parse_modality(mods[0] if len(mods) == 1 else (mods[i] if mods else None))
        w = weights[i] if weights else 1.0
        name = f"file {f.name!r}"
        echo = TermEcho(
            kind="file",
            weight=w,
            modality=m.value if m else "",
            filename=f.name,
            bytes=len(f.data),
        )
        terms.append(Term(w, echo, input=BlobInput(f.data, m, name, f.name)))
    for j, item_id in enumerate(form.item_id, len(files)):
        w = weights[j] if weights else 1.0
        echo = TermEcho(kind="item", weight=w, modality="", item_id=item_id)
        terms.append(Term(w, echo, item_id=item_id))
    return Query(terms, form.k, split_list(form.target), split_list(form.tags), form.merge)


def query_vector(vector: np.ndarray, searcher: Searcher) -> np.ndarray:
    """A ``vector`` query checked against the index: its dimension, finite, not all zeros."""
    if vector.ndim != 1 or len(vector) != searcher.dim:
        raise InvalidContent(
            f"vector has {vector.size} dimensions; the index holds {searcher.dim}-d vectors"
        )
    with np.errstate(over="ignore"):  # a norm past float64's range is refused just below
        norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0:
        raise InvalidContent("vector is all zeros or too large: give a direction to search")
    return (vector / norm).astype(np.float32)  # float64 in: no value overflows a float32 cast


def _stored(searcher: Searcher, ids: list[int]) -> dict[int, tuple[Item | None, np.ndarray | None]]:
    """Items and their stored vectors (SQLite and a memory-mapped chunk: off the event loop)."""
    out: dict[int, tuple[Item | None, np.ndarray | None]] = {}
    for i in ids:
        item = searcher.get_item(i)
        out[i] = (item, None if item is None else searcher.item_vector(i))
    return out


async def term_vectors(terms: list[Term], pipeline: Pipeline, searcher: Searcher) -> np.ndarray:
    """(T, D) vectors of the terms, in order: stored vectors for ids, the model for the rest."""
    pipeline.check_count(len(terms), "terms")
    out: list[np.ndarray | None] = [None] * len(terms)
    for i, t in enumerate(terms):
        if t.vector is not None:
            out[i] = query_vector(t.vector, searcher)
    if any(t.input is not None for t in terms) and not searcher_has_model(searcher):
        raise InvalidContent(
            "the index holds imported vectors without a model: nothing can embed this query "
            "for it; search it with `vector` (or `item_id`)"
        )
    ids = [t.item_id for t in terms if t.item_id is not None]
    if ids:
        stored = await run_in_threadpool(_stored, searcher, ids)  # one thread hop for all
        for i, t in enumerate(terms):
            if t.item_id is None:
                continue
            item, v = stored[t.item_id]
            if item is None or v is None:
                raise NotFound(f"item {t.item_id} is not in the index")
            t.echo.modality = item.modality.value
            out[i] = v
    todo = [i for i, t in enumerate(terms) if t.input is not None]
    if todo:
        inputs = [terms[i].input for i in todo]
        got = await pipeline.embed_all([x for x in inputs if x is not None])
        for i, v, m, text in zip(todo, got.vectors, got.modalities, got.texts, strict=True):
            out[i] = v
            terms[i].echo.modality = m.value
            if text is not None:
                terms[i].echo.tokens = text.tokens
                terms[i].echo.truncated = text.truncated
    return np.stack([v for v in out if v is not None])
