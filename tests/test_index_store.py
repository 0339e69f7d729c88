"""The store owns its schema: the typed, versioned manifest (read and validated in one place,
a malformed one is one clear error everywhere) and tag filters applied inside the index (an id
set from SQLite restricting the search, exact, never more than k asked per modality)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import index.search as search_mod
from encoders import Modality
from encoders.config import resolve_config
from index import (
    Hit,
    IndexCorrupt,
    IndexManifest,
    IndexStoreError,
    Item,
    model_fingerprint,
    open_index,
    verify_index,
)
from index.cli import index_app
from index.search import FlatScan
from index.store import MANIFEST, IndexStore, ItemRecord, chunk_file, read_manifest

FP = model_fingerprint(resolve_config("imagebind_test"), "random:0")


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(
    root: Path,
    x: np.ndarray,
    tags: list[tuple[str, ...]],
    modality: str = "vision",
    chunk: int = 100_000,
) -> IndexStore:
    """An index of ``x`` through the store (ids = rows), item i tagged ``tags[i]``."""
    store = IndexStore.create(root, FP, x.shape[1], {})
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        items = [
            ItemRecord(
                f"/v/{start + i}.png", modality, f"{start + i:064x}", 1, tags=tags[start + i]
            )
            for i in range(len(part))
        ]
        store.commit_chunk([], items, part)
    return store


def brute_force(x: np.ndarray, allowed: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The ids of the exact top-k among ``allowed`` rows (ids = rows), best first."""
    s = q @ x[allowed].T
    return allowed[np.argsort(-s, axis=1, kind="stable")[:, :k]]


class SpyIndex:
    """A FAISS index that records the k of every search it is asked for."""

    def __init__(self, index: Any, asked: list[int]) -> None:
        self._index, self._asked = index, asked

    def search(self, q: np.ndarray, k: int, **kw: Any) -> Any:
        self._asked.append(k)
        return self._index.search(q, k, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)


def spy(monkeypatch: pytest.MonkeyPatch, s: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Spy on every FAISS search and every exact scan of an open index: (FAISS ks, scan ks)."""
    asked: list[int] = []
    scanned: list[tuple[int, int]] = []  # (k, rows scanned)
    for mi in s._indexes.values():
        mi.index = SpyIndex(mi.index, asked)
    real = FlatScan.search

    def scan(self: FlatScan, q: np.ndarray, k: int, rows: np.ndarray | None = None) -> Any:
        scanned.append((k, len(self.vectors) if rows is None else len(rows)))
        return real(self, q, k, rows)

    monkeypatch.setattr(FlatScan, "search", scan)
    return asked, scanned


# --- tag filters inside the index ----------------------------------------------------------------


def test_filtered_search_on_200k_is_exact_and_never_over_fetches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, d, k = 200_000, 32, 10
    x = unit_rows(n, d, seed=1)
    rng = np.random.default_rng(2)
    rare = np.sort(rng.choice(n, n // 100, replace=False))  # 1% carry "rare"
    tags: list[tuple[str, ...]] = [("common",)] * n
    for i in rare:
        tags[i] = ("common", "rare") if i % 2 else ("rare",)
    with fill(tmp_path / "idx", x, tags) as store:
        store.refresh(factory="Flat")
    q = unit_rows(8, d, seed=3)
    with open_index(tmp_path / "idx") as s:
        asked, scanned = spy(monkeypatch, s)
        for batch in (q[:1], q):  # one query and a batch
            got = s.search(batch, k, tags=["rare"])
            want = brute_force(x, rare, batch, k)
            assert [[h.item.id for h in hits] for hits in got] == want.tolist()
            for hits, row in zip(got, batch, strict=True):
                scores = [h.score for h in hits]
                np.testing.assert_allclose(scores, x[[h.item.id for h in hits]] @ row, atol=1e-5)
                assert all("rare" in h.item.tags for h in hits)
        # Two tags: every one must be carried.
        both = rare[rare % 2 == 1]
        got = s.search(q, k, tags=["rare", "common"])
        assert [[h.item.id for h in hits] for hits in got] == brute_force(x, both, q, k).tolist()
        # Nothing carries the tag: nothing is searched, nothing returned.
        assert s.search(q, k, tags=["nowhere"]) == [[] for _ in q]
    # k asked per modality, over exactly the matching rows; FAISS never asked for more.
    assert scanned == [(k, len(rare)), (k, len(rare)), (k, len(both))]
    assert all(kk <= k for kk in asked)


def test_filtered_search_through_faiss_selector_and_graph_indexes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, d, k = 6000, 16, 5
    x = unit_rows(n, d, seed=4)
    tags: list[tuple[str, ...]] = [("a",) if i % 10 == 0 else ("b",) for i in range(n)]
    allowed = np.arange(0, n, 10)
    q = unit_rows(3, d, seed=5)
    for factory in ("IVF16,Flat", "HNSW16"):
        root = tmp_path / factory.replace(",", "_")
        with fill(root, x, tags) as store:
            store.refresh(factory=factory)
        for exact_max in (0, search_mod.FILTER_EXACT_MAX):  # FAISS's IDSelector; stored vectors
            monkeypatch.setattr(search_mod, "FILTER_EXACT_MAX", exact_max)
            with open_index(root) as s:
                mi = s._indexes[Modality.VISION]
                if factory.startswith("IVF"):  # every list probed: the selector search is exact
                    mi.spec = type(mi.spec)(mi.spec.factory, search_params={"nprobe": 16})
                asked, _ = spy(monkeypatch, s)
                got = s.search(q, k, tags=["a"])
            ids = np.array([[h.item.id for h in hits] for hits in got])
            assert all(h.item.tags == ("a",) for hits in got for h in hits)
            if exact_max == 0 and factory.startswith("HNSW"):
                assert ids.shape == (3, k)  # HNSW under a filter is approximate
            else:
                assert ids.tolist() == brute_force(x, allowed, q, k).tolist()
            assert asked == ([k] if exact_max == 0 else [])


def test_filters_skip_tombstones_and_fewer_matches_than_k(tmp_path: Path) -> None:
    x = unit_rows(400, 8, seed=6)
    tags: list[tuple[str, ...]] = [("t",) if i < 6 else () for i in range(400)]
    with fill(tmp_path / "idx", x, tags) as store:
        store.refresh(factory="HNSW16")
        store.remove_ids([0, 1])  # HNSW cannot remove: tombstones stay in the graph
        store.refresh()
    with open_index(tmp_path / "idx") as s:
        hits = s.search(x[0], 10, tags=["t"])[0]
        assert sorted(h.item.id for h in hits) == [2, 3, 4, 5]
        assert s.search(x[0], 3, targets=["audio"], tags=["t"]) == [[]]


def test_index_searcher_is_the_services_searcher(tmp_path: Path) -> None:
    from service import Hit as ServiceHit
    from service import Item as ServiceItem
    from service import Searcher, load_searcher

    assert (ServiceHit, ServiceItem) == (Hit, Item)  # one result type, translated nowhere
    x = unit_rows(50, 8, seed=7)
    with fill(tmp_path / "idx", x, [("p",)] * 50) as store:
        store.refresh()
    s = load_searcher(tmp_path / "idx")
    assert isinstance(s, Searcher)
    hit = s.search(x[3:4], 1, [Modality.VISION], ["p"])[0][0]
    assert hit.item == Item(3, Modality.VISION, "/v/3.png", None, None, None, ("p",))
    assert s.get_item(3) == hit.item and s.get_item(10**9) is None
    np.testing.assert_allclose(s.item_vector(3), x[3], atol=1e-6)
    assert s.item_media_path(3) == Path("/v/3.png")
    [info] = s.info()
    assert (info.modality, info.count, info.recipe["factory"]) == (Modality.VISION, 50, "Flat")


# --- the typed manifest ---------------------------------------------------------------------


def small_index(root: Path) -> Path:
    x = unit_rows(30, 8, seed=8)
    with fill(root, x, [()] * 30) as store:
        store.refresh()
    return root


def test_manifest_round_trip_and_layout(tmp_path: Path) -> None:
    root = small_index(tmp_path / "idx")
    with IndexStore.open(root) as store:
        written = store.refresh()
    read = read_manifest(root)
    assert read == written and IndexManifest.from_dict(read.to_dict()) == read
    assert (read.version, read.dim, read.metric, read.counts["items"]) == (
        1,
        8,
        "inner_product",
        30,
    )
    entry = read.modalities["vision"]
    assert (entry.file, entry.count, entry.ntotal, entry.spec.factory) == (
        "vision.faiss",
        30,
        30,
        "Flat",
    )
    assert read.checksums["vision.faiss"] == entry.sha256
    assert dict(read.model) == json.loads(json.dumps(FP))
    # The JSON layout on disk is the one earlier versions wrote (they must still open).
    raw = json.loads((root / MANIFEST).read_text())
    assert sorted(raw) == sorted(
        [
            "format",
            "format_version",
            "model",
            "dim",
            "metric",
            "score",
            "checkpoint_path",
            "settings",
            "index_options",
            "modalities",
            "counts",
            "checksums",
            "generation",
            "next_id",
            "updated",
        ]
    )
    assert raw["format"] == "bindsearch-index" and raw["format_version"] == 1
    assert sorted(raw["modalities"]["vision"]) == sorted(
        ["file", "spec", "count", "ntotal", "tombstones", "removable", "recall", "sha256"]
    )
    assert (
        chunk_file(root, 1) == root / "chunks" / "c00000001.npy" and chunk_file(root, 1).is_file()
    )


MALFORMED: list[tuple[str, Any, str]] = [
    ("not json", "{oops", "is not valid JSON"),
    ("a list", [1, 2], "the manifest is a JSON array, not an object"),
    ("another file", {"format": "something"}, "is not a bindsearch index manifest"),
    ("a newer version", {"format_version": 2}, "format version 2; this bindsearch reads version 1"),
    ("dim as text", {"dim": "8"}, "dim is '8', not an integer"),
    ("no dim", {"dim": None}, "dim is None, not an integer"),
    ("no modalities", {"modalities": "vision"}, "modalities is a JSON string, not an object"),
    ("a count as text", {"modalities.vision.count": "30"}, "vision.count is '30', not an integer"),
    ("a file outside", {"modalities.vision.file": "../x.faiss"}, "'../x.faiss', not a .faiss"),
    (
        "a bad recipe",
        {"modalities.vision.spec": {}},
        "modalities.vision.spec is not an index recipe",
    ),
    ("no modality", {"modalities.smell": {}}, "modalities.smell is not a modality"),
    ("a missing key", {"generation": ...}, "generation is missing"),
]


def corrupt(root: Path, change: Any) -> None:
    path = root / MANIFEST
    if isinstance(change, str):
        path.write_text(change)
        return
    if isinstance(change, list):
        path.write_text(json.dumps(change))
        return
    data = json.loads(path.read_text())
    for key, value in change.items():
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("case", "change", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_one_clear_error_everywhere(
    tmp_path: Path, case: str, change: Any, message: str
) -> None:
    root = small_index(tmp_path / "idx")
    corrupt(root, change)
    for call in (read_manifest, open_index, verify_index):
        with pytest.raises(IndexCorrupt, match=r"manifest\.json") as e:
            call(root)
        assert message in str(e.value) and "\n" not in str(e.value)
    runner = CliRunner()
    for args in (
        ["verify", str(root)],
        ["info", str(root)],
        ["info", str(root), "--json"],
        ["query", str(root), "--text", "x"],
    ):
        r = runner.invoke(index_app, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "manifest.json" in r.stderr and message in r.stderr
        assert r.stdout == ""


FAISS_DAMAGE = [
    ("truncated", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
    ("garbage", lambda f: f.write_bytes(b"not a faiss index" * 8)),
    ("missing", lambda f: f.unlink()),
]


@pytest.mark.parametrize(("case", "damage"), FAISS_DAMAGE, ids=[c[0] for c in FAISS_DAMAGE])
def test_info_on_a_damaged_faiss_file_prints_what_it_can_then_fails(
    tmp_path: Path, case: str, damage: Any
) -> None:
    """``index info`` reads the manifest and the database, and checks each FAISS file against
    its sha256: a damaged one is the same one line ``index query`` refuses it with, after the
    counts, and exit status 1 (text and JSON)."""
    root = small_index(tmp_path / "idx")
    damage(root / "vision.faiss")
    np.save(tmp_path / "q.npy", unit_rows(1, 8, seed=1)[0])
    runner = CliRunner()
    refused = runner.invoke(index_app, ["query", str(root), "--vector", str(tmp_path / "q.npy")])
    assert refused.exit_code == 1 and refused.stderr.startswith("error: "), refused.output
    assert "vision.faiss" in refused.stderr and "index verify" in refused.stderr
    text = runner.invoke(index_app, ["info", str(root)])
    as_json = runner.invoke(index_app, ["info", str(root), "--json"])
    for r in (text, as_json):
        assert r.exit_code == 1, r.output
        assert r.stderr == refused.stderr  # the same words as the query's refusal
        assert r.stderr.count("\n") == 1
    assert "30 items from " in text.stdout and "vision" in text.stdout
    data = json.loads(as_json.stdout)
    assert data["counts"]["items"] == 30 and len(data["damaged"]) == 1
    assert data["damaged"][0].startswith("vision.faiss ")
    assert (data["sizes"]["vision"] is None) == (case == "missing")


def test_info_on_a_sound_index_reports_nothing_damaged(tmp_path: Path) -> None:
    root = small_index(tmp_path / "idx")
    r = CliRunner().invoke(index_app, ["info", str(root), "--json"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert json.loads(r.stdout)["damaged"] == []


def test_serve_refuses_a_malformed_manifest_in_one_line(tmp_path: Path) -> None:
    from service import load_searcher
    from service.serve_cli import serve

    root = small_index(tmp_path / "idx")
    corrupt(root, {"dim": "eight"})
    with pytest.raises(IndexStoreError, match=r"manifest\.json is malformed: dim"):
        load_searcher(root)
    app = typer.Typer()
    app.command()(serve)
    args = ["--index", str(root), "--random-weights", "--config", "imagebind_test"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "manifest.json is malformed: dim is 'eight', not an integer" in r.stderr


def test_service_json_is_the_same_from_an_index_and_from_memory(tmp_path: Path) -> None:
    """One result type: an index directory answers /v1/search like the in-memory oracle."""
    from fastapi.testclient import TestClient

    from service import FakeEmbedder, MemorySearcher, ServiceSettings, create_app

    x = unit_rows(40, 8, seed=9)
    tags: list[tuple[str, ...]] = [("p", "q") if i % 3 == 0 else ("q",) for i in range(40)]
    with fill(tmp_path / "idx", x, tags) as store:
        store.refresh()
    with open_index(tmp_path / "idx") as s:
        items = [s.get_item(i) for i in range(40)]
    memory = MemorySearcher(x, [it for it in items if it is not None])
    bodies = [
        {"item_id": 4, "k": 5, "tags": ["p"]},
        {"item_id": 4, "k": 5, "tags": ["p", "q"], "target": ["vision"]},
        {"item_id": 7, "k": 3},
        {"item_id": 7, "k": 3, "tags": ["nowhere"]},
    ]
    answers = []
    for searcher in (memory, open_index(tmp_path / "idx")):
        app = create_app(ServiceSettings(), FakeEmbedder(8), searcher)
        with TestClient(app) as client:
            got = []
            for body in bodies:
                r = client.post("/v1/search", json=body)
                assert r.status_code == 200, r.text
                got.append(
                    [
                        {**h, "score": round(h["score"], 5), "relevance": round(h["relevance"], 5)}
                        for h in r.json()["results"]
                    ]
                )
            got.append(client.get("/v1/items/3").json())
        answers.append(got)
    assert answers[0] == answers[1]
    assert [h["id"] for h in answers[1][0]] and all("p" in h["tags"] for h in answers[1][0])
    assert answers[1][3] == []


def test_result_types_and_service_import_without_faiss() -> None:
    """FAISS is an extra: the service (and the index's result types) import without it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "import service, index\n"
        "assert service.Hit is index.Hit and service.Item is index.Item\n"
        "try:\n    index.open_index\nexcept ImportError as e:\n    print('needs', e.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "needs faiss"
