"""``create_app``: the FastAPI application, its lifespan, error mapping and middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from encoders import InvalidInput
from generate import ImageGenerator

from .batcher import Batcher, BatchSettings
from .deps import AppState
from .embedders import Embedder
from .errors import (
    ClientGone,
    InvalidContent,
    MalformedRequest,
    ServiceError,
    status_of,
)
from .generators import GeneratorSlot
from .limits import ByteBudget, RequestLimits
from .metrics import Metrics, MetricsMiddleware
from .pipeline import Pipeline
from .routes import embed, generate, items, ops, search
from .schemas import EmbedRequest, GenerateRequest, OpenAIEmbeddingsRequest, SearchRequest
from .searchers import IndexSnapshots, Searcher, searcher_has_model
from .security import SecurityHeaders
from .settings import ServiceSettings

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: "malformed_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media",
}


def create_app(
    settings: ServiceSettings,
    embedder: Embedder | Callable[[], Embedder],
    searcher: Searcher | None = None,
    generator: ImageGenerator | None = None,
) -> FastAPI:
    """The service. ``embedder`` is an Embedder, or a function that loads one in the lifespan.

    Without a ``searcher`` the service embeds but does not search (503 ``no_index``). Without
    a ``generator`` one is loaded per ``settings.generator`` (see ``service.generators``).
    """
    metrics = Metrics()
    state = AppState(settings=settings, metrics=metrics, searcher=searcher)
    slot = GeneratorSlot(settings)
    state.extra["generator"] = slot

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        emb = embedder if isinstance(embedder, Embedder) else await asyncio.to_thread(embedder)
        info = emb.info
        if isinstance(searcher, IndexSnapshots):
            searcher.expected_dim = info.dim  # a first index built later must match too
        if searcher is not None and searcher.dim != info.dim and searcher_has_model(searcher):
            raise ValueError(
                f"the index holds {searcher.dim}-d vectors but the model makes {info.dim}-d "
                "ones: serve the index with the model that built it"
            )
        decode_pool = ThreadPoolExecutor(settings.decode_workers, "bindsearch-decode")
        batcher = Batcher(
            emb,
            BatchSettings(
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue,
                retry_after_s=settings.retry_after_s,
            ),
            metrics,
        )
        state.pipeline = Pipeline(emb, batcher, settings, decode_pool)
        state.model = info
        state.not_ready_reason = "the model is warming up"
        warm = asyncio.create_task(_warm_up(state, emb, batcher))
        follow = asyncio.create_task(_follow_index(searcher, settings.index_poll_seconds))
        gen_load = asyncio.create_task(slot.start(generator, info))  # search does not wait
        try:
            yield
        finally:
            state.ready = False
            state.not_ready_reason = "shutting down"
            warm.cancel()
            follow.cancel()
            gen_load.cancel()
            slot.close()
            await batcher.close()
            decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="bindsearch",
        summary="Any-to-any search in one ImageBind embedding space.",
        version="0.1.0",
        lifespan=lifespan,
        # Starlette's trailing-slash redirect writes the request's Host header into Location
        # (an open redirect for anyone who can set Host): a route is its one path, else 404.
        redirect_slashes=False,
        # /docs and /redoc are served from installed files (_mount_docs), never from a CDN:
        # they work offline and run no third-party script.
        docs_url=None,
        redoc_url=None,
    )
    app.state.bindsearch = state
    routers = (ops.router, ops.info_router, search.router, embed.router, items.router)
    for router in (*routers, generate.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=ops.WEB_DIR), name="static")  # the web page
    _mount_docs(app)
    _register_errors(app)
    # Added last = outermost: metrics see every answer, including the request limits' refusals.
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_request_bytes,
        max_headers=settings.max_headers,
        budget=ByteBudget(settings.max_inflight_bytes, metrics.inflight_bytes),
        retry_after_s=settings.retry_after_s,
        respond=error_response,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(SecurityHeaders)  # on every answer, the limits' and CORS's too
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _warm_up(state: AppState, emb: Embedder, batcher: Batcher) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(batcher.model_thread, emb.warmup)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("warm-up failed")
        state.not_ready_reason = f"warm-up failed ({type(e).__name__}: {e})"
        return
    state.ready = True
    log.info("ready: %s, %d-d", emb.info.name, emb.info.dim)


# How often a service told not to follow its index (poll 0) still looks for a first one.
FIRST_INDEX_POLL_S = 2.0


async def _follow_index(searcher: Searcher | None, every_s: float) -> None:
    """Swap in the index's new snapshot after each committed change (``IndexSnapshots``).

    ``every_s`` 0 follows no change, but a service still waiting for its first index looks
    for it every ``FIRST_INDEX_POLL_S`` until it is there: it could never be ready otherwise.
    """
    if not isinstance(searcher, IndexSnapshots):
        return
    while every_s > 0 or searcher.missing is not None:
        await asyncio.sleep(every_s if every_s > 0 else FIRST_INDEX_POLL_S)
        try:
            await asyncio.to_thread(searcher.refresh)
        except asyncio.CancelledError:
            raise
        except Exception:  # refresh keeps the last good snapshot; never end the loop
            log.exception("refreshing the index snapshot failed")


def error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": err.type, "message": err.message}},
        status_code=status_of(err),
        headers=err.headers(),
    )


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` and ReDoc at ``/redoc`` from the ``fastapi-offline`` files."""
    from importlib.resources import files

    from fastapi.openapi.docs import (
        get_redoc_html,
        get_swagger_ui_html,
        get_swagger_ui_oauth2_redirect_html,
    )

    assets = "/docs/assets"
    app.mount(assets, StaticFiles(directory=str(files("fastapi_offline") / "static")), "docs")
    spec = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=spec,
            title=f"{app.title} - API",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=spec,
            title=f"{app.title} - API",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )


def _register_errors(app: FastAPI) -> None:
    """The one mapping from exceptions to responses (``service.errors`` has the table)."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc)

    async def on_invalid_input(request: Request, exc: Exception) -> JSONResponse:
        return error_response(InvalidContent(str(exc)))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return error_response(MalformedRequest("; ".join(parts) or "malformed request"))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, ServiceError):  # e.g. the body limit, inside a body read
            return error_response(exc.__cause__)
        kind = _HTTP_TYPES.get(exc.status_code, "error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse(
            {"error": {"type": kind, "message": message}},
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    async def on_disconnect(request: Request, exc: Exception) -> JSONResponse:
        # Not an error of the server's: one line, and a 499 that only /metrics will see.
        log.info("client went away during %s %s", request.method, request.url.path)
        return error_response(ClientGone("the client disconnected before its request was read"))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"error": {"type": "internal", "message": "internal error; it has been logged"}},
            status_code=500,
        )

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(InvalidInput, on_invalid_input)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(Exception, on_unexpected)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the JSON bodies of the routes that also take multipart."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (SearchRequest, EmbedRequest, GenerateRequest, OpenAIEmbeddingsRequest):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in js.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = js
    app.openapi_schema = schema
    return schema
