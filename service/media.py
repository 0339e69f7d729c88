"""Which bytes ``GET /v1/items/{id}/media`` may serve, and as what (README, "Media files").

Three checks stand between an item's stored path and a response:

- **The corpus boundary.** The stored path is opened without following a symlink: its real path
  must be the path itself (no component is a symlink now; the index records real paths), and the
  last component is opened with ``O_NOFOLLOW``, so a file replaced by a symlink after indexing
  (``x.png -> /etc/passwd``) is refused (404) and the bytes served are those of the file checked.
- **The indexed file.** Its size and sha256 must still be the ones the index recorded, else
  410 (changed since indexing). Hashing a large video per request would cost a full read: a
  verified hash is cached by the file's identity (device, inode, size, mtime and ctime; ctime
  cannot be set by a user, so a rewrite always misses the cache), so a file is read once per
  process until it changes.
- **The type.** It comes from the sniffed content (``encoders.formats.content_format``) and the
  item's modality, never from the name. Images, audio and video get their media type; plain text
  ``text/plain; charset=utf-8``; anything a browser could render as a document (HTML, SVG, XML,
  PDF, unknown bytes, text of another modality) is ``application/octet-stream`` as an attachment.
  Every media response also carries ``Content-Security-Policy: sandbox; default-src 'none'`` and
  ``X-Content-Type-Options: nosniff``, so even a mislabelled file cannot run script.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio
from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

from encoders import Modality
from encoders.formats import HEAD_BYTES, content_format

from .errors import Gone, NotFound
from .searchers import Searcher

__all__ = [
    "MEDIA_CSP",
    "MediaFile",
    "MediaGuard",
    "MediaResponse",
    "served_type",
]

MEDIA_CSP = "sandbox; default-src 'none'"
OCTET = "application/octet-stream"

# Formats a browser shows as media (never as a document), by family; containers that hold
# either sound or pictures (MP4, Matroska, Ogg) take the family from the item's modality.
_IMAGE_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
}
_AUDIO_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "mp3": "audio/mpeg",
    "aac": "audio/aac",
    "aiff": "audio/aiff",
    "m4a": "audio/mp4",
    "mp4": "audio/mp4",
    "matroska": "audio/webm",
}
_VIDEO_TYPES = {"mp4": "video/mp4", "matroska": "video/webm", "avi": "video/x-msvideo"}
_IMAGE_MODALITIES = (Modality.VISION, Modality.DEPTH, Modality.THERMAL)
# Text a browser would parse as markup if it ever ignored the declared type.
_MARKUP = (b"<!doctype", b"<html", b"<head", b"<body", b"<script", b"<svg", b"<?xml", b"<iframe")
HASH_CACHE_SIZE = 4096


@runtime_checkable
class _IndexedFiles(Protocol):
    """What an index searcher offers beyond ``Searcher``: stored rows (``index.MetadataStore``)."""

    def get(self, ids: list[int], cols: list[str] | None = None) -> list[dict[str, Any]]: ...


def served_type(modality: Modality, head: bytes) -> tuple[str, bool]:
    """(Content-Type, inline?) of a media file from its first bytes and its item's modality.

    Only types a browser shows as media or plain text are inline; the rest is an attachment.
    """
    fmt = content_format(head)
    if fmt in _IMAGE_TYPES:
        return _IMAGE_TYPES[fmt], True
    if modality == Modality.VIDEO and fmt in _VIDEO_TYPES:
        return _VIDEO_TYPES[fmt], True
    if modality == Modality.AUDIO and fmt in _AUDIO_TYPES:
        return _AUDIO_TYPES[fmt], True
    if fmt in _AUDIO_TYPES and fmt not in _VIDEO_TYPES:
        return _AUDIO_TYPES[fmt], True  # a WAV is a WAV whatever the item claims
    if fmt == "text" and modality in (Modality.TEXT, Modality.IMU) and not _is_markup(head):
        return "text/plain; charset=utf-8", True
    return OCTET, False


def _is_markup(head: bytes) -> bool:
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    return text.startswith(b"<") or any(tag in text for tag in _MARKUP)


class MediaFile:
    """An item's file, opened and checked, to serve as ``media_type``; owns ``fd`` until closed.

    ``MediaResponse`` closes it; one never handed to a response is closed when collected.
    """

    def __init__(
        self, fd: int, path: Path, st: os.stat_result, media_type: str, inline: bool
    ) -> None:
        self._closed = True  # until it owns fd
        self.fd = fd
        self.path = path
        self.stat = st
        self.media_type = media_type
        self.inline = inline
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __del__(self) -> None:
        self.close()


class MediaGuard:
    """Opens an item's media file through the checks above; caches verified hashes (LRU)."""

    def __init__(self, cache_size: int = HASH_CACHE_SIZE) -> None:
        self._hashes: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def open(self, searcher: Searcher, item_id: int) -> MediaFile:
        """The checked file of an item (blocking: call from a worker thread).

        Raises ``NotFound`` (no such item, no file, no longer a regular file at its path, or a
        symlink now) or ``Gone`` (its size or content changed since it was indexed).
        """
        item = searcher.get_item(item_id)
        if item is None:
            raise NotFound(f"item {item_id} is not in the index")
        stored = searcher.item_media_path(item_id)
        if stored is None:
            raise NotFound(f"item {item_id} has no media file")
        path = Path(os.path.abspath(stored))
        if os.path.realpath(path) != str(path):
            if not os.path.lexists(path):
                raise NotFound(f"the media file of item {item_id} is no longer on disk")
            raise NotFound(
                f"the media file of item {item_id} is not served: its path now leads through a "
                "symbolic link (only the indexed file itself is served)"
            )
        fd = _open_nofollow(path, item_id)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"the media file of item {item_id} is no longer a regular file")
            self._check_indexed(searcher, item_id, fd, st)
            media_type, inline = served_type(item.modality, os.pread(fd, HEAD_BYTES, 0))
        except BaseException:
            os.close(fd)
            raise
        return MediaFile(fd, path, st, media_type, inline)

    def _check_indexed(self, searcher: Searcher, item_id: int, fd: int, st: os.stat_result) -> None:
        if not isinstance(searcher, _IndexedFiles):
            return  # a JSONL collection records no sizes or hashes
        rows = searcher.get([item_id], ["sha256", "size"])
        row = rows[0] if rows else {}
        want_sha, want_size = row.get("sha256"), row.get("size")
        if want_size is not None and st.st_size != int(want_size):
            raise Gone(
                f"the media file of item {item_id} changed since it was indexed ({st.st_size} "
                f"bytes, {want_size} when indexed): run `bindsearch index sync` to re-index it"
            )
        if want_sha and self._sha256(fd, st) != want_sha:
            raise Gone(
                f"the media file of item {item_id} changed since it was indexed (its content "
                "differs): run `bindsearch index sync` to re-index it"
            )

    def _sha256(self, fd: int, st: os.stat_result) -> str:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            if key in self._hashes:
                self._hashes.move_to_end(key)
                return self._hashes[key]
        h = hashlib.sha256()
        offset = 0
        while block := os.pread(fd, 1 << 20, offset):
            h.update(block)
            offset += len(block)
        digest = h.hexdigest()
        with self._lock:
            self._hashes[key] = digest
            while len(self._hashes) > self._cache_size:
                self._hashes.popitem(last=False)
        return digest


def _open_nofollow(path: Path, item_id: int) -> int:
    # O_NONBLOCK: a FIFO put in the file's place must not hang the worker thread.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise NotFound(f"the media file of item {item_id} is no longer on disk") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotFound(
                f"the media file of item {item_id} is not served: it is now a symbolic link"
            ) from None
        raise NotFound(
            f"the media file of item {item_id} cannot be read ({e.strerror or 'error'})"
        ) from None


class MediaResponse(FileResponse):
    """A ``FileResponse`` of an already opened, checked file: it reads ``fd``, never the path.

    Ranges work as in ``FileResponse``; the descriptor is closed when the response ends.
    """

    def __init__(self, media: MediaFile, headers: dict[str, str]) -> None:
        super().__init__(
            media.path,
            media_type=media.media_type,
            headers=headers,
            filename=media.path.name,
            stat_result=media.stat,
            content_disposition_type="inline" if media.inline else "attachment",
        )
        self._media = media

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if "http.response.pathsend" in scope.get("extensions", {}):
                # pathsend would have the server open the path again: stream our descriptor.
                extensions = dict(scope["extensions"])
                del extensions["http.response.pathsend"]
                scope = {**scope, "extensions": extensions}
            await super().__call__(scope, receive, send)
        finally:
            self._media.close()

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        # Starlette's one place that opens the file: read a duplicate of the checked descriptor.
        file = os.fdopen(os.dup(self._media.fd), "rb")
        try:
            file.seek(0)
            yield anyio.wrap_file(file)
        finally:
            with anyio.CancelScope(shield=True):
                file.close()
