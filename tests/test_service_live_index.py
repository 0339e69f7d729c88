"""The real server (``bindsearch serve``, uvicorn, the tiny random model) and a changing index.

Issue #17: ``serve`` on a folder that holds no index yet does not exit (with compose's
``restart: unless-stopped`` that was a restart loop): it answers ``/readyz`` 503 with why, and
serves the index that ``index build -o`` makes there, without a restart. And under a steady
search load from a few client threads, ``index sync`` adding and changing files, then
``index build -o`` over the served index: no 5xx, and what each command committed is found by
the service within 10 s of the command's end (the issue's bound; the poll runs every 0.2 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import FakeEmbedder, ServiceSettings, create_app, load_searcher
from service.errors import NoIndex
from service.searchers import IndexSnapshots

from .test_index_media import image
from .test_index_snapshot import DIM, make_index
from .test_service_e2e import CONFIG, REPO, Server, _Proc, _start, _stop

POLL_S = 0.2
WITHIN_S = 10.0  # the bound between a command's end and the service returning its items
MODEL = ["--checkpoint", "none", "--config", CONFIG]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from bindsearch.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "BINDSEARCH_TORCH_THREADS": "1"},
    )


def build(corpus: Path, out: Path) -> None:
    r = cli(
        "index", "build", str(corpus), "-o", str(out), *MODEL, "--workers", "0", "--no-progress"
    )
    assert r.returncode == 0, r.stderr


@contextmanager
def serving(tmp: Path, index: Path) -> Iterator[tuple[Server, _Proc]]:
    """``serve --index INDEX``, once it answers ``/healthz`` (ready or not)."""
    env = {"BINDSEARCH_INDEX_POLL_SECONDS": str(POLL_S), "BINDSEARCH_TORCH_THREADS": "1"}
    server, p = _start(tmp, ["--index", str(index)], env, wait_for="/healthz", log_level="info")
    try:
        yield server, p
    finally:
        _stop(p)


def until(cond: Callable[[], bool], what: str, within_s: float) -> float:
    """Seconds until ``cond()`` held; fails after ``within_s``."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if cond():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {within_s} s: {what}")


def listing(url: str) -> dict[str, int]:
    """Every served item: file name -> item id."""
    r = httpx.post(f"{url}/v1/search", json={"text": "x", "k": 100}, timeout=60)
    assert r.status_code == 200, r.text
    return {Path(h["path"]).name: h["id"] for h in r.json()["results"]}


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_serve_waits_for_an_index_and_serves_it_once_built(tmp_path: Path, folder: str) -> None:
    corpus, idx = tmp_path / "corpus", tmp_path / "idx"
    corpus.mkdir()
    image(corpus / "a.png", seed=1)
    if folder == "empty":
        idx.mkdir()  # a fresh Docker volume
    with serving(tmp_path, idx) as (srv, proc):
        url = srv.url

        def not_ready_detail() -> str:
            r = httpx.get(f"{url}/readyz", timeout=10)
            assert r.status_code == 503, r.text
            return str(r.json()["detail"])

        # Once the model is warm, what /readyz says is the missing index (not the model).
        until(lambda: "no index yet" in not_ready_detail(), "/readyz names the index", 60)
        detail = not_ready_detail()
        assert str(idx) in detail and f"index build CORPUS -o {idx}" in detail, detail
        r = httpx.post(f"{url}/v1/search", json={"text": "a"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "no_index", r.text
        assert r.json()["error"]["message"] == detail  # the same reason
        assert httpx.get(f"{url}/v1/items/0", timeout=10).status_code == 503
        assert httpx.get(f"{url}/v1/info", timeout=10).json()["indexes"] == []
        assert httpx.post(f"{url}/v1/embed", json={"text": ["a"]}).status_code == 200
        time.sleep(3 * POLL_S)  # polls of a folder with no index change nothing
        assert proc.proc.poll() is None

        build(corpus, idx)
        # Within the bound of the build's end: ready, and its item returned.
        until(
            lambda: (
                httpx.get(f"{url}/readyz", timeout=10).status_code == 200
                and list(listing(url)) == ["a.png"]
            ),
            "ready, serving the index just built",
            WITHIN_S,
        )
        assert httpx.get(f"{url}/readyz").json()["detail"] is None
    log = proc.log.read_text()
    assert "Traceback" not in log and "now serving generation" in log, log[-3000:]


def test_serve_still_refuses_a_file_that_is_not_an_index(tmp_path: Path) -> None:
    bad = tmp_path / "items.json"
    bad.write_text("{}")
    r = cli("serve", "--random-weights", "--config", CONFIG, "--index", str(bad))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: index {bad} is a file: give an index directory (bindsearch index build "
        "-o DIR) or a .jsonl of items with vectors"
    ], r.stderr


class SearchLoad:
    """A few client threads searching (text, by item id, by upload); records every status."""

    def __init__(self, url: str, upload: Path, threads: int = 3) -> None:
        self.url = url
        self.upload = upload.read_bytes()
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    if i % 3 == 0:
                        r = c.post("/v1/search", json={"text": "a red ring", "k": 3})
                    elif i % 3 == 1:
                        r = c.post("/v1/search", json={"item_id": 0, "k": 3})
                    else:
                        r = c.post("/v1/search", files={"file": ("q.png", self.upload)})
                    self.statuses.append(r.status_code)
                    if r.status_code >= 500:
                        self.errors.append(r.text)
                except httpx.TransportError as e:  # a dropped connection counts as a failure
                    self.errors.append(repr(e))
                    self.statuses.append(599)

    def __enter__(self) -> SearchLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def test_sync_then_rebuild_under_load_on_a_real_server(tmp_path: Path) -> None:
    corpus, idx, probes = tmp_path / "corpus", tmp_path / "idx", tmp_path / "probes"
    corpus.mkdir()
    probes.mkdir()
    for i in range(4):
        image(corpus / f"a{i}.png", seed=i)
    build(corpus, idx)
    with serving(tmp_path, idx) as (srv, proc):
        url = srv.url
        until(lambda: httpx.get(f"{url}/readyz").status_code == 200, "ready", 120)
        with SearchLoad(url, corpus / "a0.png") as load:
            before = listing(url)
            image(corpus / "new.png", seed=40)
            image(corpus / "a1.png", seed=41)  # a changed file: other pixels, same name
            r = cli("index", "sync", str(idx), str(corpus), *MODEL, "--workers", "0")
            assert r.returncode == 0, r.stderr
            # The new file is served, and the changed one under a new item (its new vector).
            until(
                lambda: (
                    (now := listing(url)).get("new.png") is not None
                    and now.get("a1.png") not in (None, before["a1.png"])
                ),
                "sync's new and changed items",
                WITHIN_S,
            )
            image(corpus / "b.png", seed=50)
            build(corpus, idx)  # over the served index
            until(lambda: "b.png" in listing(url), "the rebuilt index", WITHIN_S)
            assert sorted(listing(url)) == [
                "a0.png",
                "a1.png",
                "a2.png",
                "a3.png",
                "b.png",
                "new.png",
            ]
            time.sleep(1)  # the load runs on past the swap
        info = httpx.get(f"{url}/v1/info").json()
        assert sum(i["count"] for i in info["indexes"]) == 6
    assert len(load.statuses) > 20, len(load.statuses)
    assert load.errors == [], load.errors[:3]
    assert set(load.statuses) == {200}, sorted(set(load.statuses))
    log = proc.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def _write_manifest(idx: Path, manifest: dict[str, Any]) -> None:
    """Replace the index's manifest at once, as a commit does (the poll sees a whole one)."""
    tmp = idx / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, idx / "manifest.json")


def test_search_and_info_say_when_a_query_towers_calibration_is_stale(tmp_path: Path) -> None:
    """An image index whose calibration was measured with another text tower (its manifest
    records another text digest, as after the served model's text tower was retrained): the
    service accepts it (its vectors are the vision tower's); a text search's response and
    /v1/info carry the note naming the stale text->vision pair and `bindsearch index sync`;
    a vision query, a raw merge and, once the index's calibration fits the model again, any
    search have none."""
    corpus, idx = tmp_path / "corpus", tmp_path / "idx"
    corpus.mkdir()
    for i in range(3):
        image(corpus / f"a{i}.png", seed=i)
    build(corpus, idx)
    fine = json.loads((idx / "manifest.json").read_text())
    assert {"text->vision", "vision->vision"} <= set(fine["calibration"]["pairs"])
    stale = json.loads(json.dumps(fine))
    stale["model"]["towers"]["text"] = "0" * 64
    stale["model"]["digest"] = "1" * 64
    _write_manifest(idx, stale)

    def search(body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{url}/v1/search", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    with serving(tmp_path, idx) as (srv, proc):
        url = srv.url
        until(lambda: httpx.get(f"{url}/readyz").status_code == 200, "ready", 120)
        note = search({"text": "a red ring"})["calibration_note"]
        assert note is not None and "text->vision pairs are stale" in note, note
        assert "vision->vision" not in note and "`bindsearch index sync`" in note, note
        assert str(idx) in note and "raw cosine" in note, note
        info = httpx.get(f"{url}/v1/info").json()
        assert info["calibration_note"] == note
        # Calibration is not used by a raw merge; a vision query's pair is not stale.
        assert search({"text": "a red ring", "merge": "raw"})["calibration_note"] is None
        item = search({"text": "x", "k": 1})["results"][0]["id"]
        assert search({"item_id": item})["calibration_note"] is None
        # The calibration fits the served model again (what a sync commits): the swapped-in
        # snapshot has no note.
        _write_manifest(idx, fine)
        until(
            lambda: (
                httpx.get(f"{url}/v1/info").json()["calibration_note"] is None
                and search({"text": "a red ring"})["calibration_note"] is None
            ),
            "the note gone with the stale calibration",
            WITHIN_S,
        )
    log = proc.log.read_text()
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------- in process, quickly


def test_snapshots_wait_for_a_first_index(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    with pytest.raises(ValueError, match="does not exist"):
        load_searcher(root)  # without wait: refused, as before
    snapshots = load_searcher(root, wait=True)
    assert isinstance(snapshots, IndexSnapshots)
    assert snapshots.missing is not None and "no index yet" in snapshots.missing
    with pytest.raises(NoIndex, match="no index yet"):
        snapshots.search(np.zeros((1, DIM), np.float32), 3)
    assert snapshots.info() == [] and snapshots.refresh() is False
    app = create_app(ServiceSettings(index_poll_seconds=0.05), FakeEmbedder(DIM), snapshots)
    with TestClient(app) as client:
        until(lambda: bool(app.state.bindsearch.ready), "the model is ready", 30)
        r = client.get("/readyz")
        assert r.status_code == 503 and "no index yet" in r.json()["detail"], r.text
        assert snapshots.expected_dim == DIM
        make_index(root, 5)
        until(lambda: client.get("/readyz").status_code == 200, "the first index served", 30)
        r = client.post("/v1/search", json={"item_id": 0, "k": 10})
        assert r.status_code == 200 and len(r.json()["results"]) == 4, r.text
    snapshots.close()


def test_a_first_index_of_another_dimension_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    root.mkdir()
    (root / "meta.sqlite").write_bytes(b"")  # a first build under way
    snapshots = IndexSnapshots(root, wait=True)
    assert snapshots.missing is not None and "has not finished" in snapshots.missing
    snapshots.expected_dim = DIM + 8
    (root / "meta.sqlite").unlink()
    make_index(root, 4)
    assert snapshots.refresh() is False
    assert snapshots.missing is not None and f"served model makes {DIM + 8}-d" in snapshots.missing
    snapshots.close()


def test_poll_zero_still_waits_for_a_first_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``BINDSEARCH_INDEX_POLL_SECONDS=0`` follows no change, but a service with no index yet
    still looks for its first one (else /readyz's "served as soon as the build ends" is false)."""
    import service.app

    monkeypatch.setattr(service.app, "FIRST_INDEX_POLL_S", 0.05)
    root = tmp_path / "idx"
    snapshots = load_searcher(root, wait=True)
    assert isinstance(snapshots, IndexSnapshots)
    app = create_app(ServiceSettings(index_poll_seconds=0), FakeEmbedder(DIM), snapshots)
    with TestClient(app) as client:
        until(lambda: bool(app.state.bindsearch.ready), "the model is ready", 30)
        assert client.get("/readyz").status_code == 503
        make_index(root, 5)
        until(lambda: client.get("/readyz").status_code == 200, "the first index served", 30)
        assert snapshots.missing is None
    snapshots.close()
