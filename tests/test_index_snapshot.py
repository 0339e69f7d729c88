"""A served index is a consistent snapshot that follows the index on disk (#17, defects 6-9).

The service sees what ``index sync/add/remove`` commit, within its poll interval; an index
removed or rebuilt under it never costs a 5xx (the last good snapshot stays in service and
``/readyz`` says so); a damaged chunk at request time is a 503 ``index_damaged``; a damaged
index is refused on open by ``index query`` and ``serve`` in one line, checksums included.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from encoders import Encoder, load_encoder
from encoders.config import resolve_config
from index import (
    BuildOptions,
    IndexCorrupt,
    ModelMismatch,
    ModelSource,
    build_index,
    model_fingerprint,
    open_index,
    sync_index,
    verify_index,
)
from index.cli import index_app
from index.store import (
    FileRecord,
    IndexStore,
    ItemRecord,
    chunk_file,
    read_manifest,
    replacement_dir,
)
from service import FakeEmbedder, ServiceSettings, create_app, load_searcher
from service.searchers import IndexSnapshots
from service.serve_cli import serve as serve_command

from .test_index_media import image, write_test_checkpoint

CONFIG = resolve_config("imagebind_test")
FP = model_fingerprint(CONFIG, "random:0")
DIM = CONFIG.embed_dim
WAIT_S = 30.0  # generous bound for what the poll must show (it runs every 0.05 s here)


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def commit_files(store: IndexStore, names: list[str], x: np.ndarray) -> list[int]:
    """What a build/add commits for files ``names`` (one item each, vectors ``x``)."""
    files = [
        FileRecord(n, "indexed", f"{abs(hash((n, float(v[0])))):064x}", 1)
        for n, v in zip(names, x, strict=True)
    ]
    items = [ItemRecord(f.path, "vision", str(f.sha256), 1) for f in files]
    return store.commit_chunk(files, items, x)


def make_index(root: Path, n: int = 20, seed: int = 0) -> np.ndarray:
    x = unit_rows(n, seed)
    with IndexStore.create(root, FP, DIM, {}) as store:
        commit_files(store, [f"/c/{i}.png" for i in range(n)], x)
        store.refresh()
    return x


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


@contextmanager
def served(root: Path, **settings: Any) -> Iterator[tuple[TestClient, IndexSnapshots]]:
    searcher = load_searcher(root)
    assert isinstance(searcher, IndexSnapshots)
    settings.setdefault("index_poll_seconds", 0.05)
    app = create_app(ServiceSettings(**settings), FakeEmbedder(DIM), searcher)
    with TestClient(app) as client:
        wait_until(lambda: bool(app.state.bindsearch.ready), "ready")
        yield client, searcher
    searcher.close()


def count(client: TestClient) -> int:
    r = client.get("/v1/info")
    assert r.status_code == 200, r.text
    return sum(i["count"] for i in r.json()["indexes"])


# --- the snapshot follows sync/add/remove (defect 9) --------------------------------------------


def test_the_service_follows_add_change_and_remove(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    make_index(root, 20)
    with served(root) as (client, snapshots):
        assert count(client) == 20
        assert client.get("/v1/items/25").status_code == 404
        # add: five new files
        new = unit_rows(5, seed=1)
        with IndexStore.open(root) as store:
            added = commit_files(store, [f"/c/new{i}.png" for i in range(5)], new)
            store.refresh()
        wait_until(lambda: count(client) == 25, "/v1/info counts the added items")
        r = client.get(f"/v1/items/{added[0]}")
        assert r.status_code == 200 and r.json()["path"] == "/c/new0.png", r.text
        # a changed file: its old item goes, the new vector is the one served
        changed = unit_rows(1, seed=2)
        with IndexStore.open(root) as store:
            [new_id] = commit_files(store, ["/c/3.png"], changed)
            store.refresh()
        wait_until(lambda: client.get(f"/v1/items/{new_id}").status_code == 200, "changed item")
        assert client.get("/v1/items/3").status_code == 404
        np.testing.assert_allclose(snapshots.item_vector(new_id), changed[0], atol=1e-6)
        hits = snapshots.search(changed, 1)[0]
        assert hits[0].item.id == new_id  # the new vector is searched, not only stored
        r = client.post("/v1/search", json={"item_id": new_id, "k": 3})
        assert r.status_code == 200, r.text
        # remove
        with IndexStore.open(root) as store:
            store.remove_paths(["/c/new0.png", "/c/new1.png"])
            store.refresh()
        wait_until(lambda: count(client) == 23, "/v1/info counts follow a removal")
        assert client.get(f"/v1/items/{added[0]}").status_code == 404
        assert client.get("/readyz").json() == {"status": "ready", "detail": None}


def test_refresh_is_a_no_op_when_nothing_changed(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    make_index(root, 5)
    snapshots = IndexSnapshots(root)
    try:
        first = snapshots.current
        assert snapshots.refresh() is False and snapshots.current is first
        with IndexStore.open(root) as store:
            commit_files(store, ["/c/x.png"], unit_rows(1, seed=9))
            store.refresh()
        assert snapshots.refresh() is True and snapshots.current is not first
        assert snapshots.generation == IndexStore.open_readonly(root).generation
        # Stored rows (sizes and hashes: the media route checks files against them) follow too.
        [row] = snapshots.get([5], ["path", "sha256", "size"])
        assert row["path"] == "/c/x.png" and row["size"] == 1 and len(row["sha256"]) == 64
    finally:
        snapshots.close()


# --- rm -rf and a rebuild under the server (defect 6) ---------------------------------------------


def test_rm_rf_and_rebuild_under_load_never_answers_5xx(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    make_index(root, 20)
    statuses: list[int] = []
    stop = threading.Event()
    with served(root) as (client, snapshots):

        def load() -> None:
            n = 0
            while not stop.is_set() and n < 5000:
                n += 1
                for r in (
                    client.post("/v1/search", json={"text": "a red ring", "k": 5}),
                    client.post("/v1/search", json={"item_id": 1, "k": 5}),
                    client.get("/v1/items/2"),
                    client.get("/v1/info"),
                ):
                    statuses.append(r.status_code)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            wait_until(lambda: len(statuses) > 20, "load running")
            shutil.rmtree(root)
            wait_until(lambda: snapshots.stale is not None, "the removal is noticed")
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert "last good snapshot" in ready.json()["detail"], ready.text
            assert count(client) == 20  # still serving the old snapshot
            seen = len(statuses)
            wait_until(lambda: len(statuses) > seen + 20, "load served while removed")
            make_index(root, 33, seed=5)  # the rebuild, in place
            wait_until(lambda: count(client) == 33, "the rebuilt index is served")
            assert client.get("/readyz").json()["detail"] is None
        finally:
            stop.set()
            worker.join()
    assert statuses and all(s < 500 for s in statuses), sorted(set(statuses))


def test_a_damaged_index_on_disk_keeps_the_last_good_snapshot(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    make_index(root, 10)
    snapshots = IndexSnapshots(root)
    try:
        with IndexStore.open(root) as store:
            commit_files(store, ["/c/y.png"], unit_rows(1, seed=3))
            store.refresh()
        faiss_file = root / "vision.faiss"
        faiss_file.write_bytes(faiss_file.read_bytes()[:-40])
        assert snapshots.refresh() is False
        assert snapshots.stale is not None and "vision.faiss" in snapshots.stale
        assert sum(i.count for i in snapshots.info()) == 10
    finally:
        snapshots.close()


# --- a damaged chunk at request time (defect 7) ---------------------------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _pickle(p: Path) -> None:
    p.write_bytes(pickle.dumps({"not": "vectors"}))


def _delete(p: Path) -> None:
    p.unlink()


@pytest.mark.parametrize(
    "damage", [_delete, _truncate, _pickle], ids=["missing", "truncated", "pickle"]
)
def test_a_damaged_chunk_is_503_index_damaged(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    root = tmp_path / "idx"
    make_index(root, 12)
    with served(root) as (client, _):
        damage(chunk_file(root, 1))
        r = client.post("/v1/search", json={"item_id": 4, "k": 3})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "index_damaged" and "item 4" in err["message"], err
        assert "c00000001.npy" in err["message"] and "index verify" in err["message"]
        r = client.post("/v1/search", json={"terms": [{"item_id": 4}, {"text": "a"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "index_damaged"
        assert client.post("/v1/search", json={"text": "a"}).status_code == 200  # search lives


# --- damaged files refused on open, in one line (defect 8) ----------------------------------------


def _flip(p: Path, at: int = -1) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGES: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated-faiss", lambda r: _truncate(r / "vision.faiss"), "vision.faiss"),
    ("flipped-faiss", lambda r: _flip(r / "vision.faiss", -5), "vision.faiss"),
    ("flipped-chunk", lambda r: _flip(chunk_file(r, 1)), "c00000001.npy"),
    ("pickle-chunk", lambda r: _pickle(chunk_file(r, 1)), "c00000001.npy"),
    (
        "corrupt-sqlite",
        lambda r: (r / "meta.sqlite").write_bytes(b"\x00garbage" * 512),
        "meta.sqlite",
    ),
]


@pytest.mark.parametrize(("case", "damage", "named"), DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_index_is_refused_in_one_line(
    tmp_path: Path, case: str, damage: Callable[[Path], None], named: str
) -> None:
    root = tmp_path / "idx"
    make_index(root, 12)
    damage(root)
    with pytest.raises(IndexCorrupt) as e:
        open_index(root)
    assert named in str(e.value) and "\n" not in str(e.value)
    runner = CliRunner()
    r = runner.invoke(index_app, ["query", str(root), "--text", "a red ring"])
    one_line_error(r, named)
    app = typer.Typer()
    app.command()(serve_command)
    r = runner.invoke(app, ["--index", str(root), "--random-weights", "--config", "imagebind_test"])
    one_line_error(r, named)


def one_line_error(r: Any, named: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert named in r.stderr and "index verify" in r.stderr, r.stderr


def test_checksums_are_cached_by_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import index.store as store_mod

    root = tmp_path / "idx"
    make_index(root, 12)
    open_index(root).close()
    hashed: list[Path] = []
    real = store_mod.sha256_path
    monkeypatch.setattr(store_mod, "sha256_path", lambda p: hashed.append(Path(p)) or real(p))
    open_index(root).close()
    assert hashed == []  # reopening an unchanged index hashes no chunk again
    with sqlite3.connect(root / "meta.sqlite") as conn:  # the database is untouched by opening
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 12


# --- build -o EXISTING replaces by building beside and renaming (defect 6) ------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_checkpoint(tmp_path_factory.mktemp("model") / "test.safetensors")


@pytest.fixture(scope="module")
def encoder(checkpoint: Path) -> Encoder:
    return load_encoder(checkpoint, config=CONFIG)


def model(checkpoint: Path, encoder: Encoder) -> ModelSource:
    return ModelSource(CONFIG, checkpoint, encoder=encoder)


def test_a_rebuild_over_a_served_index_never_writes_into_its_files(
    tmp_path: Path, checkpoint: Path, encoder: Encoder
) -> None:
    corpus, idx = tmp_path / "corpus", tmp_path / "idx"
    corpus.mkdir()
    for i in range(4):
        image(corpus / f"a{i}.png", seed=i)
    opts = BuildOptions(chunk_items=2, batch_size=4)
    build_index(corpus, idx, model(checkpoint, encoder), opts)
    inode = os.stat(idx / "meta.sqlite").st_ino
    same = build_index(corpus, idx, model(checkpoint, encoder), opts)
    assert same.already == 4 and os.stat(idx / "meta.sqlite").st_ino == inode  # nothing to swap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "idx"]
    snapshots = IndexSnapshots(idx)
    fd = os.open(idx / "meta.sqlite", os.O_RDONLY)  # as a server holds it
    try:
        before = hashlib.sha256(os.pread(fd, 1 << 24, 0)).hexdigest()
        for i in range(3):
            image(corpus / f"b{i}.png", seed=10 + i)
        again = build_index(corpus, idx, model(checkpoint, encoder), opts)
        assert again.already == 4 and again.embedded_files == 3  # still incremental
        assert hashlib.sha256(os.pread(fd, 1 << 24, 0)).hexdigest() == before
        assert os.fstat(fd).st_ino != os.stat(idx / "meta.sqlite").st_ino  # renamed in
        assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "idx"]  # nothing left
        assert verify_index(idx).ok
        assert snapshots.refresh() and sum(i.count for i in snapshots.info()) == 7
    finally:
        os.close(fd)
        snapshots.close()
    # An interrupted replacement (its copy beside the index) resumes on rerun.
    work = replacement_dir(idx)
    assert work.name == ".idx.building" and (work / "meta.sqlite").is_file()
    image(corpus / "c.png", seed=30)
    assert replacement_dir(idx) == work  # a second look resumes it, it does not start over
    done = build_index(corpus, idx, model(checkpoint, encoder), opts)
    assert done.already == 7 and done.embedded_files == 1 and not work.exists()
    assert verify_index(idx).ok and read_manifest(idx).counts["items"] == 8
    # A replacement refused (another model) leaves nothing behind to resume.
    other = load_encoder(config="imagebind_test")
    with pytest.raises(ModelMismatch):
        build_index(corpus, idx, ModelSource(CONFIG, None, encoder=other), opts)
    assert not work.exists() and verify_index(idx).ok


def test_a_rebuild_over_a_mount_point_swaps_file_by_file(
    tmp_path: Path, checkpoint: Path, encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus, idx = tmp_path / "corpus", tmp_path / "idx"
    corpus.mkdir()
    for i in range(3):
        image(corpus / f"a{i}.png", seed=i)
    opts = BuildOptions(chunk_items=2, batch_size=4)
    build_index(corpus, idx, model(checkpoint, encoder), opts)
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == idx or real(p))
    snapshots = IndexSnapshots(idx)
    fd = os.open(idx / "meta.sqlite", os.O_RDONLY)
    try:
        before = hashlib.sha256(os.pread(fd, 1 << 24, 0)).hexdigest()
        idx_inode = os.stat(idx).st_ino
        image(corpus / "b.png", seed=20)
        again = build_index(corpus, idx, model(checkpoint, encoder), opts)
        assert again.already == 3 and again.embedded_files == 1
        assert os.stat(idx).st_ino == idx_inode  # the mount point itself stays
        assert hashlib.sha256(os.pread(fd, 1 << 24, 0)).hexdigest() == before
        assert not (idx / ".building").exists() and verify_index(idx).ok
        assert snapshots.refresh() and sum(i.count for i in snapshots.info()) == 4
    finally:
        os.close(fd)
        snapshots.close()


def test_sync_then_a_rebuild_under_search_load_are_served_without_5xx(
    tmp_path: Path, checkpoint: Path, encoder: Encoder
) -> None:
    corpus, idx = tmp_path / "corpus", tmp_path / "idx"
    corpus.mkdir()
    for i in range(4):
        image(corpus / f"a{i}.png", seed=i)
    opts = BuildOptions(chunk_items=2, batch_size=4)
    build_index(corpus, idx, model(checkpoint, encoder), opts)
    statuses: list[int] = []
    stop = threading.Event()
    with served(idx) as (client, _):

        def load() -> None:
            while not stop.is_set() and len(statuses) < 20000:
                for r in (
                    client.post("/v1/search", json={"text": "a red ring", "k": 3}),
                    client.post("/v1/search", json={"item_id": 0, "k": 3}),
                ):
                    statuses.append(r.status_code)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            image(corpus / "new.png", seed=40)
            image(corpus / "a1.png", seed=41)  # a changed file
            sync_index(idx, corpus, model(checkpoint, encoder), opts)
            wait_until(lambda: count(client) == 5, "sync's new item served")
            r = client.post("/v1/search", json={"text": "x", "k": 5})
            by_path = {Path(h["path"]).name: h["id"] for h in r.json()["results"]}
            assert sorted(by_path) == ["a0.png", "a1.png", "a2.png", "a3.png", "new.png"]
            assert by_path["a1.png"] > by_path["a3.png"]  # the changed file's new item
            image(corpus / "b.png", seed=50)
            build_index(corpus, idx, model(checkpoint, encoder), opts)  # over the served index
            wait_until(lambda: count(client) == 6, "the rebuilt index served")
        finally:
            stop.set()
            worker.join()
    assert statuses and all(s < 500 for s in statuses), sorted(set(statuses))
