"""The HTTP routers; ``service.app.create_app`` mounts them."""

from __future__ import annotations

from typing import Any

from ..schemas import ErrorBody

_DESCRIPTIONS = {
    400: "Malformed request (bad JSON, a field of the wrong type, base64 that is not).",
    401: "API key missing or wrong.",
    404: "Unknown item, or no media file for it.",
    410: "The item's media file changed since it was indexed (re-index it).",
    413: "Over a cap: request bytes, upload bytes, pixels, audio duration, text, inputs.",
    415: "Unsupported media: modality not recognised from content, or not in this model.",
    422: "Well-formed, but the content cannot be used (undecodable file, empty text...).",
    429: "Overloaded: the queue is full. Retry after the Retry-After header's seconds.",
    503: "Not ready (model loading or warming up), no index loaded, or the model failed.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route can answer, all with ErrorBody."""
    out: dict[int | str, dict[str, Any]] = {}
    for c in codes:
        out[c] = {"model": ErrorBody, "description": _DESCRIPTIONS[c]}
        if c == 429:
            out[c]["headers"] = {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
            }
    return out


def body_ref(json_model: str, multipart: dict[str, Any] | None) -> dict[str, Any]:
    """An ``openapi_extra`` request body: a JSON model and, optionally, a multipart form."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model}"}}
    }
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    return {"requestBody": {"required": True, "content": content}}
