"""Operations: liveness, readiness, metrics, the root (web page or pointer), and /v1/info."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import AppState, ModelDep, StateDep, require_api_key
from ..generators import GeneratorSlot
from ..ray_serve import ShardedSearcher
from ..schemas import GeneratorOut, IndexOut, InfoResponse, ModelOut, Status
from ..searchers import IndexSnapshots, calibration_note
from . import error_responses

# The web page: plain files, no build step; ``create_app`` mounts this directory at /static.
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
# Only this server: the page loads nothing from elsewhere, and previews are object URLs.
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(tags=["operations"])


@router.get(
    "/",
    response_model=None,
    responses={
        200: {
            "description": "The web page for a browser (Accept: text/html), else a pointer.",
            "content": {
                "text/html": {"schema": {"type": "string"}},
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": {"type": "string"}}
                },
            },
        }
    },
)
async def root(request: Request) -> Response:
    """The search page for browsers; for API clients, where to look (docs, OpenAPI schema)."""
    if "text/html" in request.headers.get("accept", ""):
        html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
        headers = {"Content-Security-Policy": _PAGE_CSP, "Vary": "Accept"}
        return HTMLResponse(html, headers=headers)
    pointer = {"name": "bindsearch", "docs": "/docs", "openapi": "/openapi.json", "web": "/"}
    return JSONResponse(pointer, headers={"Vary": "Accept"})


@router.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": Status}})
async def readyz(state: StateDep) -> Response:
    """Readiness: 200 once the model is loaded and warmed up, 503 until then."""
    # An index folder that holds no index yet is 503 too, with why (``IndexSnapshots.missing``).
    # While the index on disk cannot be served (removed, being rebuilt, damaged), the last
    # good snapshot is, and the detail says so.
    snapshots = state.searcher if isinstance(state.searcher, IndexSnapshots) else None
    reason = state.not_ready_reason
    # ``serve --engine ray``: not ready while a shard or encoder replica is down (restarting).
    replicas = state.searcher if isinstance(state.searcher, ShardedSearcher) else None
    down = None if replicas is None else await run_in_threadpool(replicas.unready_reason)
    if state.ready and snapshots is not None and snapshots.missing is not None:
        reason = snapshots.missing  # no index yet: searches would answer 503 with this
    elif state.ready and down is not None:
        reason = down
    elif state.ready:
        stale = None if snapshots is None else snapshots.stale
        return JSONResponse(Status(status="ready", detail=stale).model_dump())
    body = Status(status="not_ready", detail=reason)
    return JSONResponse(body.model_dump(), status_code=503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics (unauthenticated, like /healthz: scrape it from inside)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


info_router = APIRouter(prefix="/v1", tags=["operations"], dependencies=[Depends(require_api_key)])


@info_router.get("/info", response_model=InfoResponse, responses=error_responses(401, 503))
async def info(state: StateDep, model: ModelDep) -> InfoResponse:
    """The model (with the licence of its weights), the indexes with counts and recipes."""
    s = state.settings
    indexes = [] if state.searcher is None else state.searcher.info()
    return InfoResponse(
        model=ModelOut(
            name=model.name,
            sha256=model.sha256,
            licence=model.licence,
            licence_url=model.licence_url,
            dim=model.dim,
            modalities=[m.value for m in model.modalities],
            device=model.device,
            dtype=model.dtype,
        ),
        indexes=[
            IndexOut(name=i.name, modality=i.modality.value, count=i.count, recipe=i.recipe)
            for i in indexes
        ],
        calibration_note=None if state.searcher is None else calibration_note(state.searcher),
        limits={
            "max_k": s.max_k,
            "max_inputs": s.max_inputs,
            "max_upload_bytes": s.max_upload_bytes,
            "max_request_bytes": s.max_request_bytes,
            "max_pixels": s.max_pixels,
            "max_audio_seconds": s.max_audio_seconds,
            "max_text_chars": s.max_text_chars,
            "max_generate_steps": s.max_generate_steps,
            # A longer text is cut to its first this many tokens (absent: read whole).
            **({} if model.max_text_tokens is None else {"max_text_tokens": model.max_text_tokens}),
        },
        generator=_generator_out(state),
    )


def _generator_out(state: AppState) -> GeneratorOut | None:
    slot = state.extra.get("generator")
    gen = slot.generator if isinstance(slot, GeneratorSlot) else None
    if gen is None:
        return None
    g = gen.info
    return GeneratorOut(
        name=g.name,
        licence=g.licence,
        model_sha256=g.model_sha256,
        dim=g.dim,
        image_size=g.image_size,
        default_steps=g.default_steps,
    )
