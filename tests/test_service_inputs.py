"""The service's inputs as a new user sends them (#17, the small items).

A text longer than the model reads is cut CLIP-style and the response says so (not 413);
``tags`` and its alias ``tag``; ``item_id`` in multipart; ``.txt`` uploads as text. A
``FakeEmbedder`` stands in for the model and reports 75 tokens read (the real model's
77 - 2); one check runs the real encoder and tokenizer.
"""

from __future__ import annotations

import base64
import io
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

from encoders import Modality, load_encoder, resolve_model
from encoders.transforms.text import count_tokens
from service import FakeEmbedder, Item, MemorySearcher, ServiceSettings, create_app
from service.embedders import TorchEmbedder
from service.generators import FakeGenerator, GeneratorSlot

DIM = 8
LONG = "a yellow star in the snow, " * 40  # 280 tokens: past the 75 the model reads
SHORT = "a yellow star"  # 3 tokens


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def wait_ready(app: FastAPI) -> None:
    state = app.state.bindsearch
    slot = state.extra.get("generator")
    for _ in range(12000):
        settled = not isinstance(slot, GeneratorSlot) or slot.generator is not None
        settled = settled or slot.reason != "the generator is loading"
        if state.ready and settled:
            return
        time.sleep(0.005)
    raise AssertionError(f"never ready: {state.not_ready_reason}")


@pytest.fixture
def searcher(tmp_path: Path) -> MemorySearcher:
    items = [
        Item(0, Modality.VISION, None, caption="a cat", tags=("pets",)),
        Item(1, Modality.AUDIO, None, tags=("pets", "music")),
        Item(2, Modality.TEXT, None, caption="a caption"),
        Item(3, Modality.VISION, None, tags=("music",)),
        Item(4, Modality.DEPTH, None, tags=("pets",)),
    ]
    vectors = np.random.default_rng(0).standard_normal((len(items), DIM))
    return MemorySearcher(vectors, items, root=tmp_path)


@contextmanager
def serve(
    searcher: MemorySearcher | None, embedder: Any = None, gen: Any = None, **settings: Any
) -> Iterator[TestClient]:
    app = create_app(ServiceSettings(**settings), embedder or FakeEmbedder(DIM), searcher, gen)
    with TestClient(app) as client:
        wait_ready(app)
        yield client


@pytest.fixture
def client(searcher: MemorySearcher) -> Iterator[TestClient]:
    with serve(searcher) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> tuple[str, str]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    return err["type"], err["message"]


def ids(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


# --- a long text is cut, and the response says so ---------------------------------------------


def test_a_long_text_is_cut_and_the_search_says_so(client: TestClient) -> None:
    r = client.post("/v1/search", json={"text": LONG})
    assert r.status_code == 200, r.text  # was 413 over 2,000 characters
    (term,) = r.json()["query"]["terms"]
    assert term["tokens"] == count_tokens(LONG) == 280 and term["truncated"] is True
    r = client.post("/v1/search", json={"terms": [{"text": SHORT}, {"text": LONG, "weight": 2}]})
    terms = r.json()["query"]["terms"]
    assert [(t["tokens"], t["truncated"]) for t in terms] == [(3, False), (280, True)]
    # The case: 10,000 characters.
    r = client.post("/v1/search", json={"text": "x y " * 2500})
    assert r.status_code == 200 and r.json()["query"]["terms"][0]["truncated"] is True


def test_the_text_cap_only_bounds_the_work(client: TestClient) -> None:
    limits = client.get("/v1/info").json()["limits"]
    assert limits["max_text_chars"] == 20_000 and limits["max_text_tokens"] == 75
    kind, msg = error_of(client.post("/v1/search", json={"text": "x" * 20_001}), 413)
    assert kind == "too_large" and "20001 characters; the limit is 20000" in msg


def test_embed_and_embeddings_say_a_text_was_cut(client: TestClient) -> None:
    data = client.post("/v1/embed", json={"text": [LONG, SHORT]}).json()["data"]
    assert [(d["tokens"], d["truncated"]) for d in data] == [(280, True), (3, False)]
    r = client.post("/v1/embed", files={"file": ("a.png", png_bytes())}, data={"text": LONG})
    data = r.json()["data"]
    assert [(d["modality"], d["tokens"], d["truncated"]) for d in data] == [
        ("vision", None, None),
        ("text", 280, True),
    ]
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    r = client.post("/v1/embeddings", json={"input": [LONG, SHORT, uri], "model": "any"})
    body = r.json()
    assert [d["truncated"] for d in body["data"]] == [True, False, None]
    assert body["usage"] == {"prompt_tokens": 75 + 3, "total_tokens": 75 + 3}  # tokens read


def test_generate_says_a_text_was_cut(searcher: MemorySearcher) -> None:
    with serve(searcher, gen=FakeGenerator(DIM)) as c:
        r = c.post("/v1/generate", json={"terms": [{"text": SHORT}, {"text": LONG}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-text-truncated"] == "1:280"  # term 1, of 280 tokens
        r = c.post("/v1/generate", json={"text": SHORT})
        assert r.status_code == 200 and "x-text-truncated" not in r.headers


def test_the_real_model_reads_the_first_tokens_only() -> None:
    enc = load_encoder(resolve_model("imagebind_test", random_weights=True), modalities=["text"])
    embedder = TorchEmbedder(enc)
    assert embedder.info.max_text_tokens == 75
    longer = LONG + "and a dog barking at the moon " * 300  # 11,000 characters more
    with serve(None, embedder=embedder, max_text_chars=30_000) as c:
        r = c.post("/v1/embed", json={"text": [LONG, longer, SHORT]})
        assert r.status_code == 200, r.text  # over the encoders' own 20,000-character default
        data = r.json()["data"]
    assert [d["truncated"] for d in data] == [True, True, False]
    a, b, short = (np.array(d["embedding"]) for d in data)
    np.testing.assert_allclose(a, b, atol=1e-6)  # the same first 75 tokens: the same vector
    assert not np.allclose(a, short, atol=1e-3)


# --- tags, and its alias tag --------------------------------------------------------------------


def test_tags_and_its_alias_tag(client: TestClient) -> None:
    canonical = client.post("/v1/search", json={"text": "x", "tags": ["pets"]})
    alias = client.post("/v1/search", json={"text": "x", "tag": ["pets"]})
    assert ids(canonical) == ids(alias) and sorted(ids(alias)) == [0, 1, 4]
    assert alias.json()["query"]["tags"] == ["pets"]
    kind, msg = error_of(
        client.post("/v1/search", json={"text": "x", "tags": ["pets"], "tag": ["music"]}), 400
    )
    assert kind == "malformed_request" and "give `tags` or its alias `tag`, not both" in msg
    f = {"file": ("a.png", png_bytes())}
    canonical = client.post("/v1/search", files=f, data={"tags": "pets,music"})
    alias = client.post("/v1/search", files=f, data={"tag": ["pets", "music"]})
    assert ids(canonical) == ids(alias) == [1]
    r = client.post("/v1/search", files=f, data={"tags": "pets", "tag": "music"})
    kind, msg = error_of(r, 400)
    assert kind == "malformed_request" and "not both" in msg


# --- item_id in multipart -----------------------------------------------------------------------


def test_item_id_in_multipart_as_in_json(client: TestClient) -> None:
    alone = client.post("/v1/search", files={"item_id": (None, "1")})
    assert ids(alone) == ids(client.post("/v1/search", json={"item_id": 1}))
    assert 1 not in ids(alone)  # the item used as a term is left out
    png = png_bytes()
    mixed = client.post(
        "/v1/search",
        files=[("file", ("a.png", png)), ("item_id", (None, "1")), ("item_id", (None, "3"))],
        data={"weights": ["1.0", "-0.5", "0.25"]},
    )
    terms = [
        {"data": base64.b64encode(png).decode(), "filename": "a.png", "weight": 1.0},
        {"item_id": 1, "weight": -0.5},
        {"item_id": 3, "weight": 0.25},
    ]
    as_json = client.post("/v1/search", json={"terms": terms})
    assert mixed.json()["results"] == as_json.json()["results"]
    echo = mixed.json()["query"]["terms"]
    assert [(t["kind"], t["item_id"], t["weight"]) for t in echo] == [
        ("file", None, 1.0),
        ("item", 1, -0.5),
        ("item", 3, 0.25),
    ]
    assert echo[1]["modality"] == "audio"
    # Comma-separated, as the other fields.
    both = client.post("/v1/search", files={"item_id": (None, "1,3")})
    pair = client.post("/v1/search", json={"terms": [{"item_id": 1}, {"item_id": 3}]})
    assert ids(both) == ids(pair)
    kind, msg = error_of(client.post("/v1/search", files={"item_id": (None, "one")}), 400)
    assert kind == "malformed_request" and "form.item_id" in msg
    assert error_of(client.post("/v1/search", files={"item_id": (None, "999")}), 404)[0] == (
        "not_found"
    )
    r = client.post("/v1/search", files={"item_id": (None, "1")}, data={"weights": ["1", "2"]})
    kind, msg = error_of(r, 400)
    assert "2 weights for 1 terms" in msg


# --- a .txt upload is text ----------------------------------------------------------------------


def test_a_text_file_upload_is_read_as_text(client: TestClient) -> None:
    fake = FakeEmbedder(DIM)
    for modality in ("text", None):  # given, or detected from the .txt name
        data = {} if modality is None else {"modality": modality}
        r = client.post("/v1/embed", files={"file": ("note.txt", SHORT.encode())}, data=data)
        assert r.status_code == 200, r.text
        (d,) = r.json()["data"]
        assert (d["modality"], d["tokens"], d["truncated"]) == ("text", 3, False)
        np.testing.assert_allclose(d["embedding"], fake.vector_for("text", SHORT), atol=1e-6)
        r = client.post("/v1/search", files={"file": ("note.txt", SHORT.encode())}, data=data)
        assert r.status_code == 200, r.text
        assert r.json()["query"]["terms"][0]["modality"] == "text"
    r = client.post(
        "/v1/search", files={"file": ("long.txt", LONG.encode())}, data={"modality": "text"}
    )
    assert r.json()["query"]["terms"][0]["truncated"] is True
    for route in ("/v1/search", "/v1/embed"):
        r = client.post(
            route, files={"file": ("bad.txt", b"\xff\xfe\xfa caf\xe9")}, data={"modality": "text"}
        )
        kind, msg = error_of(r, 422)
        assert kind == "invalid_content" and "'bad.txt': a text file must be UTF-8" in msg
        r = client.post(route, files={"file": ("blank.txt", b"  \n ")}, data={"modality": "text"})
        assert "holds no text" in error_of(r, 422)[1]
        big = ("x" * 20_001).encode()
        r = client.post(route, files={"file": ("big.txt", big)}, data={"modality": "text"})
        assert error_of(r, 413)[0] == "too_large"
