"""``index import``: precomputed embeddings (clip-retrieval's npy + parquet, or npy + jsonl) into
an index through the build's own writer; resume after SIGKILL; bad inputs; ``query --vector``."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders import Modality
from encoders.config import resolve_config
from index import BuildOptions, ModelSource, open_index, verify_index
from index.fingerprint import has_model
from index.importer import EmbeddingImportError, import_embeddings
from index.store import read_manifest

ROOT = Path(__file__).parents[1]


def ours(folder: Path, shards: int = 3, rows: int = 50, dim: int = 8, seed: int = 0) -> np.ndarray:
    """npy + jsonl shards of random vectors (not normalised); returns all vectors in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for s in range(shards):
        x = rng.normal(size=(rows, dim)).astype(np.float32) * 3
        np.save(folder / f"part{s}.npy", x)
        with open(folder / f"part{s}.jsonl", "w") as f:
            for i in range(rows):
                row = {"path": f"clips/{s}/{i}.mp4", "caption": f"clip {s}-{i}", "start": i}
                if i % 2:
                    row |= {"tags": ["odd", f"shard{s}"], "end": i + 2.5}
                f.write(json.dumps(row) + "\n")
        out.append(x)
    return np.concatenate(out)


def clip_layout(folder: Path, x: np.ndarray, shard_rows: int, column: str = "image_path") -> None:
    """clip-retrieval's layout: img_emb/img_emb_{i}.npy + metadata/metadata_{i}.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for i, start in enumerate(range(0, len(x), shard_rows)):
        part = x[start : start + shard_rows]
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", part)
        n = np.arange(start, start + len(part))
        table = pa.table({column: [f"img/{j}.jpg" for j in n], "caption": [f"c{j}" for j in n]})
        pq.write_table(table, folder / "metadata" / f"metadata_{i}.parquet")


def items(idx: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        return conn.execute(
            "SELECT id, path, modality, caption, tags, start_s, end_s FROM items ORDER BY id"
        ).fetchall()


def test_our_layout_keeps_order_metadata_and_normalises(tmp_path: Path) -> None:
    x = ours(tmp_path / "emb")
    summary = import_embeddings(tmp_path / "emb", tmp_path / "idx", "video", dim=8, slice_rows=20)
    assert summary.embedded_items == 150
    rows = items(tmp_path / "idx")
    assert [r[0] for r in rows] == list(range(150))  # vector id == row order of the shards
    assert rows[51][1:] == ("clips/1/1.mp4", "video", "clip 1-1", '["odd", "shard1"]', 1.0, 3.5)
    assert rows[50][4:] == ("[]", 0.0, None)
    manifest = read_manifest(tmp_path / "idx")
    assert not has_model(dict(manifest.model)) and manifest.dim == 8
    with open_index(tmp_path / "idx") as s:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_allclose(s.vector(77), unit[77], rtol=1e-6)
        hit = s.search(x[77], k=1)[0][0]  # an unnormalised query finds its own row
        assert hit.item.id == 77 and hit.item.path == "clips/1/27.mp4"
        assert hit.item.tags == ("odd", "shard1") and abs(hit.score - 1) < 1e-5
        assert next(h.item.id for h in s.search(x[3], k=5, tags=["shard2"])[0]) >= 100
    assert verify_index(tmp_path / "idx").ok
    # Rerun: nothing to do, nothing duplicated.
    again = import_embeddings(tmp_path / "emb", tmp_path / "idx", "video", dim=8, slice_rows=20)
    assert again.embedded_items == 0 and again.already == 9
    assert items(tmp_path / "idx") == rows


def test_clip_retrieval_layout_with_parquet(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(130, 16)).astype(np.float32)
    clip_layout(tmp_path / "emb", x, shard_rows=60)
    # clip-retrieval numbers shards 0..N-1: 10 must come after 2, not after 1.
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "index",
            "import",
            str(tmp_path / "emb"),
            "-o",
            str(tmp_path / "idx"),
            "--modality",
            "vision",
            "--dim",
            "16",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = items(tmp_path / "idx")
    assert [r[1] for r in rows] == [f"img/{j}.jpg" for j in range(130)]
    assert rows[129][2:4] == ("vision", "c129")
    np.save(tmp_path / "q.npy", x[[5, 128]])
    r = runner.invoke(
        app,
        [
            "index",
            "query",
            str(tmp_path / "idx"),
            "--vector",
            str(tmp_path / "q.npy"),
            "-k",
            "3",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["results"][0]["id"] for line in lines] == [5, 128]  # one line per query
    assert set(lines[0]["results"][0]) >= {"id", "path", "score", "caption", "modality"}
    assert lines[1]["results"][0]["path"] == "img/128.jpg" and len(lines[1]["results"]) == 3
    np.save(tmp_path / "q1.npy", x[7])  # a (D,) vector
    r = runner.invoke(
        app, ["index", "query", str(tmp_path / "idx"), "--vector", str(tmp_path / "q1.npy")]
    )
    assert r.exit_code == 0 and "img/7.jpg" in r.stdout.splitlines()[0]


def test_clip_shards_sort_numerically_and_path_column(tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(size=(120, 4)).astype(np.float32)
    clip_layout(tmp_path / "emb", x, shard_rows=10, column="path")  # 12 shards: 0 .. 11
    import_embeddings(tmp_path / "emb", tmp_path / "idx", Modality.VISION, dim=4)
    assert [r[1] for r in items(tmp_path / "idx")] == [f"img/{j}.jpg" for j in range(120)]


def test_without_pyarrow_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip_layout(tmp_path / "emb", np.ones((4, 4), np.float32), shard_rows=4)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if absent
    with pytest.raises(
        EmbeddingImportError, match=r"needs pyarrow: pip install 'bindsearch\[import\]'"
    ):
        import_embeddings(tmp_path / "emb", tmp_path / "idx", "vision", dim=4)


def test_model_fingerprint_when_the_model_is_given(tmp_path: Path) -> None:
    cfg = resolve_config("imagebind_test")
    ours(tmp_path / "emb", shards=1, rows=10, dim=cfg.embed_dim)
    model = ModelSource(cfg, None, seed=3)
    import_embeddings(tmp_path / "emb", tmp_path / "idx", "audio", model)
    fp = dict(read_manifest(tmp_path / "idx").model)
    assert has_model(fp) and fp["digest"] == model.fingerprint()["digest"]
    with pytest.raises(EmbeddingImportError, match="are 8-d but the model makes"):
        ours(tmp_path / "emb8", shards=1, rows=10, dim=8)
        import_embeddings(tmp_path / "emb8", tmp_path / "idx8", "audio", model)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("nan", r"part1.npy row 7 has NaN or infinite values"),
        ("zero", r"part1.npy row 33 is all zeros"),
        ("short", r"part1.jsonl has 49 rows but .*part1.npy holds 50 vectors"),
        ("nojsonl", r"part1.npy has no part1.jsonl beside it"),
        ("nopath", r"part1.jsonl row 2 has no path"),
        ("dim", r"are 8-d but --dim says 9-d"),
        ("pickle", r"part1.npy is not a readable .npy array"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path: Path, damage: str, message: str) -> None:
    emb = tmp_path / "emb"
    x = ours(emb)
    part, meta = emb / "part1.npy", emb / "part1.jsonl"
    dim = 8
    if damage == "nan":
        x[57] = np.nan
        np.save(part, x[50:100])
    elif damage == "zero":
        y = x[50:100].copy()
        y[33] = 0
        np.save(part, y)
    elif damage == "short":
        meta.write_text("".join(meta.read_text().splitlines(keepends=True)[:-1]))
    elif damage == "nojsonl":
        meta.unlink()
    elif damage == "nopath":
        lines = meta.read_text().splitlines(keepends=True)
        lines[2] = json.dumps({"caption": "no path"}) + "\n"
        meta.write_text("".join(lines))
    elif damage == "dim":
        dim = 9
    elif damage == "pickle":
        np.save(part, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    r = CliRunner().invoke(
        app,
        [
            "index",
            "import",
            str(emb),
            "-o",
            str(tmp_path / "idx"),
            "-m",
            "vision",
            "--dim",
            str(dim),
            "--chunk-size",
            "20",
            "--no-progress",
        ],
    )
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in r.output
    import re

    assert re.search(message, last), last


def test_a_vectors_only_index_is_searched_by_vector_only(tmp_path: Path) -> None:
    ours(tmp_path / "emb", shards=1)
    import_embeddings(tmp_path / "emb", tmp_path / "idx", "vision", dim=8)
    runner = CliRunner()
    r = runner.invoke(app, ["index", "query", str(tmp_path / "idx"), "--text", "a cat"])
    assert r.exit_code == 1 and "search it with --vector" in r.output
    np.save(tmp_path / "q.npy", np.ones((2, 5), np.float32))
    r = runner.invoke(
        app, ["index", "query", str(tmp_path / "idx"), "--vector", str(tmp_path / "q.npy")]
    )
    assert r.exit_code == 1 and "5 dimensions; this index has 8" in r.output
    r = runner.invoke(app, ["index", "info", str(tmp_path / "idx")])
    assert "model: none (imported vectors" in r.output
    r = runner.invoke(
        app,
        [
            "index",
            "import",
            str(tmp_path / "emb"),
            "-o",
            str(tmp_path / "x"),
            "-m",
            "vision",
            "--dim",
            "8",
            "--config",
            "imagebind_test",
        ],
    )
    assert r.exit_code == 1 and "not both" in r.output


def test_sigkill_then_rerun_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    ours(tmp_path / "emb", shards=4, rows=300, dim=8)
    ref = tmp_path / "ref"
    import_embeddings(tmp_path / "emb", ref, "vision", dim=8, slice_rows=10)
    idx = tmp_path / "idx"
    cmd = [sys.executable, "-c", "from bindsearch.cli import main; main()", "index", "import"]
    cmd += [str(tmp_path / "emb"), "-o", str(idx), "-m", "vision", "--dim", "8"]
    cmd += ["--chunk-size", "10", "--no-progress"]
    kills = 0
    for wanted in (5, 40):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        while proc.poll() is None and len(list((idx / "chunks").glob("c*.npy"))) < wanted:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert items(idx) == items(ref)
    with open_index(idx) as a, open_index(ref) as b:
        for i in (0, 299, 300, 1199):
            np.testing.assert_array_equal(a.vector(i), b.vector(i))
    assert verify_index(idx).ok
    assert BuildOptions().chunk_items == 512  # the import's slice size did not leak into builds


# --- the service: {"vector": [...]} ---------------------------------------------------------------


def test_service_searches_a_vectors_only_index_by_vector(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service import FakeEmbedder, ServiceSettings, create_app
    from service.searchers import load_searcher

    x = ours(tmp_path / "emb", shards=2, rows=20)
    import_embeddings(tmp_path / "emb", tmp_path / "idx", "vision", dim=8)
    searcher = load_searcher(tmp_path / "idx")
    # The served model makes 16-d vectors: it cannot embed for this 8-d index, nor need to.
    app = create_app(ServiceSettings(), FakeEmbedder(16), searcher)
    with TestClient(app) as c:
        body = c.post("/v1/search", json={"vector": x[25].tolist(), "k": 3}).json()
        assert body["results"][0]["id"] == 25 and len(body["results"]) == 3
        assert body["results"][0]["path"] == "clips/1/5.mp4"
        assert abs(body["results"][0]["score"] - 1) < 1e-5
        assert body["query"]["terms"] == [
            {
                "kind": "vector",
                "weight": 1.0,
                "modality": "",
                "text": None,
                "item_id": None,
                "filename": None,
                "bytes": None,
                "tokens": None,
                "truncated": None,
            }
        ]
        by_id = c.post("/v1/search", json={"item_id": 25, "k": 2}).json()["results"]
        assert by_id[0]["id"] != 25 and len(by_id) == 2  # by a stored vector: no model either
        for body, what in [
            ({"vector": [1.0] * 5}, "vector has 5 dimensions; the index holds 8-d vectors"),
            ({"vector": [0.0] * 8}, "all zeros"),
            ({"text": "a cat"}, "search it with `vector`"),
        ]:
            r = c.post("/v1/search", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["type"] == "invalid_content"
            assert what in r.json()["error"]["message"]
        r = c.post("/v1/search", json={"vector": [1.0] * 8, "text": "x"})
        assert r.status_code in (400, 422)
        assert "exactly one of text, item_id, data, terms or vector" in r.text
    searcher.close()


def test_service_vector_search_with_a_model_index(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service import FakeEmbedder, Item, MemorySearcher, ServiceSettings, create_app

    v = np.random.default_rng(4).normal(size=(5, 8)).astype(np.float32)
    items = [Item(i, Modality.VISION, f"{i}.png") for i in range(5)]
    app = create_app(ServiceSettings(), FakeEmbedder(8), MemorySearcher(v, items))
    with TestClient(app) as c:
        hits = c.post("/v1/search", json={"vector": (v[3] * 7).tolist()}).json()["results"]
        assert hits[0]["id"] == 3 and abs(hits[0]["score"] - 1) < 1e-5
        assert c.post("/v1/search", json={"text": "still embeds"}).status_code == 200
