"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from .embedders import ModelInfo
from .errors import NoIndex, NotReady, Unauthorized
from .metrics import Metrics
from .pipeline import Pipeline
from .searchers import Searcher
from .settings import ServiceSettings


@dataclass
class AppState:
    """Everything the routes need, on ``app.state.bindsearch``; filled in by the lifespan."""

    settings: ServiceSettings
    metrics: Metrics
    searcher: Searcher | None
    pipeline: Pipeline | None = None
    model: ModelInfo | None = None
    ready: bool = False
    not_ready_reason: str = "the model is loading"
    extra: dict[str, object] = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.bindsearch
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> ServiceSettings:
    return state.settings


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With ``BINDSEARCH_API_KEY`` set, /v1 wants ``Authorization: Bearer <key>``."""
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = settings.api_key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise Unauthorized("missing or wrong API key: send `Authorization: Bearer <key>`")


def get_pipeline(state: StateDep) -> Pipeline:
    if not state.ready or state.pipeline is None:
        raise NotReady(f"not ready: {state.not_ready_reason}; retry shortly")
    return state.pipeline


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]


def get_model(state: StateDep) -> ModelInfo:
    if state.model is None:
        raise NotReady(f"not ready: {state.not_ready_reason}; retry shortly")
    return state.model


ModelDep = Annotated[ModelInfo, Depends(get_model)]


def get_searcher(state: StateDep) -> Searcher:
    if state.searcher is None:
        raise NoIndex(
            "no index is loaded: this server only embeds (/v1/embed, /v1/embeddings); "
            "start it with `bindsearch serve --index PATH` to search"
        )
    return state.searcher


SearcherDep = Annotated[Searcher, Depends(get_searcher)]
