"""Every request's cost is bounded before work (issue #17, defects 4, 5 and 10).

In-process (a fake embedder): floods of JSON values, bodies over a route's cap, multipart
parts and files over their caps, too many headers, the shared byte budget, a client that
goes away mid-upload; each test counts the work the app did (bytes pulled, terms built),
never the time it took. Then the real server (``bindsearch serve``, uvicorn, the tiny random
model) on 127.0.0.1 with raw sockets: the same attacks, bounded to tens of megabytes and a
few connections, checking its answers, its memory and that ``/healthz`` keeps answering.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.types import Message, Receive, Scope, Send

from encoders import Modality
from service import FakeEmbedder, Item, MemorySearcher, ServiceSettings, create_app
from service.errors import Overloaded, ServiceError
from service.generators import FakeGenerator
from service.limits import ByteBudget, RequestLimits
from service.routes import generate as generate_routes
from service.routes import search as search_routes
from service.routes._body import JsonShape

from .test_service import DIM, error_of, png_bytes, wait_ready
from .test_service_e2e import CONFIG, _free_port, _Proc, _start, _stop

FLOOD = json.dumps({"terms": [{"text": "a"}] * 10**6}).encode()  # 15 MB, 10**6 terms


@pytest.fixture
def searcher(tmp_path: Path) -> MemorySearcher:
    items = [Item(i, Modality.TEXT, None, caption=f"c{i}") for i in range(4)]
    return MemorySearcher(np.random.default_rng(0).standard_normal((4, DIM)), items, tmp_path)


@pytest.fixture
def app_client(searcher: MemorySearcher) -> Iterator[TestClient]:
    app = create_app(ServiceSettings(), FakeEmbedder(DIM), searcher, FakeGenerator(DIM))
    with TestClient(app) as c:
        wait_ready(app)
        yield c


def _counting(fn: Any, calls: list[int]) -> Any:
    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fn(*args, **kwargs)

    return spy


# ----------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("route", ["/v1/search", "/v1/generate"])
def test_term_flood_is_refused_before_terms_are_built(
    app_client: TestClient, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(search_routes, "from_json", _counting(search_routes.from_json, calls))
    monkeypatch.setattr(generate_routes, "from_json", _counting(generate_routes.from_json, calls))
    r = app_client.post(route, content=FLOOD, headers={"content-type": "application/json"})
    assert error_of(r, 413) == "too_large"
    assert "values" in r.json()["error"]["message"]
    assert calls == []  # no term was built, nothing was validated into a model
    assert app_client.get("/healthz").status_code == 200
    # A legal mix still works (and builds its terms once).
    r = app_client.post(route, json={"terms": [{"text": "a"}, {"text": "b", "weight": 0.5}]})
    assert r.status_code == 200, r.text
    assert calls == [1]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/embed", {"text": ["a"] * 10**5}),
        ("/v1/embed", {"inputs": [{"text": "a"}] * 10**5}),
        ("/v1/embeddings", {"input": ["a"] * 10**5, "model": "m"}),
        ("/v1/search", {"text": "a", "tags": ["t"] * 10**5}),
    ],
)
def test_every_json_route_counts_values(
    app_client: TestClient, route: str, body: dict[str, Any]
) -> None:
    r = app_client.post(route, json=body)
    assert error_of(r, 413) == "too_large"


def test_json_shape_counts_only_outside_strings() -> None:
    text = 'a, b, [c], {d} \\" , ' * 200  # commas, brackets and an escaped quote, in a string
    body = json.dumps({"terms": [{"text": text}, {"text": "x", "weight": 2}]}).encode()
    for size in (1, 7, 64, len(body)):  # any chunking: strings and escapes across chunks
        shape = JsonShape(limit=10)
        for i in range(0, len(body), size):
            shape.feed(body[i : i + size])
        assert shape.values == 6  # { [ { , { ,  -> the objects, the list, the separators
    long = json.dumps({"text": '\\"' * 100_000 + "]", "k": 1}).encode()  # escapes past 64 KiB
    for size in (65_537, len(long)):
        shape = JsonShape(limit=10)
        for i in range(0, len(long), size):
            shape.feed(long[i : i + size])
        assert shape.values == 2
    with pytest.raises(ServiceError, match="more than 10 values"):
        JsonShape(limit=10).feed(json.dumps(list(range(20))).encode())


def _scope(path: str, headers: dict[str, str]) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "t", **headers}.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


def _lazy_post(
    client: TestClient, path: str, headers: dict[str, str], body: Iterator[bytes]
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the app, one chunk per ``receive``, pulled only when the app reads.

    (The test client reads a request's whole body before the app sees it.)
    """
    sent: list[Message] = []
    done = False

    async def receive() -> Message:
        nonlocal done
        if done:
            return {"type": "http.disconnect"}
        chunk = next(body, None)
        if chunk is None:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(msg: Message) -> None:
        sent.append(msg)

    client.portal.call(client.app, _scope(path, headers), receive, send)  # type: ignore[union-attr]
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(payload)


def _chunks(n: int, size: int, pulled: list[int], head: bytes = b"", tail: bytes = b"") -> Any:
    """A lazily sent body: ``head``, ``n`` chunks of ``size`` bytes, ``tail``; counts pulls."""

    def gen() -> Iterator[bytes]:
        if head:
            yield head
        for _ in range(n):
            pulled.append(size)
            yield b"x" * size
        if tail:
            yield tail

    return gen()


def test_json_text_search_cannot_buffer_past_its_cap(searcher: MemorySearcher) -> None:
    limit = 100_000
    app = create_app(ServiceSettings(max_json_bytes=limit), FakeEmbedder(DIM), searcher)
    with TestClient(app) as c:
        wait_ready(app)
        pulled: list[int] = []
        body = _chunks(2000, 10_000, pulled, head=b'{"text": "', tail=b'"}')  # 20 MB
        status, out = _lazy_post(c, "/v1/search", {"content-type": "application/json"}, body)
        assert (status, out["error"]["type"]) == (413, "too_large")
        assert sum(pulled) <= limit + 10_000  # read at most the cap and one chunk
        pulled.clear()
        big = {"content-type": "application/json", "content-length": str(190 << 20)}
        body = _chunks(19_000, 10_000, pulled, head=b'{"text": "', tail=b'"}')
        status, out = _lazy_post(c, "/v1/search", big, body)
        assert (status, out["error"]["type"]) == (413, "too_large")  # by Content-Length
        assert "multipart" in out["error"]["message"]  # says what is accepted
        assert pulled == []  # nothing was read


def test_default_json_cap_takes_one_base64_upload() -> None:
    s = ServiceSettings()
    assert s.json_body_limit >= s.max_upload_bytes * 4 // 3
    assert s.json_body_limit < s.max_request_bytes
    assert ServiceSettings(max_json_bytes=123).json_body_limit == 123


# ----------------------------------------------------------------------------- multipart


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MP = {"content-type": "multipart/form-data; boundary=b0undary"}


def test_multipart_part_over_the_upload_cap_is_refused_while_streaming(
    searcher: MemorySearcher,
) -> None:
    cap = 50_000
    app = create_app(ServiceSettings(max_upload_bytes=cap), FakeEmbedder(DIM), searcher)
    with TestClient(app) as c:
        wait_ready(app)
        pulled: list[int] = []
        head = (
            b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        )
        body = _chunks(1000, 10_000, pulled, head=head, tail=b"\r\n--b0undary--\r\n")  # 10 MB
        status, out = _lazy_post(c, "/v1/search", MP, body)
        assert (status, out["error"]["type"]) == (413, "too_large")
        assert "'a.png'" in out["error"]["message"]
        assert sum(pulled) <= cap + 2 * 10_000


def test_multipart_part_count_is_checked_while_parsing(app_client: TestClient) -> None:
    pulled: list[int] = []
    one = _multipart([("file", "a.png", png_bytes())])[: -len("--b0undary--\r\n")]

    def parts() -> Iterator[bytes]:
        for _ in range(10_000):
            pulled.append(1)
            yield one
        yield b"--b0undary--\r\n"

    status, out = _lazy_post(app_client, "/v1/search", MP, parts())
    assert (status, out["error"]["type"]) == (413, "too_large")
    assert "more than 32 files" in out["error"]["message"]
    assert len(pulled) <= 34
    fields = _multipart([("text", None, b"a")] * 1000)
    r = app_client.post("/v1/embed", content=fields, headers=MP)
    assert error_of(r, 413) == "too_large"
    assert "form fields" in r.json()["error"]["message"]


def test_multipart_still_reads_files_fields_and_big_spooled_files(app_client: TestClient) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    big = buf.getvalue()
    assert len(big) > 1 << 20  # over what is kept in memory: spooled to disk and read back
    body = _multipart(
        [
            ("file", "a.png", png_bytes()),
            ("file", "b.png", big),
            ("weights", None, b"1"),
            ("weights", None, b"0.5"),
        ]
    )
    r = app_client.post("/v1/search", content=body, headers=MP)
    assert r.status_code == 200, r.text
    terms = r.json()["query"]["terms"]
    assert [t["filename"] for t in terms] == ["a.png", "b.png"]
    assert terms[1]["bytes"] == len(big)
    r = app_client.post("/v1/embed", content=_multipart([("text", None, b"hi")]), headers=MP)
    assert r.status_code == 200, r.text
    bad = {"content-type": "multipart/form-data"}  # no boundary
    assert error_of(app_client.post("/v1/embed", content=b"x", headers=bad), 400)


# ----------------------------------------------------------------------------- headers


def test_too_many_headers_are_refused(app_client: TestClient) -> None:
    headers = {f"x-h{i}": "v" for i in range(150)}
    r = app_client.get("/healthz", headers=headers)
    assert r.status_code == 431
    assert r.json()["error"]["type"] == "too_many_headers"
    assert app_client.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------- budget


def test_byte_budget_refuses_instead_of_buffering() -> None:
    """Two requests hold 60 + 30 of 100 bytes; a third declaring 20 gets 429 + Retry-After."""
    read: list[int] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        n = 0
        try:
            while True:
                msg = await receive()
                n += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
        except ServiceError as e:
            await _respond(e)(scope, receive, send)
            return
        read.append(n)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    budget = ByteBudget(100)
    limits = RequestLimits(inner, 1000, 100, budget, 7, _respond)

    async def request(length: int, gate: asyncio.Event | None) -> tuple[int, dict[str, str]]:
        chunks = [b"x" * (length // 2), b"x" * (length - length // 2)]
        sent: list[Message] = []

        async def receive() -> Message:
            if len(chunks) == 1 and gate is not None:
                await gate.wait()
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        async def send(msg: Message) -> None:
            sent.append(msg)

        scope = {"type": "http", "headers": [(b"content-length", str(length).encode())]}
        await limits(scope, receive, send)
        start = sent[0]
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}

    async def main() -> None:
        gate = asyncio.Event()
        a = asyncio.create_task(request(60, gate))
        b = asyncio.create_task(request(30, gate))
        while budget.used < 90:
            await asyncio.sleep(0)
        status, headers = await request(20, None)
        assert status == 429
        assert headers["retry-after"] == "7"
        assert read == []  # the third body was not read into the app
        gate.set()
        assert (await a)[0] == 200 and (await b)[0] == 200
        assert budget.used == 0  # given back when the requests ended
        assert (await request(20, None))[0] == 200
        assert (await request(150, None))[0] == 413  # could never fit: no point retrying

    asyncio.run(main())


def _respond(err: ServiceError) -> Any:
    from service.app import error_response

    return error_response(err)


def test_overloaded_carries_retry_after() -> None:
    assert Overloaded("x", 3).headers() == {"Retry-After": "3"}


def test_retry_later_keeps_each_class_status_and_type() -> None:
    # Overloaded and the Ray router's RayUnreachable share RetryLater's Retry-After; the class
    # it is mixed into still decides the status and the body's type.
    from service.errors import RetryLater, Unavailable, status_of
    from service.ray_serve import RayUnreachable

    busy, gone = Overloaded("full"), RayUnreachable("a shard died", 4)
    assert isinstance(busy, RetryLater) and isinstance(gone, RetryLater)
    assert isinstance(gone, Unavailable)
    assert (status_of(busy), busy.type, busy.headers()) == (429, "overloaded", {"Retry-After": "1"})
    assert (status_of(gone), gone.type, gone.headers()) == (
        503,
        "unavailable",
        {"Retry-After": "4"},
    )
    r = _respond(gone)
    assert r.status_code == 503 and r.headers["retry-after"] == "4"


# ----------------------------------------------------------------------------- disconnects


def test_client_disconnect_mid_upload_is_info_and_499(
    app_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_client.app
    body = _multipart([("file", "a.png", png_bytes((300, 300)))])
    messages: list[Message] = [
        {"type": "http.request", "body": body[:1000], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(msg: Message) -> None:
        sent.append(msg)

    scope = _scope("/v1/search", MP)
    with caplog.at_level(logging.INFO):
        app_client.portal.call(app, scope, receive, send)  # type: ignore[union-attr]
    assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    metrics = app_client.get("/metrics").text
    assert re.search(r'bindsearch_requests_total\{[^}]*route="/v1/search",status="499"', metrics)
    assert 'status="500"' not in metrics


# ----------------------------------------------------------------------------- real server

UPLOAD_CAP = 6 << 20  # the server's max_upload_bytes: its JSON cap is 9 MiB
BUDGET = 16 << 20
ITEMS = 4


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, _Proc]]:
    from encoders import resolve_model

    dim = resolve_model(CONFIG, None, random_weights=True).config.embed_dim
    root = tmp_path_factory.mktemp("limits")
    rng = np.random.default_rng(0)
    rows = [
        {
            "id": i,
            "modality": "text",
            "caption": f"c{i}",
            "vector": rng.standard_normal(dim).tolist(),
        }
        for i in range(ITEMS)
    ]
    (root / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    env = {
        "BINDSEARCH_MAX_UPLOAD_BYTES": str(UPLOAD_CAP),
        "BINDSEARCH_MAX_REQUEST_BYTES": str(8 << 20),
        "BINDSEARCH_MAX_INFLIGHT_BYTES": str(BUDGET),
    }
    srv, proc = _start(root, ["--index", str(root / "items.jsonl"), "--log-level", "info"], env)
    try:
        yield srv.url, proc
    finally:
        _stop(proc)


def _rss(proc: _Proc) -> int:
    text = Path(f"/proc/{proc.proc.pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert m is not None
    return int(m.group(1)) << 10


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _head(port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _exchange(port: int, head: bytes, piece: bytes = b"", times: int = 0) -> tuple[int, bytes]:
    """Send ``head``, then ``piece`` up to ``times`` times, stopping as soon as the server
    answers or hangs up; (pieces sent, the head of the answer, b"" if it only hung up)."""
    n = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(head)
            while n < times and not select.select([s], [], [], 0)[0]:
                s.sendall(piece)
                n += 1
            while b"\r\n\r\n" not in answer:
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, BrokenPipeError):
            pass
    return n, answer


class _Healthz:
    """Polls /healthz in a thread while an attack runs; every answer must be a 200."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                self.statuses.append(c.get(f"{self.url}/healthz").status_code)
                time.sleep(0.02)

    def __enter__(self) -> _Healthz:
        self.thread.start()
        _wait(lambda: bool(self.statuses), "/healthz answers before the attack")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        self.statuses.append(httpx.get(f"{self.url}/healthz", timeout=30).status_code)
        assert self.statuses and set(self.statuses) == {200}, self.statuses


def test_live_term_flood_is_refused_and_healthz_answers(live: tuple[str, _Proc]) -> None:
    url, _ = live
    floods = {  # under the byte caps (7.5 and 5 MB), so the value count must refuse them
        "/v1/search": json.dumps({"terms": [{"text": "a"}] * 500_000}).encode(),
        "/v1/embeddings": json.dumps({"input": ["a"] * 10**6, "model": "m"}).encode(),
    }
    with _Healthz(url), httpx.Client(timeout=60) as c:
        for route, flood in floods.items():
            assert len(flood) < UPLOAD_CAP * 4 // 3
            r = c.post(url + route, content=flood, headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            assert "values" in r.json()["error"]["message"]
        assert c.post(url + "/v1/search", json={"text": "a"}).status_code == 200


def test_live_big_json_bodies_are_refused_without_buffering(live: tuple[str, _Proc]) -> None:
    url, proc = live
    port = _port(url)
    idle = _rss(proc)
    with _Healthz(url):
        # 190 MB declared: refused by Content-Length, nothing need be sent.
        head = _head(
            port, "/v1/search", {"Content-Type": "application/json", "Content-Length": "199229440"}
        )
        _, answer = _exchange(port, head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # No length (chunked): refused once the 9 MiB JSON cap is read, not 40 MB later.
        head = _head(
            port, "/v1/search", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        piece = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
        sent, answer = _exchange(port, head + b'10\r\n{"text": "xxxxxx\r\n', piece, 40)
        assert sent < 40, "the server read a 40 MB JSON body"
        assert not answer or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert _rss(proc) - idle < 200 << 20


INFLIGHT = "bindsearch_inflight_request_bytes"


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(rf"^{name}(?:\{{[^}}]*{re.escape(labels)}[^}}]*\}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait(cond: Any, what: str) -> None:
    for _ in range(1200):
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_live_budget_429_and_disconnects_are_499(live: tuple[str, _Proc]) -> None:
    """Two 6 MiB uploads held open fill most of the 16 MiB budget: the third gets 429."""
    url, proc = live
    port = _port(url)
    size = 6 << 20
    boundary = "b0undary"
    head = _head(
        port,
        "/v1/search",
        {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(size),
        },
    )
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    ).encode() + b"\0" * 60_000
    base = _metric(url, "bindsearch_inflight_request_bytes")
    held: list[socket.socket] = []
    try:
        for i in range(2):
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            held.append(s)
            s.sendall(head + start)
            _wait(
                lambda i=i: (
                    _metric(url, "bindsearch_inflight_request_bytes") >= base + (i + 1) * size
                ),
                "the upload's bytes are held",
            )
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head + start)
            answer = b""
            while b"\r\n\r\n" not in answer:
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        assert answer.startswith(b"HTTP/1.1 429"), answer[:300]
        assert b"retry-after: " in answer.lower()
    finally:
        for s in held:
            s.close()  # two clients hang up mid-upload
    _wait(
        lambda: _metric(url, "bindsearch_requests_total", 'status="499"') >= 2,
        "the disconnects are counted as 499",
    )
    _wait(lambda: _metric(url, "bindsearch_inflight_request_bytes") == base, "budget given back")
    log = proc.log.read_text()
    assert "went away during POST /v1/search" in log
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert _metric(url, "bindsearch_requests_total", 'status="500"') == 0


def test_serve_caps_heads_at_the_server() -> None:
    from service.limits import server_options

    opts = server_options(1234)
    assert opts == {"http": "h11", "h11_max_incomplete_event_size": 1234}
    assert _free_port() > 0


# ------------------------------------------------- the figures (bench/hostile.py)

# The server's defaults (200 MB bodies, 50 MiB uploads, a 512 MiB in-flight budget, 64 KiB
# heads). Bounds: the RSS bound (memory is not noisy); the work each client got to do
# (no attacker got half its bytes read); /healthz answering 200 throughout, each answer within
# HEALTHZ_S, generous next to the 1 s and 100 ms on a shared 2-core machine
# (``python -m bench.hostile`` measures against the issue's own bounds: 0.11 s and 0.01 s here).
HEALTHZ_S = 5.0


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    from bench.hostile import server

    with server(tmp_path_factory.mktemp("hostile")) as url_pid:
        yield url_pid


def _check(figures: Any, refused: set[int]) -> None:
    from bench.hostile import RSS_ABOVE_IDLE

    assert set(figures.statuses) <= refused, figures
    assert figures.rss_above_idle_mb * 1e6 < RSS_ABOVE_IDLE, figures
    assert figures.healthz_status == [200], figures
    assert figures.slowest_healthz_s < HEALTHZ_S, figures


def test_live_ten_concurrent_190_mb_bodies(defaults: tuple[str, int]) -> None:
    from bench.hostile import MB, Figures, big_bodies, watching

    url, pid = defaults
    with watching(url, pid) as watch:
        results = big_bodies(_port(url), n=10, size=190 * MB)
    figures = Figures.of("bodies", results, watch)
    # 0: the server answered and hung up mid-upload, and the client's kernel dropped the
    # answer with the connection (a reset): a refusal all the same.
    _check(figures, {0, 413, 429})
    assert sorted({r.kind for r in results}) == ["chunked", "json", "multipart"]
    assert 429 in figures.statuses  # more than the in-flight budget was asked for at once
    assert 413 in figures.statuses  # bodies over the JSON and upload caps
    assert max(r.sent for r in results) < 95 * MB, figures  # none got half its body read


def test_live_four_100_mb_heads(defaults: tuple[str, int]) -> None:
    from bench.hostile import MB, Figures, huge_headers, watching

    url, pid = defaults
    with watching(url, pid) as watch:
        results = huge_headers(_port(url), n=4, size=100 * MB)
    figures = Figures.of("headers", results, watch)
    _check(figures, {0, 400, 431})  # h11 answers 400 and hangs up past the head cap
    assert max(r.sent for r in results) < 50 * MB, figures


def test_live_million_term_flood(defaults: tuple[str, int]) -> None:
    from bench.hostile import FLOOD, Figures, term_flood, watching

    url, pid = defaults
    with watching(url, pid) as watch:
        result = term_flood(_port(url))
    figures = Figures.of("flood", [result], watch)
    _check(figures, {413})
    assert result.sent < len(FLOOD) // 2, figures  # refused on its first values, not parsed
