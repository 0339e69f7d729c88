"""End to end: the real server (``bindsearch serve``, uvicorn, the tiny random model) over HTTP.

The index is a JSONL of generated media embedded here with the same seeded random weights,
so every upload must find its own item first. Also: the ``openai`` client, auth, media
(path traversal included), the no-index mode, and a bounded load test against a small queue.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soundfile
from PIL import Image

from encoders import load_encoder

KEY = "e2e-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = "imagebind_test"
QUEUE = 8
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Server:
    url: str
    port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class _Proc:
    proc: subprocess.Popen[bytes]
    log: Path


def _start(
    tmp: Path,
    args: list[str],
    env: dict[str, str],
    port_by_env: bool = False,
    wait_for: str = "/readyz",
    log_level: str = "warning",
) -> tuple[Server, _Proc]:
    """``serve`` on a free port (``--port``, or ``BINDSEARCH_PORT`` with ``port_by_env``),
    once ``wait_for`` answers 200 (``/readyz``: ready; ``/healthz``: up, ready or not)."""
    port = _free_port()
    port_args = ["--port", str(port)]
    if port_by_env:
        env = {**env, "BINDSEARCH_PORT": str(port), "BINDSEARCH_HOST": "127.0.0.1"}
        port_args = []
    log = tmp / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-c",
        "from bindsearch.cli import main; main()",
        "serve",
        "--random-weights",
        "--config",
        CONFIG,
        *port_args,
        "--log-level",
        log_level,
        *args,
    ]
    with log.open("wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO
        )
    server = Server(f"http://127.0.0.1:{port}", port)
    # Wait for readiness (model loaded and warmed up), or for the process to give up.
    for _ in range(1200):
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}{wait_for}", timeout=5).status_code == 200:
                return server, _Proc(proc, log)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server never became ready:\n{log.read_text()}")


def _stop(p: _Proc) -> None:
    p.proc.terminate()
    try:
        p.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.proc.kill()
        p.proc.wait()


# ----------------------------------------------------------------------------- corpus


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _wav(freq: float, seconds: float = 2.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    soundfile.write(buf, wave, 16000, format="WAV")
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _mp4(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=10)
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"  # type: ignore[union-attr]
        for _ in range(20):
            img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))  # type: ignore[union-attr]
        out.mux(vs.encode())  # type: ignore[union-attr]
    return buf.getvalue()


@dataclass(frozen=True)
class Media:
    id: int
    modality: str
    name: str
    data: bytes
    explicit: bool  # the upload names its modality (depth, thermal: not sniffable)


def _media() -> list[Media]:
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noqa: E731
    grey = lambda: rng.integers(0, 255, (64, 64), dtype=np.uint8)  # noqa: E731
    return [
        Media(0, "vision", "red.png", _png(np.full((64, 64, 3), (220, 20, 20), np.uint8)), False),
        Media(1, "vision", "noise.png", _png(img()), False),
        Media(2, "audio", "a440.wav", _wav(440.0), False),
        Media(3, "audio", "a880.wav", _wav(880.0, 3.0), False),
        Media(4, "video", "clip.mp4", _mp4(0), False),
        Media(5, "depth", "depth.npy", _npy(rng.uniform(0.5, 5, (64, 64)).astype("f4")), True),
        Media(6, "thermal", "heat.png", _png(grey()), True),
        Media(7, "imu", "walk.npy", _npy(rng.standard_normal((2000, 6)).astype(np.float32)), False),
    ]


TEXTS = {8: "a red square", 9: "a dog barking in the park"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Media]]:
    root = tmp_path_factory.mktemp("corpus")
    enc = load_encoder(None, config=CONFIG)  # the same seeded random weights as the server
    media = _media()
    rows = []
    for m in media:
        (root / m.name).write_bytes(m.data)
        v = enc.embed_items(m.modality, [m.data])[0]
        rows.append(
            {
                "id": m.id,
                "modality": m.modality,
                "path": m.name,
                "tags": ["generated", m.modality],
                "vector": v.tolist(),
            }
        )
    for i, text in TEXTS.items():
        v = enc.embed_items("text", [text])[0]
        rows.append(
            {
                "id": i,
                "modality": "text",
                "caption": text,
                "tags": ["caption"],
                "vector": v.tolist(),
            }
        )
    (root / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, media


@pytest.fixture(scope="module")
def server(
    corpus: tuple[Path, list[Media]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root, _ = corpus
    env = {
        "BINDSEARCH_API_KEY": KEY,
        "BINDSEARCH_MAX_QUEUE": str(QUEUE),
        "BINDSEARCH_MAX_BATCH_SIZE": "8",
        "BINDSEARCH_MAX_WAIT_MS": "20",
        "BINDSEARCH_DECODE_WORKERS": "2",
    }
    srv, proc = _start(tmp_path_factory.mktemp("logs"), ["--index", str(root / "items.jsonl")], env)
    try:
        yield srv
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("index", range(8), ids=[m.name for m in _media()])
def test_upload_each_modality_finds_itself(
    http: httpx.Client, corpus: tuple[Path, list[Media]], index: int
) -> None:
    m = corpus[1][index]
    data = {"k": "3", "target": m.modality}
    if m.explicit:
        data["modality"] = m.modality
    r = http.post("/v1/search", files={"file": (m.name, m.data)}, data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["terms"][0]["modality"] == m.modality
    top = body["results"][0]
    assert top["id"] == m.id and top["score"] > 0.999
    assert top["media_url"] == f"/v1/items/{m.id}/media"
    # Any-to-any: the same upload also returns neighbours of every other modality.
    r = http.post("/v1/search", files={"file": (m.name, m.data)}, data={**data, "target": ""})
    assert len({h["modality"] for h in r.json()["results"]}) >= 2


def test_text_item_and_mix(http: httpx.Client, corpus: tuple[Path, list[Media]]) -> None:
    r = http.post("/v1/search", json={"text": "a red square", "k": 3})
    assert r.status_code == 200
    top = r.json()["results"][0]
    assert top["id"] == 8 and top["score"] > 0.999 and top["caption"] == "a red square"

    r = http.post("/v1/search", json={"item_id": 0, "k": 5})
    ids = [h["id"] for h in r.json()["results"]]
    assert len(ids) == 5 and 0 not in ids

    wav = corpus[1][2].data
    terms = [
        {"text": "a red square", "weight": 1.0},
        {"item_id": 1, "weight": -0.5},
        {"data": base64.b64encode(wav).decode(), "modality": "audio", "weight": 1.0},
    ]
    r = http.post("/v1/search", json={"terms": terms, "k": 4, "tags": ["generated"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [t["kind"] for t in body["query"]["terms"]] == ["text", "item", "data"]
    assert all("generated" in h["tags"] for h in body["results"])
    assert 1 not in [h["id"] for h in body["results"]]


def test_openai_client(server: Server) -> None:
    from openai import OpenAI

    enc = load_encoder(None, config=CONFIG)
    wav = _wav(440.0)
    uri = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    with OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        out = client.embeddings.create(model="imagebind", input=["a red square", uri])
        assert [d.index for d in out.data] == [0, 1]
        text_v = np.array(out.data[0].embedding, np.float32)
        np.testing.assert_allclose(text_v, enc.embed_items("text", ["a red square"])[0], atol=1e-5)
        audio_v = np.array(out.data[1].embedding, np.float32)
        np.testing.assert_allclose(audio_v, enc.embed_items("audio", [wav])[0], atol=1e-5)
        single = client.embeddings.create(model="x", input="hello", encoding_format="float")
        assert len(single.data[0].embedding) == 16
        assert abs(np.linalg.norm(single.data[0].embedding) - 1) < 1e-5


def test_auth_on(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/search", json={"text": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    wrong = {"Authorization": "Bearer x"}
    r = httpx.post(f"{server.url}/v1/search", json={"text": "a"}, headers=wrong)
    assert r.status_code == 401
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_info_and_items(http: httpx.Client) -> None:
    info = http.get("/v1/info").json()
    assert info["model"]["dim"] == 16 and "random" in info["model"]["licence"]
    assert sum(i["count"] for i in info["indexes"]) == 10
    assert http.get("/v1/items/9").json()["caption"] == TEXTS[9]


def test_media_only_for_indexed_items(
    server: Server, http: httpx.Client, corpus: tuple[Path, list[Media]]
) -> None:
    m = corpus[1][0]
    r = http.get(f"/v1/items/{m.id}/media")
    assert r.status_code == 200 and r.content == m.data
    assert r.headers["content-type"] == "image/png"
    assert http.get("/v1/items/8/media").status_code == 404  # a caption: no file
    assert http.get("/v1/items/77/media").status_code == 404
    # Raw paths, sent as they are (no client-side normalisation of dot segments).
    for path in [
        "/v1/items/..%2F..%2F..%2Fetc%2Fpasswd/media",
        "/v1/items/../../../../etc/passwd",
        "/v1/items/0/../../../../etc/passwd",
        "/v1/items/0/media/../../../../../etc/passwd",
        "/v1/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/media",
        "/v1/items/0%00/media",
        "/v1/items/items.jsonl/media",
    ]:
        conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", path, headers=AUTH)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert 400 <= resp.status < 500, (path, resp.status)
        assert b"root:" not in body and b'"vector"' not in body


def _batch_counts(metrics: str, modality: str) -> tuple[float, float]:
    """(batches of size 1, all batches) from the batch-size histogram."""
    bucket = rf'bindsearch_batch_size_bucket{{le="1.0",modality="{modality}"}}'
    ones = re.search(bucket + r" (\S+)", metrics)
    count = re.search(rf'bindsearch_batch_size_count{{modality="{modality}"}} (\S+)', metrics)
    return (float(ones[1]) if ones else 0.0, float(count[1]) if count else 0.0)


def test_load_sheds_with_429_and_batches(server: Server, http: httpx.Client) -> None:
    """64 concurrent clients x 3 requests against a queue of 8: every one answered, 200 or 429."""
    before = _batch_counts(http.get("/metrics").text, "text")
    clients, per_client = 64, 3

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(
            base_url=server.url, headers=AUTH, timeout=60, limits=limits
        ) as c:

            async def one_client(i: int) -> list[int]:
                codes = []
                for j in range(per_client):
                    r = await c.post("/v1/embed", json={"text": f"load {i} {j}"})
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1
                    codes.append(r.status_code)
                return codes

            results = await asyncio.gather(*(one_client(i) for i in range(clients)))
        return [code for codes in results for code in codes]

    codes = asyncio.run(main())
    assert len(codes) == clients * per_client
    assert set(codes) <= {200, 429}, sorted(set(codes))
    assert 200 in codes
    after = _batch_counts(http.get("/metrics").text, "text")
    ones, batches = after[0] - before[0], after[1] - before[1]
    assert batches > ones, "no batch larger than 1 under concurrency"
    assert http.get("/readyz").status_code == 200  # still serving


def test_no_index_no_auth(tmp_path: Path) -> None:
    srv, proc = _start(tmp_path, [], {})
    try:
        r = httpx.post(f"{srv.url}/v1/embed", json={"text": ["a", "b"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        r = httpx.post(f"{srv.url}/v1/search", json={"text": "a"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "no_index"
    finally:
        _stop(proc)


def test_only_some_towers(tmp_path: Path) -> None:
    """``--modalities text`` loads the text tower alone; other inputs get a 415 that says so."""
    srv, proc = _start(tmp_path, ["--modalities", "text"], {"BINDSEARCH_TORCH_THREADS": "1"})
    try:
        assert httpx.get(f"{srv.url}/v1/info").json()["model"]["modalities"] == ["text"]
        assert httpx.post(f"{srv.url}/v1/embed", json={"text": "a"}).status_code == 200
        r = httpx.post(
            f"{srv.url}/v1/embed", files={"file": ("x.png", _png(np.zeros((8, 8, 3), np.uint8)))}
        )
        assert r.status_code == 415
        assert "does not embed vision" in r.json()["error"]["message"]
    finally:
        _stop(proc)


def test_unknown_tower_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bindsearch.cli import main; main()",
            "serve",
            "--config",
            CONFIG,
            "--random-weights",
            "--modalities",
            "vision,smell",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: unknown modality 'smell'; accepted: vision, video, text, audio, depth, thermal, imu"
    ]


# ------------------------------------------------------- a real FAISS index built with the CLI


@pytest.fixture(scope="module")
def indexed(
    corpus: tuple[Path, list[Media]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, dict[str, int]]]:
    """``bindsearch index build`` over the media files, then ``serve --index`` on that index."""
    _, media = corpus
    tmp = tmp_path_factory.mktemp("real")
    files = tmp / "media"
    files.mkdir()
    for m in media:
        if not m.explicit:  # depth and thermal files are not recognisable from content alone
            (files / m.name).write_bytes(m.data)
    built = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bindsearch.cli import main; main()",
            "index",
            "build",
            str(files),
            "-o",
            str(tmp / "idx"),
            "--checkpoint",
            "none",
            "--config",
            CONFIG,
            "--workers",
            "0",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    srv, proc = _start(tmp, ["--index", str(tmp / "idx")], {"BINDSEARCH_TORCH_THREADS": "1"})
    try:
        items = httpx.post(f"{srv.url}/v1/search", json={"text": "x", "k": 100}).json()
        ids = {Path(h["path"]).name: h["id"] for h in items["results"] if h["modality"] == "vision"}
        yield srv, ids
    finally:
        _stop(proc)


def test_real_index_upload_finds_itself(
    indexed: tuple[Server, dict[str, int]], corpus: tuple[Path, list[Media]]
) -> None:
    srv, _ = indexed
    info = httpx.get(f"{srv.url}/v1/info").json()
    # 5 files; the video's soundtrack (if any) is an audio item of the same file.
    assert {i["modality"] for i in info["indexes"]} >= {"vision", "audio", "video"}
    for m in corpus[1]:
        if m.explicit:
            continue
        r = httpx.post(
            f"{srv.url}/v1/search",
            files={"file": (m.name, m.data)},
            data={"k": "1", "target": m.modality},
        )
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        assert Path(top["path"]).name == m.name and top["score"] > 0.999, (m.name, top)
        media = httpx.get(f"{srv.url}{top['media_url']}")
        assert media.status_code == 200 and media.content == m.data


def test_real_index_item_mix_and_bad_ids(indexed: tuple[Server, dict[str, int]]) -> None:
    srv, ids = indexed
    red = ids["red.png"]
    r = httpx.post(f"{srv.url}/v1/search", json={"item_id": red, "k": 3})
    assert r.status_code == 200 and red not in [h["id"] for h in r.json()["results"]]
    terms = [{"item_id": red, "weight": 1.0}, {"text": "a sound", "weight": 0.5}]
    r = httpx.post(f"{srv.url}/v1/search", json={"terms": terms, "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    # Ids that cannot exist (negative, beyond int64) are unknown items, never a 500.
    for bad in (-1, 1 << 63, 10**30):
        r = httpx.post(f"{srv.url}/v1/search", json={"item_id": bad})
        assert r.status_code == 404, (bad, r.text)
        assert httpx.get(f"{srv.url}/v1/items/{bad}").status_code == 404
        assert httpx.get(f"{srv.url}/v1/items/{bad}/media").status_code == 404


def test_port_from_environment(tmp_path: Path) -> None:
    """``BINDSEARCH_PORT`` / ``BINDSEARCH_HOST`` work like the flags (``docker run -e``)."""
    srv, proc = _start(tmp_path, [], {}, port_by_env=True)
    try:
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
    finally:
        _stop(proc)
