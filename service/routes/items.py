"""Stored items: metadata, and the media file of an item that is in the index.

The media route never builds a path from the request: the id (an integer) picks a row, and
the row's stored path is the only file it can serve.
"""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ..deps import SearcherDep, require_api_key
from ..errors import NotFound
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
            "description": "The item's file, with its content type.",
            "content": {"application/octet-stream": {"schema": _BINARY}},
        },
        **error_responses(400, 401, 404, 503),
    },
)
async def get_media(item_id: int, searcher: SearcherDep) -> FileResponse:
    """The file an indexed item came from (only files recorded in the index are served)."""
    path = await run_in_threadpool(searcher.item_media_path, item_id)
    if path is None:
        if await run_in_threadpool(searcher.get_item, item_id) is None:
            raise NotFound(f"item {item_id} is not in the index")
        raise NotFound(f"item {item_id} has no media file")
    if not await run_in_threadpool(path.is_file):
        raise NotFound(f"the media file of item {item_id} is no longer on disk")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(
        path,
        media_type=media_type,
        headers={"X-Content-Type-Options": "nosniff"},
        content_disposition_type="inline",
        filename=path.name,
    )
