"""``POST /v1/generate`` and ``bindsearch generate``.

Most checks run in-process with a ``FakeEmbedder`` and a ``FakeGenerator`` (both hash-based),
so the expected vector and image are computed here. The end-to-end checks use the real stack
on tiny random models: the ``imagebind_test`` encoder and a tiny Stable unCLIP pipeline, from
an audio file to a PNG through the CLI and through the endpoint.
"""

from __future__ import annotations

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
import soundfile
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from bindsearch.cli import app as cli_app
from encoders import PRESETS, Modality
from generate.cli import QueryTerm, parse_mix
from service import FakeEmbedder, Item, MemorySearcher, ServiceSettings, create_app
from service.generators import FakeGenerator, GeneratorSlot
from service.pipeline import mix

DIM = 8
runner = CliRunner()


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def wait_ready(app: FastAPI) -> None:
    """Poll until the model is warm and the generator settled (loaded, or refused)."""
    state = app.state.bindsearch
    slot: GeneratorSlot = state.extra["generator"]
    for _ in range(12000):
        settled = slot.generator is not None or slot.reason != "the generator is loading"
        if state.ready and settled:
            return
        time.sleep(0.005)
    raise AssertionError(f"never ready: {state.not_ready_reason} / {slot.reason}")


@contextmanager
def serve(
    gen: Any = None,
    searcher: MemorySearcher | None = None,
    embedder: Any = None,
    **settings: Any,
) -> Iterator[TestClient]:
    app = create_app(ServiceSettings(**settings), embedder or FakeEmbedder(DIM), searcher, gen)
    with TestClient(app) as client:
        wait_ready(app)
        yield client


@pytest.fixture
def searcher(tmp_path: Path) -> MemorySearcher:
    items = [Item(0, Modality.VISION, None, caption="a cat"), Item(1, Modality.AUDIO, None)]
    vectors = np.random.default_rng(0).standard_normal((2, DIM))
    return MemorySearcher(vectors, items, root=tmp_path)


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return str(body["error"]["type"])


def pixels(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img)


# ----------------------------------------------------------------------------- fake generator


def test_text_to_png(searcher: MemorySearcher) -> None:
    gen = FakeGenerator(DIM)
    with serve(gen, searcher) as c:
        r = c.post("/v1/generate", json={"text": "a dog", "seed": 7})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert r.headers["x-generator"] == "fake" and r.headers["x-seed"] == "7"
        v = FakeEmbedder(DIM).vector_for("text", "a dog")
        np.testing.assert_array_equal(pixels(r.content), np.asarray(gen.image_for(v, 7)))
        (vec, seed, steps) = gen.calls[-1]
        np.testing.assert_allclose(vec[0], v, atol=1e-6)
        assert (seed, steps) == (7, None)
        again = c.post("/v1/generate", json={"text": "a dog", "seed": 7})
        assert again.content == r.content  # same query, same seed: same image
        other = c.post("/v1/generate", json={"text": "a dog", "seed": 8, "steps": 3})
        assert other.status_code == 200 and other.content != r.content
        assert gen.calls[-1][1:] == (8, 3)
        info = c.get("/v1/info").json()
        assert info["generator"] == {
            "name": "fake",
            "licence": "none (test images)",
            "dim": DIM,
            "image_size": 16,
            "default_steps": 1,
            "model_sha256": None,
        }
        assert info["limits"]["max_generate_steps"] == 100


def test_weighted_mix_json_and_multipart(searcher: MemorySearcher) -> None:
    gen = FakeGenerator(DIM)
    fake = FakeEmbedder(DIM)
    png = png_bytes()
    with serve(gen, searcher) as c:
        terms = [
            {"text": "snow", "weight": -0.5},
            {"data": base64.b64encode(png).decode(), "modality": "vision", "weight": 1.0},
            {"item_id": 1, "weight": 2.0},
        ]
        r = c.post("/v1/generate", json={"terms": terms})
        assert r.status_code == 200, r.text
        parts = np.stack(
            [
                fake.vector_for("text", "snow"),
                fake.vector_for("vision", png),
                searcher.item_vector(1),
            ]
        )
        want = parts.T @ np.array([-0.5, 1.0, 2.0])
        np.testing.assert_allclose(gen.calls[-1][0][0], want / np.linalg.norm(want), atol=1e-6)
        np.testing.assert_allclose(gen.calls[-1][0][0], mix(parts, [-0.5, 1.0, 2.0]), atol=1e-6)

        wav = b"RIFF-not-really"
        files = [("file", ("a.png", png, "image/png")), ("file", ("b.wav", wav, "audio/wav"))]
        data = {"weights": ["1", "0.25"], "modality": ["vision,audio"], "seed": "4", "steps": "2"}
        r = c.post("/v1/generate", files=files, data=data)
        assert r.status_code == 200, r.text
        want = fake.vector_for("vision", png) + 0.25 * fake.vector_for("audio", wav)
        np.testing.assert_allclose(gen.calls[-1][0][0], want / np.linalg.norm(want), atol=1e-6)
        assert gen.calls[-1][1:] == (4, 2)


@pytest.mark.parametrize(
    ("kwargs", "status", "kind", "message"),
    [
        (
            {"json": {"text": "a", "terms": [{"text": "b"}]}},
            400,
            "malformed_request",
            "exactly one",
        ),
        ({"json": {"text": "a", "k": 3}}, 400, "malformed_request", "k"),
        ({"json": {"text": "a", "seed": -1}}, 400, "malformed_request", "seed"),
        ({"json": {"text": "a", "steps": 0}}, 400, "malformed_request", "steps"),
        ({"json": {"text": "a", "steps": 101}}, 400, "malformed_request", "over the limit of 100"),
        ({"json": {"text": "  "}}, 422, "invalid_content", "empty"),
        ({"json": {"text": "BAD input"}}, 422, "invalid_content", "refused"),
        ({"json": {"item_id": 99}}, 404, "not_found", "item 99"),
        ({"json": {"data": "%%%"}}, 400, "malformed_request", "base64"),
        (
            {"json": {"terms": [{"text": "a", "weight": 1}, {"text": "a", "weight": -1}]}},
            422,
            "invalid_content",
            "cancel out",
        ),
        (
            {"content": b"a", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media",
            "multipart/form-data",
        ),
        (
            {"files": [("file", ("a.png", png_bytes(), "image/png"))], "data": {"k": "3"}},
            400,
            "malformed_request",
            "search options",
        ),
        (
            {"files": [("file", ("a.png", png_bytes(), "image/png"))], "data": {"seed": "x"}},
            400,
            "malformed_request",
            "form.seed",
        ),
        ({"files": {"seed": (None, "1")}}, 400, "malformed_request", "no file"),
    ],
)
def test_bad_requests(
    searcher: MemorySearcher, kwargs: dict[str, Any], status: int, kind: str, message: str
) -> None:
    gen = FakeGenerator(DIM)
    with serve(gen, searcher) as c:
        r = c.post("/v1/generate", **kwargs)
        assert error_of(r, status) == kind
        assert message in r.json()["error"]["message"]
    assert gen.calls == []  # nothing reached the generator


def test_no_generator_is_503(searcher: MemorySearcher, tmp_path: Path) -> None:
    # Default settings with a model that is not the demo model: no generator.
    with serve(None, searcher) as c:
        r = c.post("/v1/generate", json={"text": "a"})
        assert error_of(r, 503) == "no_generator"
        assert "BINDSEARCH_GENERATOR" in r.json()["error"]["message"]
        assert c.get("/v1/info").json()["generator"] is None
        assert c.post("/v1/search", json={"text": "a"}).status_code == 200  # search still works
    with serve(None, searcher, generator="none") as c:
        assert error_of(c.post("/v1/generate", json={"text": "a"}), 503) == "no_generator"
    # A generator that cannot load: the reason is given; search still works.
    with serve(None, searcher, generator=str(tmp_path / "no-such-pipeline")) as c:
        r = c.post("/v1/generate", json={"text": "a"})
        assert error_of(r, 503) == "no_generator"
        assert "could not be loaded" in r.json()["error"]["message"]
        assert c.post("/v1/search", json={"text": "a"}).status_code == 200
    # A generator of another width is refused.
    with serve(FakeGenerator(16), searcher) as c:
        r = c.post("/v1/generate", json={"text": "a"})
        assert error_of(r, 503) == "no_generator"
        assert "takes 16-d embeddings but the model makes 8-d" in r.json()["error"]["message"]
    # Item ids need an index; text does not.
    with serve(FakeGenerator(DIM), None) as c:
        assert error_of(c.post("/v1/generate", json={"item_id": 0}), 503) == "no_index"
        assert c.post("/v1/generate", json={"text": "a"}).status_code == 200


def test_generation_never_blocks_search_and_sheds_load(searcher: MemorySearcher) -> None:
    gate = threading.Event()
    gen = FakeGenerator(DIM, gate=gate)
    with serve(gen, searcher, max_generate_queue=1) as c:
        out: list[httpx.Response] = []
        t = threading.Thread(target=lambda: out.append(c.post("/v1/generate", json={"text": "a"})))
        t.start()
        try:
            assert gen.entered.wait(30)  # the generation holds the generator thread
            # Searches and embeddings go on meanwhile; a second generation is over the cap.
            assert c.post("/v1/search", json={"text": "b"}).status_code == 200
            assert c.post("/v1/embed", json={"text": "b"}).status_code == 200
            r = c.post("/v1/generate", json={"text": "c"})
            assert error_of(r, 429) == "overloaded" and r.headers["retry-after"] == "1"
        finally:
            gate.set()
            t.join(30)
        assert out[0].status_code == 200
        assert c.post("/v1/generate", json={"text": "c"}).status_code == 200


def test_generator_failure_is_503(searcher: MemorySearcher) -> None:
    class Broken(FakeGenerator):
        def generate(self, embeddings: np.ndarray, **kw: Any) -> list[Image.Image]:
            raise RuntimeError("out of memory")

    with serve(Broken(DIM), searcher) as c:
        r = c.post("/v1/generate", json={"text": "a"})
        assert error_of(r, 503) == "model_failed"
        assert "out of memory" in r.json()["error"]["message"]


def test_api_key(searcher: MemorySearcher) -> None:
    with serve(FakeGenerator(DIM), searcher, api_key="k") as c:
        assert error_of(c.post("/v1/generate", json={"text": "a"}), 401) == "unauthorized"
        r = c.post("/v1/generate", json={"text": "a"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200


# ----------------------------------------------------------------------------- CLI syntax


@pytest.mark.parametrize(
    ("spec", "term"),
    [
        ("text:a dog", QueryTerm(Modality.TEXT, "a dog", 1.0)),
        ("text:a dog:0.5", QueryTerm(Modality.TEXT, "a dog", 0.5)),
        ("audio:rain.wav:-1", QueryTerm(Modality.AUDIO, "rain.wav", -1.0)),
        ("text:ratio 3:2:1", QueryTerm(Modality.TEXT, "ratio 3:2", 1.0)),
        ("vision:C:/photos/dog.jpg", QueryTerm(Modality.VISION, "C:/photos/dog.jpg", 1.0)),
        ("vision:C:/photos/dog.jpg:2", QueryTerm(Modality.VISION, "C:/photos/dog.jpg", 2.0)),
    ],
)
def test_mix_syntax(spec: str, term: QueryTerm) -> None:
    assert parse_mix(spec) == term


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a dog", "expected MODALITY:VALUE[:WEIGHT]"),
        ("text:", "expected MODALITY:VALUE[:WEIGHT]"),
        ("smell:rose", "unknown modality 'smell'"),
        ("text:a:inf", "finite"),
    ],
)
def test_mix_syntax_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_mix(spec)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "x.png"], "give exactly one of --modality"),
        (["--text", "a", "--mix", "text:b", "-o", "x.png"], "give exactly one of --modality"),
        (["--text", "a", "-o", "x.jpg"], "name it *.png"),
        (["--modality", "audio", "missing.wav", "-o", "x.png"], "audio file missing.wav does not"),
        (["--modality", "smell", "rose", "-o", "x.png"], "unknown modality 'smell'"),
        (["--mix", "nonsense", "-o", "x.png"], "expected MODALITY:VALUE"),
        (["--text", " ", "-o", "x.png"], "the text is empty"),
    ],
)
def test_cli_bad_input(args: list[str], message: str, tmp_path: Path) -> None:
    r = runner.invoke(cli_app, ["generate", *args])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny unCLIP pipeline, an imagebind_test checkpoint (random) and a WAV file."""
    pytest.importorskip("diffusers", reason="the generate extra is not installed")
    from safetensors.torch import save_file

    from encoders import load_encoder

    from .unclip_tiny import build_tiny_unclip

    root = tmp_path_factory.mktemp("gen-e2e")
    dim = PRESETS["imagebind_test"].embed_dim
    pipe = build_tiny_unclip(root / "pipe", dim)
    enc = load_encoder(None, config="imagebind_test")  # random, seed 0: as --random-weights
    ckpt = root / "test.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(ckpt))
    t = np.arange(16000 * 2) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t)
    wav = root / "bell.wav"
    soundfile.write(wav, wave.astype(np.float32), 16000)
    return {"pipe": pipe, "ckpt": ckpt, "wav": wav}


def _cli_png(e2e: dict[str, Path], out: Path, *extra: str) -> bytes:
    args = [
        "generate", "--modality", "audio", str(e2e["wav"]), "-o", str(out),
        "--config", "imagebind_test", "--checkpoint", str(e2e["ckpt"]),
        "--generator", str(e2e["pipe"]), "--steps", "2", *extra,
    ]  # fmt: skip
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 0, r.output
    assert f"wrote {out} (16x16, unclip:{e2e['pipe']}, seed" in r.output
    assert "CreativeML Open RAIL++-M" in r.output
    return out.read_bytes()


def test_audio_file_to_png_through_cli_and_endpoint(e2e: dict[str, Path], tmp_path: Path) -> None:
    from service.embedders import load_torch_embedder

    cli = _cli_png(e2e, tmp_path / "a.png", "--seed", "5")
    assert pixels(cli).shape == (16, 16, 3)
    assert _cli_png(e2e, tmp_path / "b.png", "--seed", "5") == cli  # deterministic
    assert _cli_png(e2e, tmp_path / "c.png", "--seed", "6") != cli

    embedder = load_torch_embedder(e2e["ckpt"], "imagebind_test", "cpu")
    wav = e2e["wav"].read_bytes()
    with serve(None, None, embedder, generator=str(e2e["pipe"]), config="imagebind_test") as c:
        info = c.get("/v1/info").json()["generator"]
        assert info["name"] == f"unclip:{e2e['pipe']}" and info["dim"] == 16
        assert "RAIL++-M" in info["licence"]
        files = [("file", ("bell.wav", wav, "audio/wav"))]
        r = c.post("/v1/generate", files=files, data={"seed": "5", "steps": "2"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        # The endpoint and the CLI embed, mix and generate alike: the same PNG pixels.
        np.testing.assert_array_equal(pixels(r.content), pixels(cli))
        body = {"data": base64.b64encode(wav).decode(), "modality": "audio", "seed": 5, "steps": 2}
        assert c.post("/v1/generate", json=body).content == r.content
        r = c.post(
            "/v1/generate",
            json={"terms": [{"data": body["data"], "weight": 1}, {"text": "dog", "weight": 0.5}],
                  "steps": 2},
        )  # fmt: skip
        assert r.status_code == 200 and pixels(r.content).shape == (16, 16, 3)


def test_cli_mix_matches_endpoint_mix(e2e: dict[str, Path], tmp_path: Path) -> None:
    from service.embedders import load_torch_embedder

    out = tmp_path / "mix.png"
    args = [
        "generate", "--mix", f"audio:{e2e['wav']}:1", "--mix", "text:dog:0.5", "-o", str(out),
        "--config", "imagebind_test", "--checkpoint", str(e2e["ckpt"]),
        "--generator", str(e2e["pipe"]), "--steps", "2",
    ]  # fmt: skip
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 0, r.output
    embedder = load_torch_embedder(e2e["ckpt"], "imagebind_test", "cpu")
    data = base64.b64encode(e2e["wav"].read_bytes()).decode()
    body = {
        "terms": [{"data": data, "modality": "audio", "weight": 1}, {"text": "dog", "weight": 0.5}],
        "steps": 2,
    }
    with serve(None, None, embedder, generator=str(e2e["pipe"]), config="imagebind_test") as c:
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.content), pixels(out.read_bytes()))


def test_cli_dim_mismatch(e2e: dict[str, Path], tmp_path: Path) -> None:
    """The demo model (64-d) with a 16-d unCLIP pipeline: a one-line error, no image."""
    out = tmp_path / "x.png"
    args = ["generate", "--text", "a dog", "-o", str(out), "--generator", str(e2e["pipe"])]
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()[-1]
    assert (
        line.startswith("error: ")
        and "takes 16-d image embeddings but the encoder makes 64-d" in line
    )
    assert not out.exists()


def test_demo_model_gets_the_demo_decoder_by_default() -> None:
    """Nothing configured, the shipped demo model: /v1/generate uses the shipped decoder."""
    from generate.decoder import demo_decoder_path
    from service.embedders import load_torch_embedder

    if not demo_decoder_path().is_file():
        pytest.skip("the demo decoder weights are not in this checkout yet")
    embedder = load_torch_embedder(None, "imagebind_demo", "cpu")
    with serve(None, None, embedder) as c:
        info = c.get("/v1/info").json()["generator"]
        assert info is not None and info["dim"] == 64, info
        r = c.post("/v1/generate", json={"text": "a red ring in the snow", "seed": 1})
        assert r.status_code == 200, r.text
        size = info["image_size"]
        assert pixels(r.content).shape == (size, size, 3)
        assert r.headers["x-generator"] == info["name"]
