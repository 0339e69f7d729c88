"""Stored items: metadata, and the media file of an item that is in the index.

The media route never builds a path from the request: the id (an integer) picks a row, and
the row's stored path is the only file it can serve, after ``service.media``'s checks (no
symlink, still the indexed bytes, a type sniffed from the content, a sandboxing CSP).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ..deps import SearcherDep, StateDep, require_api_key
from ..errors import NotFound
from ..media import MEDIA_CSP, MediaGuard, MediaResponse
from ..schemas import ItemOut
from ..searchers import Item
from . import error_responses

_BINARY = {"type": "string", "format": "binary"}

router = APIRouter(prefix="/v1", tags=["items"], dependencies=[Depends(require_api_key)])


def item_out(item: Item) -> ItemOut:
    return ItemOut(
        id=item.id,
        modality=item.modality.value,
        path=item.path,
        start=item.start,
        end=item.end,
        caption=item.caption,
        tags=list(item.tags),
        media_url=None if item.path is None else f"/v1/items/{item.id}/media",
    )


@router.get(
    "/items/{item_id}", response_model=ItemOut, responses=error_responses(400, 401, 404, 503)
)
async def get_item(item_id: int, searcher: SearcherDep) -> ItemOut:
    """An item's metadata."""
    item = await run_in_threadpool(searcher.get_item, item_id)
    if item is None:
        raise NotFound(f"item {item_id} is not in the index")
    return item_out(item)


@router.get(
    "/items/{item_id}/media",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The item's file. Its type comes from its content and modality, never "
            "its name; what a browser could render as a document is an octet-stream attachment.",
            "content": {"application/octet-stream": {"schema": _BINARY}},
        },
        **error_responses(400, 401, 404, 410, 503),
    },
)
async def get_media(item_id: int, searcher: SearcherDep, state: StateDep) -> MediaResponse:
    """The file an indexed item came from: only that file, unchanged since it was indexed."""
    guard = state.extra.get("media_guard")
    if not isinstance(guard, MediaGuard):  # one per app: it caches verified hashes
        guard = MediaGuard()
        state.extra["media_guard"] = guard
    media = await run_in_threadpool(guard.open, searcher, item_id)
    headers = {"Content-Security-Policy": MEDIA_CSP, "X-Content-Type-Options": "nosniff"}
    return MediaResponse(media, headers)
