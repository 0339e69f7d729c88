"""What one request may cost, bounded before work: headers, body bytes, a shared byte budget.

The HTTP server (``server_options``) caps the bytes of a request's headers while it reads
them; ``RequestLimits`` (the outermost body check, one per app) caps the header count and the
body of every request, and holds the bytes of the bodies being read against one budget shared
by all requests; the routes cap their own bodies below that (``service.routes._body``). The
settings are listed in README.md, "Limits".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import MalformedRequest, Overloaded, PayloadTooLarge, ServiceError, TooManyHeaders


def server_options(max_header_bytes: int) -> dict[str, Any]:
    """``uvicorn.run`` keyword arguments that cap the bytes of a request's head (line + headers).

    uvicorn's httptools parser has no such cap and buffers whatever arrives; h11 refuses a head
    over ``max_incomplete_event_size`` with 400 and closes the connection, having buffered at
    most that plus one read.
    """
    return {"http": "h11", "h11_max_incomplete_event_size": max_header_bytes}


class ByteBudget:
    """Bytes of request bodies held by requests in flight, against one cap (event loop only)."""

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.gauge = gauge  # shows ``used`` in /metrics

    def take(self, n: int) -> bool:
        """Reserve ``n`` more bytes; False (nothing reserved) when that would pass the cap."""
        if self.used + n > self.limit:
            return False
        self.used += n
        if self.gauge is not None:
            self.gauge.set(self.used)
        return True

    def give(self, n: int) -> None:
        self.used -= n
        if self.gauge is not None:
            self.gauge.set(self.used)


def content_length(scope: Scope) -> int | None:
    """The request's Content-Length (None if absent); ``MalformedRequest`` when unreadable."""
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                n = int(value)
            except ValueError:
                n = -1
            if n < 0:
                raise MalformedRequest("bad Content-Length: give the body's size in bytes")
            return n
    return None


class RequestLimits:
    """Caps every request: header count (431), body bytes (413), the shared budget (429).

    A body's bytes are reserved from ``budget`` when the app first reads it (the declared
    Content-Length at once, so a body that will not fit is refused before it is read; else as
    it arrives) and given back when the request ends. Over the budget: 429 ``overloaded`` with
    Retry-After, and nothing more is buffered. ``respond`` renders an error (the app's one
    JSON error body).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_headers: int,
        budget: ByteBudget,
        retry_after_s: int,
        respond: Callable[[ServiceError], ASGIApp],
    ) -> None:
        self.app = app
        self.respond = respond
        self.max_body_bytes = max_body_bytes
        self.max_headers = max_headers
        self.budget = budget
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            n_headers = len(scope.get("headers", []))
            if n_headers > self.max_headers:
                raise TooManyHeaders(
                    f"{n_headers} request headers; the limit is {self.max_headers}"
                )
            declared = content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                raise self._too_large(declared)
        except ServiceError as e:
            await self.respond(e)(scope, receive, send)
            return
        seen = 0
        held = 0

        async def counted() -> Message:
            nonlocal seen, held
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self._too_large(None)
                want = max(seen, declared or 0)
                if want > self.budget.limit:  # would never fit: retrying cannot help
                    raise PayloadTooLarge(
                        f"the request body is over the limit of {self.budget.limit} bytes "
                        "(max_inflight_bytes)"
                    )
                if want > held:
                    if not self.budget.take(want - held):
                        raise Overloaded(
                            "the server is holding as many request bytes as it may "
                            f"(max_inflight_bytes={self.budget.limit}); retry later",
                            self.retry_after_s,
                        )
                    held = want
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            self.budget.give(held)

    def _too_large(self, declared: int | None) -> PayloadTooLarge:
        size = "" if declared is None else f" ({declared} bytes)"
        return PayloadTooLarge(
            f"the request body{size} is over the limit of {self.max_body_bytes} bytes "
            "(max_request_bytes)"
        )
