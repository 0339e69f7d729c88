"""``POST /v1/embed`` (files or text) and the OpenAI-compatible ``POST /v1/embeddings``."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Request

from ..deps import ModelDep, PipelineDep, SettingsDep, require_api_key
from ..errors import MalformedRequest
from ..pipeline import BlobInput, Input, TextInput, decode_base64, parse_data_uri, parse_modality
from ..schemas import (
    MODALITY_HELP,
    EmbeddingOut,
    EmbedRequest,
    EmbedResponse,
    OpenAIEmbedding,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    OpenAIUsage,
)
from . import body_ref, error_responses
from ._body import content_kind, read_form, read_json, require_json, split_list

router = APIRouter(prefix="/v1", tags=["embed"], dependencies=[Depends(require_api_key)])

_MULTIPART = {
    "type": "object",
    "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "modality": {
            "type": "array",
            "items": {"type": "string"},
            "description": "One for all files or one per file: " + MODALITY_HELP,
        },
        "text": {"type": "array", "items": {"type": "string"}, "description": "Texts."},
    },
}


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    openapi_extra=body_ref("EmbedRequest", _MULTIPART),
)
async def embed(
    request: Request, pipeline: PipelineDep, model: ModelDep, settings: SettingsDep
) -> EmbedResponse:
    """L2-normalised vectors of files (multipart) or texts / base64 data (JSON), in order."""
    inputs: list[Input] = []
    if content_kind(request) == "json":
        body = await read_json(request, EmbedRequest, settings)
        if body.text is not None:
            texts = [body.text] if isinstance(body.text, str) else body.text
            inputs = [TextInput(t, f"text[{i}]") for i, t in enumerate(texts)]
        for i, inp in enumerate(body.inputs or []):
            name = f"inputs[{i}]"
            if inp.text is not None:
                inputs.append(TextInput(inp.text, name))
            else:
                m = parse_modality(inp.modality, f"{name}.modality")
                data = decode_base64(inp.data or "", name)
                inputs.append(BlobInput(data, m, name, inp.filename))
    else:
        files, fields = await read_form(request, settings)
        unknown = set(fields) - {"modality", "text"}
        if unknown:
            raise MalformedRequest(
                f"unknown form field(s) {sorted(unknown)}; accepted: file, modality, text"
            )
        mods = split_list(fields.get("modality", []))
        if len(mods) not in (0, 1, len(files)):
            raise MalformedRequest(
                f"{len(mods)} modality values for {len(files)} files: give 1 or {len(files)}"
            )
        for i, f in enumerate(files):
            m = parse_modality(mods[0] if len(mods) == 1 else (mods[i] if mods else None))
            inputs.append(BlobInput(f.data, m, f"file {f.name!r}", f.name))
        inputs += [TextInput(t, f"text[{i}]") for i, t in enumerate(fields.get("text", []))]
    if not inputs:
        raise MalformedRequest("nothing to embed: send files, `text`, or `inputs`")
    got = await pipeline.embed_all(inputs)
    return EmbedResponse(
        model=model.name,
        dim=model.dim,
        data=[
            EmbeddingOut(
                index=i,
                modality=m.value,
                embedding=v.tolist(),
                tokens=None if t is None else t.tokens,
                truncated=None if t is None else t.truncated,
            )
            for i, (v, m, t) in enumerate(zip(got.vectors, got.modalities, got.texts, strict=True))
        ],
    )


@router.post(
    "/embeddings",
    response_model=OpenAIEmbeddingsResponse,
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    openapi_extra=body_ref("OpenAIEmbeddingsRequest", None),
)
async def embeddings(
    request: Request, pipeline: PipelineDep, model: ModelDep, settings: SettingsDep
) -> OpenAIEmbeddingsResponse:
    """OpenAI-compatible embeddings: ``input`` strings are texts, data URIs are files.

    Works with the official ``openai`` client (``base_url=http://host:port/v1``). ``model``
    may be any name; ``usage`` counts the text tokens the model read (files count 0); a text
    longer than the model reads is cut, and its ``truncated`` says so.
    """
    require_json(request)
    body = await read_json(request, OpenAIEmbeddingsRequest, settings)
    raw = body.input
    items = [raw] if isinstance(raw, str) else list(raw)
    if not items:
        raise MalformedRequest("input is empty: give a string or a list of strings")
    if not all(isinstance(x, str) for x in items):
        raise MalformedRequest(
            "token arrays are not supported: send `input` as a string or a list of strings"
        )
    if body.dimensions is not None and body.dimensions != model.dim:
        raise MalformedRequest(
            f"dimensions={body.dimensions}: this model's vectors have {model.dim} dimensions"
        )
    inputs: list[Input] = []
    for i, s in enumerate(items):
        name = f"input[{i}]"
        assert isinstance(s, str)
        blob: BlobInput | None = parse_data_uri(s, name)
        inputs.append(blob if blob is not None else TextInput(s, name))
    got = await pipeline.embed_all(inputs)
    data = [
        OpenAIEmbedding(
            index=i,
            embedding=_encode(v, body.encoding_format),
            truncated=None if t is None else t.truncated,
        )
        for i, (v, t) in enumerate(zip(got.vectors, got.texts, strict=True))
    ]
    read = sum(t.read for t in got.texts if t is not None)
    return OpenAIEmbeddingsResponse(
        data=data, model=model.name, usage=OpenAIUsage(prompt_tokens=read, total_tokens=read)
    )


def _encode(v: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii")
    return [float(x) for x in v]
