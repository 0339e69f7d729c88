"""The service in-process: every endpoint, every error status, the arithmetic, the batcher.

A ``FakeEmbedder`` (hash-based vectors) and a ``MemorySearcher`` stand in for the model and
the index, so expected answers are computed here with numpy.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from encoders import Modality
from service import FakeEmbedder, Item, MemorySearcher, ServiceSettings, create_app
from service.batcher import Batcher, BatchSettings
from service.errors import ModelFailed, Overloaded

DIM = 8


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture
def searcher(tmp_path: Path) -> MemorySearcher:
    (tmp_path / "cat.png").write_bytes(png_bytes())
    (tmp_path / "song.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    items = [
        Item(0, Modality.VISION, "cat.png", caption="a cat", tags=("pets",)),
        Item(1, Modality.AUDIO, "song.wav", start=0.0, end=2.0, tags=("pets", "music")),
        Item(2, Modality.TEXT, None, caption="a caption"),
        Item(3, Modality.VISION, "gone.png"),
        Item(4, Modality.DEPTH, None, tags=("music",)),
        Item(5, Modality.VIDEO, None),
    ]
    vectors = np.random.default_rng(0).standard_normal((len(items), DIM))
    return MemorySearcher(vectors, items, root=tmp_path)


def wait_ready(app: FastAPI) -> None:
    """Poll the app's readiness flag (warm-up runs in the background)."""
    for _ in range(4000):
        if app.state.bindsearch.ready:
            return
        time.sleep(0.005)
    raise AssertionError(f"never ready: {app.state.bindsearch.not_ready_reason}")


@contextmanager
def serve(
    searcher: MemorySearcher | None,
    embedder: FakeEmbedder | None = None,
    **settings: Any,
) -> Iterator[TestClient]:
    app = create_app(ServiceSettings(**settings), embedder or FakeEmbedder(DIM), searcher)
    with TestClient(app) as client:
        wait_ready(app)
        yield client


@pytest.fixture
def client(searcher: MemorySearcher) -> Iterator[TestClient]:
    with serve(searcher, max_k=4) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> str:
    """Assert the status and the JSON error shape; return the error type."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["message"]
    return str(body["error"]["type"])


# ----------------------------------------------------------------------------- operations


def test_health_ready_info_root(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert client.get("/readyz").status_code == 200
    assert client.get("/").json()["docs"] == "/docs"
    info = client.get("/v1/info").json()
    assert info["model"]["dim"] == DIM and info["model"]["licence"]
    counts = {i["modality"]: i["count"] for i in info["indexes"]}
    assert counts == {"vision": 2, "audio": 1, "text": 1, "depth": 1, "video": 1}
    assert all(i["recipe"] for i in info["indexes"])
    assert info["limits"]["max_k"] == 4
    assert client.get("/docs").status_code == 200


def test_not_ready_until_warmed_up(searcher: MemorySearcher) -> None:
    release = threading.Event()

    class SlowWarmUp(FakeEmbedder):
        def warmup(self) -> None:
            release.wait()

    app = create_app(ServiceSettings(), SlowWarmUp(DIM), searcher)
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        assert error_of(c.post("/v1/embed", json={"text": "x"}), 503) == "not_ready"
        release.set()
        wait_ready(app)
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/embed", json={"text": "x"}).status_code == 200


def test_metrics(client: TestClient) -> None:
    client.post("/v1/embed", json={"text": ["a", "b"]})
    client.get("/v1/items/999")
    text = client.get("/metrics").text
    assert 'bindsearch_requests_total{method="POST",route="/v1/embed",status="200"} 1.0' in text
    assert 'route="/v1/items/{item_id}",status="404"' in text
    assert "bindsearch_request_duration_seconds_bucket" in text
    assert 'bindsearch_items_embedded_total{modality="text"} 2.0' in text
    assert 'bindsearch_batch_size_count{modality="text"}' in text
    assert 'bindsearch_queue_depth{modality="text"} 0.0' in text


# ----------------------------------------------------------------------------- search


def test_search_by_text_matches_numpy(client: TestClient, searcher: MemorySearcher) -> None:
    r = client.post("/v1/search", json={"text": "a cat", "k": 3})
    assert r.status_code == 200
    body = r.json()
    q = FakeEmbedder(DIM).vector_for("text", "a cat")
    all_vectors = np.stack([searcher.item_vector(i) for i in range(6)])  # type: ignore[misc]
    expected = np.argsort(-(all_vectors @ q))[:3]
    assert [h["id"] for h in body["results"]] == expected.tolist()
    scores = [h["score"] for h in body["results"]]
    np.testing.assert_allclose(scores, (all_vectors @ q)[expected], rtol=1e-5, atol=1e-6)
    first = body["results"][0]
    assert set(first) == {
        "id",
        "score",
        "relevance",
        "modality",
        "path",
        "start",
        "end",
        "caption",
        "tags",
        "media_url",
    }
    assert body["query"]["terms"] == [
        {
            "kind": "text",
            "weight": 1.0,
            "modality": "text",
            "text": "a cat",
            "item_id": None,
            "filename": None,
            "bytes": None,
            "tokens": 2,  # "a cat": the model reads them all
            "truncated": False,
        }
    ]
    assert body["took_ms"] >= 0


def test_weighted_mix_is_normalised_sum(client: TestClient, searcher: MemorySearcher) -> None:
    fake = FakeEmbedder(DIM)
    wav = b"RIFF\x10\x00\x00\x00WAVEfmt data"
    terms = [
        {"text": "dog", "weight": 1.0},
        {"item_id": 4, "weight": -0.5},
        {"data": base64.b64encode(wav).decode(), "modality": "audio", "weight": 2.0},
    ]
    r = client.post("/v1/search", json={"terms": terms, "k": 4})
    assert r.status_code == 200, r.text
    parts = [fake.vector_for("text", "dog"), searcher.item_vector(4), fake.vector_for("audio", wav)]
    mixed = unit(sum(w * unit(v) for w, v in zip((1.0, -0.5, 2.0), parts, strict=True)))
    vectors = {i: searcher.item_vector(i) for i in range(6) if i != 4}  # the term item is left out
    expected = sorted(vectors, key=lambda i: -float(vectors[i] @ mixed))[:4]  # type: ignore[operator]
    body = r.json()
    assert [h["id"] for h in body["results"]] == expected
    for h in body["results"]:
        assert h["score"] == pytest.approx(float(vectors[h["id"]] @ mixed), abs=1e-5)  # type: ignore[operator]
    echo = body["query"]["terms"]
    assert [t["kind"] for t in echo] == ["text", "item", "data"]
    assert [t["modality"] for t in echo] == ["text", "depth", "audio"]
    assert [t["weight"] for t in echo] == [1.0, -0.5, 2.0]
    assert echo[2]["bytes"] == len(wav)


def test_huge_weights_mix_like_small_ones(client: TestClient) -> None:
    """Only the weights' ratios matter: 1e308-sized weights do not overflow into an error."""
    small = [{"text": "dog", "weight": 1.0}, {"text": "cat", "weight": 0.5}]
    huge = [{"text": "dog", "weight": 1e308}, {"text": "cat", "weight": 5e307}]
    a = client.post("/v1/search", json={"terms": small, "k": 4}).json()["results"]
    b = client.post("/v1/search", json={"terms": huge, "k": 4}).json()["results"]
    assert [h["id"] for h in a] == [h["id"] for h in b]
    assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-6)


def test_search_by_item_id_excludes_itself(client: TestClient, searcher: MemorySearcher) -> None:
    body = client.post("/v1/search", json={"item_id": 0}).json()
    ids = [h["id"] for h in body["results"]]
    assert 0 not in ids and len(ids) == 4  # k defaults to 10, capped at max_k=4
    assert body["query"]["k"] == 4
    assert body["query"]["terms"][0]["modality"] == "vision"


def test_k_targets_and_tags(client: TestClient) -> None:
    r = client.post("/v1/search", json={"text": "x", "k": 1000})
    assert len(r.json()["results"]) == 4 and r.json()["query"]["k"] == 4
    r = client.post("/v1/search", json={"text": "x", "target": ["vision", "audio"]}).json()
    assert {h["modality"] for h in r["results"]} == {"vision", "audio"}
    assert r["query"]["target"] == ["vision", "audio"]
    r = client.post("/v1/search", json={"text": "x", "target": "depth"}).json()
    assert [h["id"] for h in r["results"]] == [4]
    r = client.post("/v1/search", json={"text": "x", "tags": ["pets"]}).json()
    assert sorted(h["id"] for h in r["results"]) == [0, 1]
    r = client.post("/v1/search", json={"text": "x", "tags": ["pets", "music"]}).json()
    assert [h["id"] for h in r["results"]] == [1]
    r = client.post("/v1/search", json={"text": "x", "tags": ["nope"]}).json()
    assert r["results"] == []


def test_search_multipart(client: TestClient) -> None:
    fake = FakeEmbedder(DIM)
    img = png_bytes()
    r = client.post("/v1/search", files={"file": ("cat.png", img, "image/png")}, data={"k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 2
    assert body["query"]["terms"][0] == {
        "kind": "file",
        "weight": 1.0,
        "modality": "vision",
        "text": None,
        "item_id": None,
        "filename": "cat.png",
        "bytes": len(img),
        "tokens": None,
        "truncated": None,
    }
    # Several files with weights, target and tag fields.
    wav = b"RIFF\x10\x00\x00\x00WAVEfmt data"
    r = client.post(
        "/v1/search",
        files=[("file", ("a.png", img)), ("file", ("b.wav", wav))],
        data={"weights": ["1.0", "-0.25"], "target": "vision,audio", "tag": ["pets"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [t["modality"] for t in body["query"]["terms"]] == ["vision", "audio"]
    mixed = unit(fake.vector_for("vision", img) - 0.25 * fake.vector_for("audio", wav))
    assert body["query"]["tags"] == ["pets"]
    assert {h["id"] for h in body["results"]} == {0, 1}
    best = max(body["results"], key=lambda h: h["score"])
    assert best["score"] == pytest.approx(max(h["score"] for h in body["results"]))
    assert np.isfinite(mixed).all()
    # An explicit modality overrides detection (a PNG as a depth map).
    r = client.post("/v1/search", files={"file": ("d.png", img)}, data={"modality": "depth"})
    assert r.json()["query"]["terms"][0]["modality"] == "depth"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "status", "kind"),
    [
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "malformed_request",
        ),
        ({"json": {"text": "a", "item_id": 1}}, 400, "malformed_request"),
        ({"json": {}}, 400, "malformed_request"),
        ({"json": {"text": "a", "k": 0}}, 400, "malformed_request"),
        ({"json": {"text": "a", "extra": 1}}, 400, "malformed_request"),
        ({"json": {"text": "a", "target": ["smell"]}}, 400, "malformed_request"),
        ({"json": {"data": "%%%not base64"}}, 400, "malformed_request"),
        ({"json": {"terms": []}}, 400, "malformed_request"),
        ({"json": {"terms": [{"text": "a", "weight": "NaN"}]}}, 400, "malformed_request"),
        ({"json": {"data": "aGVsbG8=", "modality": "smell"}}, 400, "malformed_request"),
        (
            {"content": b"text=a", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media",
        ),
        ({"json": {"data": base64.b64encode(b"hello world").decode()}}, 415, "unsupported_media"),
        ({"json": {"item_id": 999}}, 404, "not_found"),
        ({"json": {"text": "   "}}, 422, "invalid_content"),
        (
            {"json": {"data": base64.b64encode(b"BAD image").decode(), "modality": "vision"}},
            422,
            "invalid_content",
        ),
        ({"json": {"terms": [{"text": "a"}, {"text": "a", "weight": -1}]}}, 422, "invalid_content"),
        ({"json": {"text": "x" * 20_001}}, 413, "too_large"),
        ({"json": {"terms": [{"text": "a"}] * 33}}, 413, "too_large"),
        (
            {"files": {"file": ("x.png", png_bytes())}, "data": {"weights": ["1", "2"]}},
            400,
            "malformed_request",
        ),
        (
            {"files": {"file": ("x.png", png_bytes())}, "data": {"k": "many"}},
            400,
            "malformed_request",
        ),
        ({"files": {"other": ("x.png", png_bytes())}}, 400, "malformed_request"),
        ({"files": {"file": ("x.xyz", b"just some text")}}, 415, "unsupported_media"),
        ({"files": {"file": ("x.png", b"")}}, 422, "invalid_content"),
    ],
)
def test_search_errors(client: TestClient, kwargs: dict[str, Any], status: int, kind: str) -> None:
    assert error_of(client.post("/v1/search", **kwargs), status) == kind


def test_error_messages_say_what_is_accepted(client: TestClient) -> None:
    r = client.post("/v1/search", json={"data": base64.b64encode(b"hello world").decode()})
    assert "give `modality`" in r.json()["error"]["message"]
    r = client.post("/v1/search", json={"text": "a", "target": ["smell"]})
    assert "accepted: vision" in r.json()["error"]["message"]
    r = client.post("/v1/search", content=b"x", headers={"content-type": "text/plain"})
    assert "application/json or multipart/form-data" in r.json()["error"]["message"]


def test_upload_caps(searcher: MemorySearcher) -> None:
    with serve(searcher, max_upload_bytes=1000, max_request_bytes=5000, max_pixels=100) as c:
        big = b"\x89PNG\r\n\x1a\n" + b"\0" * 2000
        assert error_of(c.post("/v1/search", files={"file": ("a.png", big)}), 413) == "too_large"
        r = c.post("/v1/search", files={"file": ("a.png", b"\0" * 6000)})
        assert error_of(r, 413) == "too_large"  # whole request, by Content-Length

        def chunks() -> Iterator[bytes]:
            yield b'{"text": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert error_of(r, 413) == "too_large"  # while reading a body with no length
        r = c.post("/v1/search", files={"file": ("a.png", png_bytes((20, 20)))})
        assert error_of(r, 413) == "too_large"  # 400 pixels > 100
        assert "pixels" in r.json()["error"]["message"]


def test_modality_not_in_model(searcher: MemorySearcher) -> None:
    fake = FakeEmbedder(DIM, modalities=(Modality.TEXT,))
    with serve(searcher, fake) as c:
        r = c.post("/v1/search", files={"file": ("a.png", png_bytes())})
        assert error_of(r, 415) == "unsupported_media"
        assert "embeds text" in r.json()["error"]["message"]


def test_no_index_embeds_but_does_not_search() -> None:
    with serve(None) as c:
        assert error_of(c.post("/v1/search", json={"text": "a"}), 503) == "no_index"
        assert error_of(c.get("/v1/items/0"), 503) == "no_index"
        assert c.post("/v1/embed", json={"text": "a"}).status_code == 200
        assert c.get("/v1/info").json()["indexes"] == []


def test_model_failure_is_503_for_everyone(searcher: MemorySearcher) -> None:
    with serve(searcher, FakeEmbedder(DIM, fail_embed=True)) as c:
        assert error_of(c.post("/v1/search", json={"text": "a"}), 503) == "model_failed"


def test_unknown_route_and_method(client: TestClient) -> None:
    assert error_of(client.get("/v1/nope"), 404) == "not_found"
    assert error_of(client.get("/v1/search"), 405) == "method_not_allowed"


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/info/"), ("POST", "/v1/search/")])
def test_trailing_slash_is_not_redirected_to_the_host_header(
    client: TestClient, method: str, path: str
) -> None:
    # Starlette's redirect_slashes answered 307 with Location: http://<Host header>/v1/info.
    r = client.request(
        method, path, headers={"host": "evil.example"}, json={"text": "a"}, follow_redirects=False
    )
    assert "location" not in r.headers
    assert error_of(r, 404) == "not_found"


# ----------------------------------------------------------------------------- embed


def test_embed_json_and_multipart(client: TestClient) -> None:
    fake = FakeEmbedder(DIM)
    body = client.post("/v1/embed", json={"text": ["a", "b"]}).json()
    assert body["dim"] == DIM and body["model"] == "fake"
    close = np.testing.assert_allclose
    close(body["data"][1]["embedding"], fake.vector_for("text", "b"), atol=1e-6)
    img = png_bytes()
    body = client.post(
        "/v1/embed",
        json={"inputs": [{"text": "a"}, {"data": base64.b64encode(img).decode()}]},
    ).json()
    assert [d["modality"] for d in body["data"]] == ["text", "vision"]
    for d in body["data"]:
        assert np.linalg.norm(d["embedding"]) == pytest.approx(1.0, abs=1e-5)
    r = client.post("/v1/embed", files=[("file", ("a.png", img))], data={"text": ["hello"]})
    assert [d["modality"] for d in r.json()["data"]] == ["vision", "text"]
    np.testing.assert_allclose(
        r.json()["data"][0]["embedding"], fake.vector_for("vision", img), atol=1e-6
    )
    assert error_of(client.post("/v1/embed", json={}), 400) == "malformed_request"
    r = client.post("/v1/embed", files={"file": ("a", img)}, data={"what": "x"})
    assert error_of(r, 400) == "malformed_request"


def test_openai_embeddings(client: TestClient) -> None:
    fake = FakeEmbedder(DIM)
    wav = b"RIFF\x10\x00\x00\x00WAVEfmt data"
    uri = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    depth = "data:image/png;modality=depth;base64," + base64.b64encode(png_bytes()).decode()
    r = client.post("/v1/embeddings", json={"input": ["hi", uri, depth], "model": "any"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "fake"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    close = np.testing.assert_allclose
    close(body["data"][0]["embedding"], fake.vector_for("text", "hi"), atol=1e-6)
    close(body["data"][1]["embedding"], fake.vector_for("audio", wav), atol=1e-6)
    np.testing.assert_allclose(
        body["data"][2]["embedding"], fake.vector_for("depth", png_bytes()), atol=1e-6
    )
    r = client.post(
        "/v1/embeddings", json={"input": "hi", "model": "m", "encoding_format": "base64"}
    )
    v = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(v, fake.vector_for("text", "hi"), atol=1e-6)
    bad = [
        {"input": [1, 2, 3], "model": "m"},
        {"input": [], "model": "m"},
        {"input": "hi"},
        {"input": "hi", "model": "m", "dimensions": 3},
        {"input": "data:image/png,notbase64", "model": "m"},
    ]
    for b in bad:
        assert error_of(client.post("/v1/embeddings", json=b), 400) == "malformed_request", b


# ----------------------------------------------------------------------------- items


def test_items_and_media(client: TestClient, searcher: MemorySearcher) -> None:
    item = client.get("/v1/items/1").json()
    assert item == {
        "id": 1,
        "modality": "audio",
        "path": "song.wav",
        "start": 0.0,
        "end": 2.0,
        "caption": None,
        "tags": ["pets", "music"],
        "media_url": "/v1/items/1/media",
    }
    assert client.get("/v1/items/2").json()["media_url"] is None
    r = client.get("/v1/items/0/media")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == searcher.item_media_path(0).read_bytes()  # type: ignore[union-attr]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert error_of(client.get("/v1/items/999"), 404) == "not_found"
    assert error_of(client.get("/v1/items/999/media"), 404) == "not_found"
    assert error_of(client.get("/v1/items/2/media"), 404) == "not_found"  # no file
    assert error_of(client.get("/v1/items/3/media"), 404) == "not_found"  # not on disk
    assert error_of(client.get("/v1/items/abc"), 400) == "malformed_request"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/items/..%2F..%2Fetc%2Fpasswd/media",
        "/v1/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/media",
        "/v1/items/0%2F..%2F..%2Fetc%2Fpasswd/media",
        "/v1/items/0/media%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/items/-1/media",
        "/v1/items/1e3/media",
    ],
)
def test_media_traversal_is_4xx(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert 400 <= r.status_code < 500
    assert b"root:" not in r.content


# ----------------------------------------------------------------------------- auth, CORS


def test_auth(searcher: MemorySearcher) -> None:
    with serve(searcher, api_key="s3cret") as c:
        r = c.post("/v1/search", json={"text": "a"})
        assert error_of(r, 401) == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer nope"}
        assert error_of(c.get("/v1/items/0", headers=wrong), 401) == "unauthorized"
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/search", json={"text": "a"}, headers=ok).status_code == 200
        assert c.get("/v1/items/0/media", headers=ok).status_code == 200
        assert c.get("/v1/info", headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200  # probes stay open
        assert c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_cors(searcher: MemorySearcher) -> None:
    with serve(searcher, cors_origins=["https://app.example"]) as c:
        r = c.post("/v1/embed", json={"text": "a"}, headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options(
            "/v1/search",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert r.status_code == 200
        r = c.post("/v1/embed", json={"text": "a"}, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


# ----------------------------------------------------------------------------- batcher


async def _until(cond: Any) -> None:
    """Yield to the loop until ``cond()`` holds (bounded by steps, not by time)."""
    for _ in range(100_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def test_batcher_groups_concurrent_requests() -> None:
    gate = threading.Event()
    fake = FakeEmbedder(DIM, gate=gate)

    async def main() -> list[np.ndarray]:
        b = Batcher(fake, BatchSettings(max_batch_size=16, max_wait_ms=0, max_queue=64))
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(b.embed([(Modality.TEXT, (Modality.TEXT, "t0"))]))
        await loop.run_in_executor(None, fake.entered.wait)  # batch 1 holds the model
        rest = [
            asyncio.ensure_future(b.embed([(Modality.TEXT, (Modality.TEXT, f"t{i}"))]))
            for i in range(1, 6)
        ]
        await _until(lambda: len(b._lanes[Modality.TEXT].waiting) == 5)
        gate.set()
        out = await asyncio.gather(first, *rest)
        await b.close()
        return out

    out = asyncio.run(main())
    assert fake.batch_sizes == [1, 5]
    for i, v in enumerate(out):
        np.testing.assert_allclose(v[0], fake.vector_for("text", f"t{i}"))


def test_batcher_failure_answers_every_waiter() -> None:
    fake = FakeEmbedder(DIM, fail_embed=True)

    async def main() -> list[Any]:
        b = Batcher(fake, BatchSettings(max_batch_size=4, max_wait_ms=1, max_queue=64))
        calls = [b.embed([(Modality.TEXT, (Modality.TEXT, f"t{i}"))]) for i in range(10)]
        out = await asyncio.gather(*calls, return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(main())
    assert len(out) == 10 and all(isinstance(e, ModelFailed) for e in out)


def test_batcher_queue_full_and_cancelled() -> None:
    gate = threading.Event()
    fake = FakeEmbedder(DIM, gate=gate)

    async def main() -> None:
        b = Batcher(
            fake, BatchSettings(max_batch_size=8, max_wait_ms=0, max_queue=3, retry_after_s=7)
        )
        loop = asyncio.get_running_loop()
        busy = asyncio.ensure_future(b.embed([(Modality.TEXT, (Modality.TEXT, "busy"))]))
        await loop.run_in_executor(None, fake.entered.wait)
        waiting = [
            asyncio.ensure_future(b.embed([(Modality.TEXT, (Modality.TEXT, f"w{i}"))]))
            for i in range(3)
        ]
        await _until(lambda: len(b._lanes[Modality.TEXT].waiting) == 3)
        with pytest.raises(Overloaded) as e:
            await b.embed([(Modality.TEXT, (Modality.TEXT, "one too many"))])
        assert e.value.headers() == {"Retry-After": "7"}
        # Another modality has its own queue.
        other = asyncio.ensure_future(b.embed([(Modality.AUDIO, (Modality.AUDIO, b"x"))]))
        waiting[1].cancel()  # its caller went away: skipped, not embedded
        gate.set()
        await asyncio.gather(busy, waiting[0], waiting[2], other)
        assert waiting[1].cancelled()
        await b.close()

    asyncio.run(main())
    assert sorted(fake.batch_sizes) == [1, 1, 2]


def test_http_429_with_retry_after(searcher: MemorySearcher) -> None:
    gate = threading.Event()
    fake = FakeEmbedder(DIM, gate=gate)
    app = create_app(ServiceSettings(max_queue=2, max_wait_ms=0, retry_after_s=3), fake, searcher)

    async def main() -> list[int]:
        async with app.router.lifespan_context(app):
            wait_ready_async = _until(lambda: app.state.bindsearch.ready)
            await wait_ready_async
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                loop = asyncio.get_running_loop()

                def post(i: int) -> asyncio.Future[httpx.Response]:
                    return asyncio.ensure_future(c.post("/v1/embed", json={"text": f"t{i}"}))

                first = post(0)
                await loop.run_in_executor(None, fake.entered.wait)
                queued = [post(1), post(2)]
                lane = app.state.bindsearch.pipeline.batcher._lanes[Modality.TEXT]
                await _until(lambda: len(lane.waiting) == 2)
                refused = await c.post("/v1/embed", json={"text": "late"})
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "3"
                assert refused.json()["error"]["type"] == "overloaded"
                gate.set()
                done = await asyncio.gather(first, *queued)
                return [r.status_code for r in done]

    assert asyncio.run(main()) == [200, 200, 200]


def test_memory_searcher_jsonl_roundtrip(tmp_path: Path) -> None:
    import json

    rows = [
        {"id": 7, "modality": "vision", "path": "a.png", "tags": ["x"], "vector": [1, 0, 0]},
        {"id": 9, "modality": "audio", "vector": [0, 2, 0], "start": 1.5, "end": 3},
    ]
    p = tmp_path / "items.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = MemorySearcher.from_jsonl(p)
    assert s.dim == 3
    hits = s.search(np.array([[0, 1, 0]], np.float32), k=5)[0]
    assert [h.item.id for h in hits] == [9, 7]
    assert hits[0].score == pytest.approx(1.0)
    assert s.item_media_path(7) == tmp_path / "a.png"
    assert s.get_item(9).start == 1.5  # type: ignore[union-attr]
    p.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"items\.jsonl:1"):
        MemorySearcher.from_jsonl(p)
