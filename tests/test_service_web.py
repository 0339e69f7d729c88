"""The web page at ``/`` in a real browser: Debian's chromium driven by Playwright.

The server is ``bindsearch serve`` with no model and no index: the shipped demo model over a
small demo index of all six media modalities, built into a temporary cache on first start.
An API key is set, so the page must send it for searches and for every media preview.
Leaves a screenshot at ``tests/artifacts/web.png``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

KEY = "web-key"
ARTIFACTS = Path(__file__).with_name("artifacts")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000  # generous: element waits only, never timed assertions


@contextmanager
def _page(tmp_path: Path, errors: list[str]) -> Iterator[sync_api.Page]:
    """A page of chromium with a new, empty profile (1280x800), its page errors into ``errors``."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=BROWSER_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("web")
    port = _free_port()
    env = {
        **os.environ,
        "BINDSEARCH_CACHE": str(tmp / "cache"),
        "BINDSEARCH_DEMO_SAMPLES": "8",
        "BINDSEARCH_API_KEY": KEY,
    }
    for name in (
        "BINDSEARCH_INDEX",
        "BINDSEARCH_CHECKPOINT",
        "BINDSEARCH_CONFIG",
        "BINDSEARCH_RANDOM_WEIGHTS",
    ):
        env.pop(name, None)
    log = tmp / "server.log"
    cmd = [
        sys.executable,
        "-c",
        "from bindsearch.cli import main; main()",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _ready(url):
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server never became ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _red_ring(path: Path) -> Path:
    img = Image.new("RGB", (64, 64), (235, 238, 242))
    ImageDraw.Draw(img).ellipse((14, 14, 50, 50), outline=(210, 30, 30), width=8)
    img.save(path)
    return path


# What each modality's preview must be, once loaded (JS, on the result's preview box).
_PREVIEW_OK = """box => {
  const m = box.closest('.result').dataset.modality;
  const img = box.querySelector('img');
  if (m === 'vision') return !!img && img.complete && img.naturalWidth > 0;
  if (m === 'video') return !!box.querySelector('video[controls]');
  if (m === 'audio') return !!box.querySelector('audio[controls]');
  if (m === 'depth' || m === 'thermal') return !!box.querySelector('canvas.map');
  if (m === 'imu') return !!box.querySelector('canvas.plot');
  return true;
}"""


def test_web_page_search_upload_and_mix(server: str, tmp_path: Path) -> None:
    ring = _red_ring(tmp_path / "ring.png")
    errors: list[str] = []
    with _page(tmp_path, errors) as page:
        page.goto(server + "/")
        assert page.title() == "bindsearch"

        # The key: /v1/info answers 401, the key box opens; the key goes to localStorage.
        page.wait_for_selector("#key-box[open]")
        page.get_by_label("Key (sent as").fill(KEY)
        page.get_by_role("button", name="Save").click()
        sync_api.expect(page.locator("#model-info")).to_contain_text("56 items")

        # Text: every item comes back, each with the preview of its modality.
        page.get_by_label("Text of term 1").fill("a red ring in the snow")
        page.locator("#k").fill("60")
        page.get_by_role("button", name="Search").click()
        results = page.locator("#results > li.result")
        sync_api.expect(results).to_have_count(56)
        modalities = set(results.evaluate_all("els => els.map(e => e.dataset.modality)"))
        assert modalities == {"vision", "video", "audio", "depth", "thermal", "imu"}
        page.wait_for_function(
            f"() => [...document.querySelectorAll('.result .preview')].every({_PREVIEW_OK})"
        )
        first = results.first
        assert float(first.locator(".score").inner_text()) > 0
        assert first.locator(".caption").inner_text()
        assert first.locator(".tags li").count() >= 1
        segment = page.locator(".result[data-modality=video] .segment").first.inner_text()
        assert segment.startswith("00:00–00:0"), segment
        sync_api.expect(page.locator("#echo")).to_contain_text("“a red ring in the snow”")

        # The default order: every modality interleaved by calibrated relevance (issue
        # #18), each result showing it beside its cosine, and the page says what it means.
        relevance = results.evaluate_all(
            "els => els.map(e => parseFloat("
            "e.querySelector('.relevance').textContent.replace('relevance ', '')))"
        )
        assert relevance == sorted(relevance, reverse=True), relevance
        assert all(0.0 <= r <= 1.0 for r in relevance), relevance
        sync_api.expect(page.locator("#score-help")).to_contain_text("calibrated per pair")
        # Grouped: each modality's top k under its own heading, one list after another.
        page.locator("#merge").select_option("per_modality")
        page.locator("#k").fill("3")
        page.get_by_role("button", name="Search").click()
        sync_api.expect(page.locator("#echo")).to_contain_text("grouped by modality")
        heads = page.locator("#results > li.group h3")
        sync_api.expect(heads).to_have_count(6)
        sync_api.expect(results).to_have_count(18)
        mods = results.evaluate_all("els => els.map(e => e.dataset.modality)")
        assert all(mods[i : i + 3] == [mods[i]] * 3 for i in range(0, 18, 3)), mods
        assert [h.lower() for h in heads.all_inner_texts()] == mods[::3]  # CSS capitalises
        page.locator("#merge").select_option("calibrated")

        # An image through the file input, alone: the modality is sniffed by the server.
        page.get_by_role("button", name="Remove term 1").click()
        page.locator("#file-input").set_input_files(str(ring))
        page.locator("#k").fill("12")
        page.get_by_role("button", name="Search").click()
        sync_api.expect(page.locator("#echo")).to_contain_text("ring.png (vision")
        sync_api.expect(results).to_have_count(12)

        # An API error is shown: the PNG declared as audio.
        page.get_by_label("Modality of ring.png").select_option("audio")
        page.get_by_role("button", name="Search").click()
        alert = page.get_by_role("alert")
        sync_api.expect(alert).to_be_visible()
        sync_api.expect(alert).to_contain_text("HTTP 4")
        page.get_by_label("Modality of ring.png").select_option("")

        # A mix: the image, minus some text, plus a result used as a query term.
        page.get_by_role("button", name="Add a text term").click()
        page.get_by_label("Text of term 3").fill("snow")
        page.get_by_label("Weight of term 3").fill("-0.5")
        used = results.nth(1).get_attribute("data-id")
        results.nth(1).get_by_role("button", name="Use as query").click()
        page.get_by_label("Weight of term 4").fill("0.5")
        page.get_by_role("button", name="Search").click()
        echo = page.locator("#echo")
        sync_api.expect(echo).to_contain_text(f"item #{used}")
        assert "1 × ring.png (vision" in echo.inner_text()
        assert "−0.5 × “snow”" in echo.inner_text()
        sync_api.expect(alert).to_be_hidden()
        sync_api.expect(results).to_have_count(12)
        ids = results.evaluate_all("els => els.map(e => e.dataset.id)")
        assert used not in ids  # an item used as a term is left out of its results
        page.wait_for_function(
            f"() => [...document.querySelectorAll('.result .preview')].every({_PREVIEW_OK})"
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web.png"), full_page=True)
    assert not errors, errors
    assert np.asarray(Image.open(ARTIFACTS / "web.png")).std() > 10  # not a blank page


@pytest.fixture(scope="module")
def gen_server() -> Iterator[tuple[str, object]]:
    """An in-process server with a fake model and a fake generator (hash-based images)."""
    import threading

    import uvicorn

    from service import FakeEmbedder, ServiceSettings, create_app
    from service.generators import FakeGenerator

    gen = FakeGenerator(8, size=32)
    app = create_app(ServiceSettings(), FakeEmbedder(8), None, gen)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("the in-process server never became ready")
            time.sleep(0.05)
        yield url, gen
    finally:
        server.should_exit = True
        thread.join(30)


def test_web_page_generate_panel(gen_server: tuple[str, object], tmp_path: Path) -> None:
    from service import FakeEmbedder
    from service.generators import FakeGenerator

    url, gen = gen_server
    assert isinstance(gen, FakeGenerator)
    errors: list[str] = []
    with _page(tmp_path, errors) as page:
        page.goto(url + "/")
        sync_api.expect(page.locator("#generator-info")).to_contain_text("by fake (32×32")
        page.get_by_label("Text of term 1").fill("a red ring in the snow")
        page.locator("#seed").fill("3")
        page.get_by_role("button", name="Generate image").click()
        img = page.get_by_role("img", name="Image generated from the query (seed 3)")
        sync_api.expect(img).to_be_visible()
        page.wait_for_function(
            "() => { const i = document.querySelector('#generated-image');"
            " return i.complete && i.naturalWidth === 32; }"
        )
        sync_api.expect(page.locator("#generated-caption")).to_have_text("fake · seed 3")
        # The page drew exactly the generator's image for this text and seed.
        shown = page.evaluate(
            """() => { const i = document.querySelector('#generated-image');
            const c = document.createElement('canvas'); c.width = 32; c.height = 32;
            const x = c.getContext('2d'); x.drawImage(i, 0, 0);
            return Array.from(x.getImageData(0, 0, 32, 32).data); }"""
        )
        rgba = np.asarray(shown, np.uint8).reshape(32, 32, 4)
        v = FakeEmbedder(8).vector_for("text", "a red ring in the snow")
        want = np.asarray(gen.image_for(v, seed=3))
        np.testing.assert_array_equal(rgba[..., :3], want)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-generate.png"), full_page=True)
    assert not errors, errors


def test_web_page_shows_the_calibration_note(server: str, tmp_path: Path) -> None:
    # The demo index is calibrated: no note. A search answer that carries one (an index whose
    # query tower changed since its calibration; the service test makes one for real) shows it
    # above the results; the next answer without one hides it again.
    note = (
        "the index at /idx was calibrated with another text tower: the text->vision pairs "
        "are stale and ranked by raw cosine; `bindsearch index sync` with this model measures "
        "them again"
    )
    errors: list[str] = []
    with _page(tmp_path, errors) as page:
        page.goto(server + "/")
        page.evaluate(f"localStorage.setItem('bindsearch.apiKey', {KEY!r})")
        page.reload()
        box = page.locator("#calibration-note")
        page.get_by_label("Text of term 1").fill("a red ring")
        page.get_by_role("button", name="Search").click()
        sync_api.expect(page.locator("#echo")).to_contain_text("“a red ring”")
        sync_api.expect(box).to_be_hidden()

        def with_note(route: sync_api.Route) -> None:
            answer = route.fetch()
            body = answer.json()
            assert body["calibration_note"] is None  # the real answer: calibrated
            route.fulfill(response=answer, json={**body, "calibration_note": note})

        page.route("**/v1/search", with_note)
        page.get_by_role("button", name="Search").click()
        sync_api.expect(box).to_be_visible()
        sync_api.expect(box).to_contain_text("Not calibrated: " + note)
        page.unroute("**/v1/search")
        page.get_by_role("button", name="Search").click()
        sync_api.expect(box).to_be_hidden()
    assert errors == []


def test_docs_render_offline_under_their_csp(server: str, tmp_path: Path) -> None:
    # Swagger UI from installed files: this browser reaches no CDN (closed network) and the page's
    # CSP allows only this server, so operations show only if nothing had to come from outside.
    errors: list[str] = []
    outside: list[str] = []
    with _page(tmp_path, errors) as page:
        page.on("request", lambda r: outside.append(r.url) if r.url[:5] == "https" else None)
        page.goto(server + "/docs")
        page.wait_for_selector(".opblock-summary-path")
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert any("/v1/search" in p for p in paths), paths
    assert errors == [] and outside == []
