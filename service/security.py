"""``SecurityHeaders``: the headers every response carries (README, "Security headers").

- ``Referrer-Policy: no-referrer``, ``X-Frame-Options: DENY``, ``X-Content-Type-Options:
  nosniff`` on every response;
- a ``Content-Security-Policy`` with ``frame-ancestors 'none'`` on every response that does not
  set its own (the web page at ``/`` and the media route set theirs): ``default-src 'none'`` for
  JSON and files, and for the HTML pages FastAPI renders (``/docs``, ``/redoc``, the OAuth2
  redirect) a policy built from the page itself: its external scripts and stylesheets by origin,
  its inline scripts by sha256 hash, and nothing else to run.
"""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["API_CSP", "SecurityHeaders", "page_csp"]

API_CSP = "default-src 'none'; frame-ancestors 'none'"
_ALWAYS = {
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
_MAX_PAGE = 1 << 20  # an HTML page without its own CSP is buffered to hash its inline scripts
_SCRIPT = re.compile(rb"<script\b([^>]*)>(.*?)</script\s*>", re.I | re.S)
_SRC = re.compile(rb"""\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)
_STYLESHEET = re.compile(rb"""<link\b[^>]*\brel\s*=\s*["']?stylesheet[^>]*>""", re.I)
_ICON = re.compile(rb"""<link\b[^>]*\brel\s*=\s*["']?(?:shortcut )?icon[^>]*>""", re.I)


def page_csp(html: bytes) -> str:
    """A CSP that lets this HTML page load what it names and run its own inline scripts only."""
    scripts: set[str] = set()
    styles: set[str] = set()
    images: set[str] = set()
    for attrs, body in _SCRIPT.findall(html):
        src = _SRC.search(attrs)
        if src is not None:
            scripts.add(_origin(src.group(1)))
        elif body.strip():
            digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
            scripts.add(f"'sha256-{digest}'")
    for tag in _STYLESHEET.findall(html):
        if (href := _SRC.search(tag)) is not None:
            styles.add(_origin(href.group(1)))
    for tag in _ICON.findall(html):
        if (href := _SRC.search(tag)) is not None:
            images.add(_origin(href.group(1)))

    def sources(extra: set[str], *fixed: str) -> str:
        return " ".join(["'self'", *fixed, *sorted(extra - {"'self'"})])

    inline_styles = "'unsafe-inline'"  # Swagger UI and ReDoc set style attributes
    return (
        f"default-src 'none'; script-src {sources(scripts)}; "
        f"style-src {sources(styles, inline_styles)}; img-src {sources(images, 'data:')}; "
        "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


def _origin(url: bytes) -> str:
    parts = urlsplit(url.decode("utf-8", "replace"))
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}"
    if parts.scheme == "data":
        return "data:"
    return "'self'"


class SecurityHeaders:
    """Adds the headers above to every HTTP response (a route's own CSP wins)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        page: list[bytes] = []

        async def send_with_headers(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _ALWAYS.items():
                    headers.setdefault(name, value)
                if "content-security-policy" in headers:
                    await send(message)
                elif headers.get("content-type", "").startswith("text/html"):
                    start = message  # held until the page is read, to hash its scripts
                else:
                    headers["Content-Security-Policy"] = API_CSP
                    await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            page.append(message.get("body", b""))
            size = sum(len(p) for p in page)
            if message.get("more_body", False) and size <= _MAX_PAGE:
                return
            headers = MutableHeaders(scope=start)
            # A page too large to read whole gets the API policy: it will not run script.
            html = b"".join(page)
            headers["Content-Security-Policy"] = page_csp(html) if size <= _MAX_PAGE else API_CSP
            await send(start)
            await send({**message, "body": html})
            start = None
            page.clear()

        await self.app(scope, receive, send_with_headers)
