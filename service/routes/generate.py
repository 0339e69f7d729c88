"""``POST /v1/generate``: an image from any query ``/v1/search`` takes, as PNG.

The query is read and embedded exactly as a search's (text, item id, base64 data, weighted
terms, multipart files with weights), mixed the same way (normalise, weight, sum, normalise),
and the unit vector goes to the app's ``ImageGenerator`` on its own thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from ..deps import PipelineDep, SettingsDep, StateDep, require_api_key
from ..errors import MalformedRequest, NoIndex
from ..generators import GeneratorSlot, NoGenerator
from ..pipeline import Pipeline, mix
from ..schemas import GenerateForm, GenerateRequest
from ..searchers import Searcher
from . import body_ref, error_responses
from ._body import content_kind, read_form, read_json, validation_message
from .search import MIX_FILES, Term, form_query, from_json, term_vectors

router = APIRouter(prefix="/v1", tags=["generate"], dependencies=[Depends(require_api_key)])

_GENERATE_MULTIPART = {
    "type": "object",
    "properties": {
        **MIX_FILES,
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
        "steps": {"type": "integer", "minimum": 1},
    },
}
_SEARCH_ONLY = ("k", "target", "tags", "tag")
_PNG: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The generated image.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            "X-Generator": {"description": "The generator's name.", "schema": {"type": "string"}},
            "X-Seed": {"description": "The seed used.", "schema": {"type": "integer"}},
            "X-Text-Truncated": {
                "description": "Only when a text term was longer than the model reads (it "
                "read the first tokens, CLIP-style): `<term index>:<tokens>` for each such "
                "term, comma-separated.",
                "schema": {"type": "string"},
            },
        },
    }
}


def get_slot(state: StateDep) -> GeneratorSlot:
    slot = state.extra.get("generator")
    if not isinstance(slot, GeneratorSlot):  # an app built without generation
        raise NoGenerator("image generation is not set up on this server")
    return slot


@router.post(
    "/generate",
    response_class=Response,
    responses={**_PNG, **error_responses(400, 401, 404, 413, 415, 422, 429, 503)},
    openapi_extra=body_ref("GenerateRequest", _GENERATE_MULTIPART),
)
async def generate(
    request: Request, state: StateDep, pipeline: PipelineDep, settings: SettingsDep
) -> Response:
    """An image from a query: JSON (text, item_id, data or terms) or multipart files.

    The query is embedded and mixed as in ``/v1/search``; ``seed`` (default 0) makes the
    image reproducible, ``steps`` overrides the generator's default (capped). 503 when the
    server has no generator.
    """
    slot = get_slot(state)
    slot.require()  # 503 before any work when there is no generator
    if content_kind(request) == "json":
        body = await read_json(request, GenerateRequest, settings)
        terms = from_json(body.as_search()).terms
        seed, steps = body.seed, body.steps
    else:
        files, fields = await read_form(request, settings)
        extra = [k for k in _SEARCH_ONLY if k in fields]
        if extra:
            raise MalformedRequest(
                f"{', '.join(extra)}: search options; generate takes file, modality, weights, "
                "seed and steps"
            )
        try:
            opts = GenerateForm.model_validate(
                {k: fields.pop(k)[-1] for k in ("seed", "steps") if k in fields}
            )
        except ValidationError as e:
            raise MalformedRequest(validation_message(e, "form")) from None
        terms = form_query(files, fields).terms
        seed, steps = opts.seed, opts.steps
    if steps is not None and steps > settings.max_generate_steps:
        raise MalformedRequest(f"steps: {steps} is over the limit of {settings.max_generate_steps}")
    vectors = await _vectors(terms, pipeline, state.searcher)
    query = mix(vectors, [t.weight for t in terms])
    png = await slot.render(query, seed, steps)
    gen = slot.require()
    headers = {"X-Generator": gen.info.name, "X-Seed": str(seed)}
    cut = [f"{i}:{t.echo.tokens}" for i, t in enumerate(terms) if t.echo.truncated]
    if cut:
        headers["X-Text-Truncated"] = ",".join(cut)
    return Response(png, media_type="image/png", headers=headers)


async def _vectors(terms: list[Term], pipeline: Pipeline, searcher: Searcher | None) -> np.ndarray:
    """The terms' (T, D) vectors: as a search resolves them; item ids need an index."""
    if searcher is not None:
        return await term_vectors(terms, pipeline, searcher)
    if any(t.item_id is not None for t in terms):
        raise NoIndex("no index is loaded, so item_id terms cannot be resolved: send text or files")
    got = await pipeline.embed_all([t.input for t in terms if t.input is not None])
    for t, text in zip(terms, got.texts, strict=True):
        if text is not None:
            t.echo.tokens, t.echo.truncated = text.tokens, text.truncated
    return got.vectors
