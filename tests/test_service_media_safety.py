"""``GET /v1/items/{id}/media`` against hostile files, and the security headers of every route.

One real index (the tiny test model) of a manifest whose files attack the media route: HTML,
SVG and XML indexed as text, a PNG named ``x.html`` with a script in a text chunk, and files
that are replaced by symlinks or rewritten after indexing. Issue #17, defects 1 and 2 (serve
side), and the browser check: a media URL opened directly in chromium runs no script.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from encoders import Modality
from encoders.config import resolve_config
from index import ModelSource, build_index
from service import FakeEmbedder, ServiceSettings, create_app
from service.media import MEDIA_CSP, served_type
from service.searchers import Searcher, load_searcher
from service.security import page_csp

from .test_index_media import audio, image, write_test_checkpoint

CONFIG = resolve_config("imagebind_test")
SCRIPT = "<script>document.title='pwned';fetch('/pwned')</script>"
# name -> (modality in the manifest, content)
DOCUMENTS = {
    "page.html": f"<!DOCTYPE html><html><body>cats {SCRIPT}</body></html>",
    "page.htm": f"<html><body>dogs {SCRIPT}</body></html>",
    "pic.svg": (
        '<svg xmlns="http://www.w3.org/2000/svg" onload="document.title=\'pwned\'">'
        f"<text>birds</text>{SCRIPT.replace('<script>', '<script><![CDATA[')}</svg>"
    ),
    "data.xml": (
        '<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body>fish'
        f"{SCRIPT}</body></html>"
    ),
    "sneaky.txt": f"  \n  {SCRIPT} hidden in a .txt",
}
PLAIN = {
    "note.txt": "a quiet note about the sea",
    "victim_link.txt": "a file later replaced by a symlink",
    "victim_edit.txt": "a file later rewritten with other words",
    "victim_grow.txt": "a file later grown",
    "victim_gone.txt": "a file later deleted",
    "sub/victim_dir.txt": "a file whose folder is later replaced by a symlink",
}


def _png_with_script(path: Path) -> Path:
    info = PngInfo()
    info.add_text("Comment", f"<html><body>{SCRIPT}</body></html>")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, format="PNG", pnginfo=info)
    return path


@pytest.fixture(scope="module")
def corpus_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("media")
    corpus = tmp / "corpus"
    (corpus / "sub").mkdir(parents=True)
    rows = ["path,modality"]
    for name, text in {**DOCUMENTS, **PLAIN}.items():
        (corpus / name).write_text(text, encoding="utf-8")
        rows.append(f"{name},text")
    _png_with_script(corpus / "x.html")
    image(corpus / "img.png", seed=3)
    audio(corpus / "snd.wav", seed=41, seconds=1.0)
    rows += ["x.html,vision", "img.png,vision", "snd.wav,audio"]
    (corpus / "files.csv").write_text("\n".join(rows) + "\n")
    checkpoint = write_test_checkpoint(tmp / "test.safetensors")
    idx = tmp / "index"
    summary = build_index(corpus / "files.csv", idx, ModelSource(CONFIG, checkpoint))
    assert not summary.rejected, summary.rejected
    return corpus, idx


@pytest.fixture(scope="module")
def searcher(corpus_index: tuple[Path, Path]) -> Searcher:
    return load_searcher(corpus_index[1])


@pytest.fixture(scope="module")
def client(searcher: Searcher) -> Iterator[TestClient]:
    app = create_app(ServiceSettings(), FakeEmbedder(CONFIG.embed_dim), searcher)
    with TestClient(app) as c:
        yield c


def _id(searcher: Searcher, name: str) -> int:
    for i in range(64):
        item = searcher.get_item(i)
        if item is not None and item.path is not None and Path(item.path).name == name:
            return i
    raise AssertionError(f"{name} is not in the index")


def _sandboxed(r: object) -> None:
    headers = r.headers  # type: ignore[attr-defined]
    assert headers["content-security-policy"] == MEDIA_CSP
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_documents_indexed_as_text_are_attachments(
    client: TestClient, searcher: Searcher, name: str
) -> None:
    r = client.get(f"/v1/items/{_id(searcher, name)}/media")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith("attachment")
    _sandboxed(r)
    assert r.content == DOCUMENTS[name].encode()


def test_png_named_html_is_served_as_a_png(client: TestClient, searcher: Searcher) -> None:
    r = client.get(f"/v1/items/{_id(searcher, 'x.html')}/media")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"  # its content, never its name
    _sandboxed(r)


def test_plain_text_image_and_audio_keep_their_types(
    client: TestClient, searcher: Searcher
) -> None:
    r = client.get(f"/v1/items/{_id(searcher, 'note.txt')}/media")
    assert (r.status_code, r.headers["content-type"]) == (200, "text/plain; charset=utf-8")
    assert r.headers["content-disposition"].startswith("inline")
    assert r.text == PLAIN["note.txt"]
    _sandboxed(r)
    assert client.get(f"/v1/items/{_id(searcher, 'img.png')}/media").headers["content-type"] == (
        "image/png"
    )
    r = client.get(f"/v1/items/{_id(searcher, 'snd.wav')}/media", headers={"Range": "bytes=0-3"})
    assert (r.status_code, r.headers["content-type"], r.content) == (206, "audio/wav", b"RIFF")
    _sandboxed(r)


def test_file_replaced_by_a_symlink_is_not_served(
    client: TestClient, searcher: Searcher, corpus_index: tuple[Path, Path]
) -> None:
    corpus, _ = corpus_index
    item = _id(searcher, "victim_link.txt")
    victim = corpus / "victim_link.txt"
    victim.unlink()
    victim.symlink_to("/etc/passwd")
    r = client.get(f"/v1/items/{item}/media")
    assert r.status_code in (404, 410)
    assert "root:" not in r.text
    assert "symbolic link" in r.json()["error"]["message"]
    # A symlink to a file inside the corpus is refused as well: only the indexed file is served.
    victim.unlink()
    victim.symlink_to(corpus / "note.txt")
    assert client.get(f"/v1/items/{item}/media").status_code in (404, 410)


def test_folder_replaced_by_a_symlink_is_not_served(
    client: TestClient, searcher: Searcher, corpus_index: tuple[Path, Path], tmp_path: Path
) -> None:
    corpus, _ = corpus_index
    item = _id(searcher, "victim_dir.txt")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim_dir.txt").write_text(PLAIN["sub/victim_dir.txt"])  # same bytes, even
    (corpus / "sub" / "victim_dir.txt").unlink()
    (corpus / "sub").rmdir()
    (corpus / "sub").symlink_to(outside)
    r = client.get(f"/v1/items/{item}/media")
    assert r.status_code == 404
    assert "symbolic link" in r.json()["error"]["message"]


def test_changed_file_is_gone(
    client: TestClient, searcher: Searcher, corpus_index: tuple[Path, Path]
) -> None:
    corpus, _ = corpus_index
    edit, grow = _id(searcher, "victim_edit.txt"), _id(searcher, "victim_grow.txt")
    assert client.get(f"/v1/items/{edit}/media").status_code == 200  # hashed and cached
    original = PLAIN["victim_edit.txt"]
    (corpus / "victim_edit.txt").write_text(original.upper())  # same size, other bytes
    r = client.get(f"/v1/items/{edit}/media")
    assert r.status_code == 410
    assert r.json()["error"]["type"] == "gone"
    assert "changed since it was indexed" in r.json()["error"]["message"]
    (corpus / "victim_grow.txt").write_text(PLAIN["victim_grow.txt"] + " and more")
    r = client.get(f"/v1/items/{grow}/media")
    assert r.status_code == 410
    assert "bytes" in r.json()["error"]["message"]
    (corpus / "victim_edit.txt").write_text(original)  # the indexed bytes again: served
    assert client.get(f"/v1/items/{edit}/media").text == original


def test_deleted_file_and_unknown_item_are_404(
    client: TestClient, searcher: Searcher, corpus_index: tuple[Path, Path]
) -> None:
    corpus, _ = corpus_index
    item = _id(searcher, "victim_gone.txt")
    (corpus / "victim_gone.txt").unlink()
    r = client.get(f"/v1/items/{item}/media")
    assert r.status_code == 404
    assert "no longer on disk" in r.json()["error"]["message"]
    assert client.get("/v1/items/999999/media").status_code == 404


def test_served_type_never_trusts_the_claimed_modality() -> None:
    assert served_type(Modality.VISION, b"just words") == ("application/octet-stream", False)
    assert served_type(Modality.TEXT, b"%PDF-1.7 ...") == ("application/octet-stream", False)
    assert served_type(Modality.TEXT, b"\xef\xbb\xbf <svg/>") == ("application/octet-stream", False)
    assert served_type(Modality.VISION, b"walk,1,2,3\n") == ("application/octet-stream", False)
    assert served_type(Modality.IMU, b"t,ax,ay\n0,1,2\n") == ("text/plain; charset=utf-8", True)
    assert served_type(Modality.TEXT, b"\x00\x01binary") == ("application/octet-stream", False)


# --- security headers on every route ------------------------------------------------------------


def test_security_headers_on_every_route(client: TestClient) -> None:
    for path, accept in [
        ("/", "text/html"),
        ("/", "application/json"),
        ("/docs", "text/html"),
        ("/openapi.json", "*/*"),
        ("/healthz", "*/*"),
        ("/nowhere", "*/*"),
    ]:
        r = client.get(path, headers={"Accept": accept})
        assert r.headers["referrer-policy"] == "no-referrer", path
        assert r.headers["x-frame-options"] == "DENY", path
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
    r = client.post("/v1/search", json={"text": "a cat", "k": 2})
    assert r.status_code == 200
    assert r.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert r.headers["referrer-policy"] == "no-referrer"
    # The web page keeps its own policy (it shows previews from blob: URLs).
    page = client.get("/", headers={"Accept": "text/html"}).headers["content-security-policy"]
    assert "default-src 'self'" in page and "blob:" in page


def test_docs_policy_allows_exactly_what_the_page_loads(client: TestClient) -> None:
    r = client.get("/docs")
    csp = r.headers["content-security-policy"]
    assert csp == page_csp(r.content)
    script_src = next(d for d in csp.split("; ") if d.startswith("script-src"))
    assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src
    assert "'sha256-" in script_src  # its one inline script, by hash
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    # Swagger UI and ReDoc come from this server (installed files), never from a CDN: the pages
    # work offline and run no third-party script.
    for page in ("/docs", "/redoc"):
        got = client.get(page)
        assert got.status_code == 200 and b"https://" not in got.content, page
        assert "https://" not in got.headers["content-security-policy"], page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
        assert client.get(f"/docs/assets/{asset}").status_code == 200, asset
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_page_csp_hashes_inline_scripts_and_names_origins() -> None:
    html = (
        b'<link rel="stylesheet" href="https://cdn.example/ui.css">'
        b'<script src="https://cdn.example/ui.js"></script><script>go()</script>'
        b'<script src="/static/local.js"></script>'
    )
    csp = page_csp(html)
    assert "script-src 'self' 'sha256-" in csp
    assert "https://cdn.example" in csp
    assert "https://evil" not in csp
    assert page_csp(b"<script>other()</script>") != page_csp(b"<script>go()</script>")


# --- in a real browser --------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live(searcher: Searcher) -> Iterator[str]:
    import uvicorn

    app = create_app(ServiceSettings(), FakeEmbedder(CONFIG.embed_dim), searcher)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("the in-process server never became ready")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no chromium at {CHROMIUM}")
def test_media_urls_run_no_script_in_chromium(
    live: str, searcher: Searcher, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    names = [*sorted(DOCUMENTS), "x.html", "note.txt"]
    requested: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
            accept_downloads=True,
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.on("request", lambda req: requested.append(req.url))
            for name in names:
                url = f"{live}/v1/items/{_id(searcher, name)}/media"
                page.goto("about:blank")
                try:
                    page.goto(url, wait_until="load")
                    rendered = True
                except sync_api.Error as e:  # an attachment: chromium downloads, never renders
                    assert "Download is starting" in str(e), (name, str(e))
                    rendered = False
                if rendered:
                    page.wait_for_timeout(300)  # give a script every chance to run
                    assert page.title() != "pwned", name
                    assert page.evaluate("document.title") != "pwned", name
        finally:
            browser.close()
    assert not [u for u in requested if "pwned" in u], requested


def test_media_responses_close_their_files(client: TestClient, searcher: Searcher) -> None:
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("no /proc/self/fd")
    wav, note = _id(searcher, "snd.wav"), _id(searcher, "note.txt")
    client.get(f"/v1/items/{wav}/media")  # warm: the first request opens the app's pools
    before = len(list(fds.iterdir()))
    for _ in range(30):
        assert (
            client.get(f"/v1/items/{wav}/media", headers={"Range": "bytes=2-9"}).status_code == 206
        )
        assert client.get(f"/v1/items/{note}/media").status_code == 200
        assert client.get("/v1/items/999999/media").status_code == 404
    assert len(list(fds.iterdir())) - before < 10  # 60 files served, none left open
