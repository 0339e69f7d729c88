"""The README's first command: `bindsearch serve` with no model and no index serves the demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("cache")
    port = _free_port()
    env = {**os.environ, "BINDSEARCH_CACHE": str(cache), "BINDSEARCH_DEMO_SAMPLES": "8"}
    for key in (
        "BINDSEARCH_INDEX",
        "BINDSEARCH_CHECKPOINT",
        "BINDSEARCH_CONFIG",
        "BINDSEARCH_API_KEY",
        "BINDSEARCH_RANDOM_WEIGHTS",
    ):
        env.pop(key, None)
    # `python -m bindsearch`: the console script's own entry point (bindsearch.cli:main, pinned
    # in tests/test_architecture.py), whatever script an older install left in the venv
    cmd = [sys.executable, "-m", "bindsearch"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"serve exited with {proc.returncode}:\n{out[-3000:]}")
            try:
                if _get(base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the demo server did not become ready")
        yield base, cache
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_no_argument_serve_uses_demo_model_and_index(demo_server) -> None:  # type: ignore[no-untyped-def]
    base, cache = demo_server
    status, info = _get(base + "/v1/info")
    assert status == 200
    text = json.dumps(info)
    assert "imagebind_demo" in text and "Apache-2.0" in text
    # 8 samples x (image, depth, thermal, audio, video, imu) + each video's soundtrack.
    status, res = _get(base + "/v1/search", {"text": "a red ring in the desert", "k": 5})
    assert status == 200, res
    assert len(res["results"]) == 5
    assert {r["modality"] for r in res["results"]} <= {
        "vision",
        "depth",
        "thermal",
        "audio",
        "video",
        "imu",
    }
    assert all(r["caption"] for r in res["results"])
    assert (cache / "demo").is_dir()


def test_serving_an_index_of_another_model_is_refused(tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from bindsearch.cli import app

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(corpus / "red.png")
    runner = CliRunner()
    built = runner.invoke(
        app,
        [
            "index",
            "build",
            str(corpus),
            "-o",
            str(tmp_path / "idx"),
            "--checkpoint",
            "none",
            "--config",
            "imagebind_test",
            "--workers",
            "0",
        ],
    )
    assert built.exit_code == 0, built.output
    # The same architecture with other (the shipped demo) weights: refused in one line.
    served = runner.invoke(
        app,
        ["serve", "--index", str(tmp_path / "idx"), "--config", "imagebind_demo", "--port", "0"],
    )
    assert served.exit_code == 1
    lines = [line for line in served.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), served.output
    assert "model" in lines[0].lower()
