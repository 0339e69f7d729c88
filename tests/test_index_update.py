"""Incremental updates without a rebuild: add, remove (ids and paths, HNSW tombstones), sync
(new, changed and deleted files); vectors and metadata stay aligned throughout."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bindsearch.cli import app
from encoders import Encoder, load_encoder
from encoders.config import resolve_config
from index import (
    BuildOptions,
    ModelMismatch,
    ModelSource,
    add_to_index,
    build_index,
    open_index,
    remove_from_index,
    sync_index,
    verify_index,
)

from .test_index_media import audio, image, write_test_checkpoint

CONFIG = resolve_config("imagebind_test")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_checkpoint(tmp_path_factory.mktemp("model") / "test.safetensors")


@pytest.fixture(scope="module")
def encoder(checkpoint: Path) -> Encoder:
    return load_encoder(checkpoint, config=CONFIG)


@pytest.fixture
def model(checkpoint: Path, encoder: Encoder) -> ModelSource:
    return ModelSource(CONFIG, checkpoint, encoder=encoder)


def corpus(root: Path, images: int = 6, sounds: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        image(root / f"img{i}.png", seed=i)
    for i in range(sounds):
        audio(root / f"snd{i}.wav", seed=40 + i, seconds=1.0)
    return root


def ids(idx: Path) -> dict[str, list[int]]:
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        out: dict[str, list[int]] = {}
        for i, p in conn.execute("SELECT id, path FROM items WHERE deleted = 0 ORDER BY id"):
            out.setdefault(Path(p).name, []).append(i)
        return out


def aligned(idx: Path) -> None:
    """open_index checks id == row for every modality; verify checks vectors and checksums."""
    open_index(idx).close()
    report = verify_index(idx)
    assert report.ok, report.problems


def top(idx: Path, vec: np.ndarray, k: int = 1) -> list[str]:
    with open_index(idx) as s:
        return [Path(str(h.item.path)).name for h in s.search(vec, k)[0]]


def test_add_appends_without_touching_existing_ids(
    tmp_path: Path, model: ModelSource, encoder: Encoder
) -> None:
    idx = tmp_path / "idx"
    build_index(corpus(tmp_path / "c"), idx, model)
    before = ids(idx)
    new = corpus(tmp_path / "more", images=0, sounds=0)
    image(new / "new0.png", seed=100)
    image(new / "new1.png", seed=101)
    single = audio(tmp_path / "lone.wav", seed=102, seconds=1.0)
    s = add_to_index(idx, [new, single], model)
    assert s.embedded_files == 3 and s.embedded_items == 3
    after = ids(idx)
    assert {k: after[k] for k in before} == before  # existing ids unchanged
    assert min(after["new0.png"] + after["lone.wav"]) > max(i for v in before.values() for i in v)
    aligned(idx)
    assert top(idx, encoder.embed_items("vision", [new / "new1.png"])) == ["new1.png"]
    again = add_to_index(idx, [new, single], model)  # idempotent
    assert again.embedded_items == 0 and again.already == 3


def test_remove_by_id_and_path(tmp_path: Path, model: ModelSource, encoder: Encoder) -> None:
    idx = tmp_path / "idx"
    c = corpus(tmp_path / "c")
    build_index(c, idx, model)
    before = ids(idx)
    r = remove_from_index(idx, ids=[before["img2.png"][0]], paths=[c / "snd1.wav"])
    assert r.removed_items == 2 and r.removed_files == 1
    after = ids(idx)
    assert "img2.png" not in after and "snd1.wav" not in after and len(after) == len(before) - 2
    aligned(idx)
    with open_index(idx) as s:
        hits = s.search(encoder.embed_items("vision", [c / "img2.png"]), 20)[0]
        assert "img2.png" not in {Path(str(h.item.path)).name for h in hits}
        assert s.get([before["img2.png"][0]]) == [{}]
    # A later build does not bring back the item removed by id (its file is still known)...
    assert build_index(c, idx, model).embedded_items == 1  # ... but snd1.wav, forgotten, is back
    aligned(idx)


def test_hnsw_removal_uses_tombstones_then_compacts(
    tmp_path: Path, model: ModelSource, encoder: Encoder
) -> None:
    idx = tmp_path / "idx"
    c = corpus(tmp_path / "c", images=10, sounds=0)
    build_index(c, idx, model, BuildOptions(factory="HNSW16"))
    before = ids(idx)
    remove_from_index(idx, ids=[before["img3.png"][0]])
    with open_index(idx) as s:
        entry = s.manifest.modalities["vision"]
        assert entry.spec.factory == "HNSW16"
        assert (entry.count, entry.ntotal, entry.tombstones) == (9, 10, 1)
        hits = s.search(encoder.embed_items("vision", [c / "img3.png"]), 9)[0]
        assert len(hits) == 9 and "img3.png" not in {Path(str(h.item.path)).name for h in hits}
    aligned(idx)
    # Past 20% tombstones the graph is rebuilt without them, and the tombstone rows go.
    remove_from_index(idx, paths=[c / "img4.png", c / "img5.png"])
    with open_index(idx) as s:
        entry = s.manifest.modalities["vision"]
        assert (entry.count, entry.ntotal, entry.tombstones) == (7, 7, 0)
    with sqlite3.connect(idx / "meta.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM items WHERE deleted = 1").fetchone() == (0,)
    aligned(idx)


def test_sync_adds_new_reembeds_changed_removes_deleted(
    tmp_path: Path, model: ModelSource, encoder: Encoder
) -> None:
    idx = tmp_path / "idx"
    c = corpus(tmp_path / "c")
    (c / "zdup_of_img0.png").write_bytes((c / "img0.png").read_bytes())
    build_index(c, idx, model)
    before = ids(idx)
    assert "zdup_of_img0.png" not in before  # a duplicate, not embedded
    (c / "img1.png").unlink()
    image(c / "img2.png", seed=77)  # same name, new picture
    st = (c / "img3.png").stat()
    os.utime(c / "img3.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only
    image(c / "zz_new.png", seed=78)
    (c / "img0.png").unlink()  # the original of a duplicate goes: the duplicate takes over
    s = sync_index(idx, c, model)
    after = ids(idx)
    assert "img1.png" not in after and "img0.png" not in after
    assert after["img2.png"] != before["img2.png"]  # re-embedded under a new id
    assert after["img3.png"] == before["img3.png"] and after["img4.png"] == before["img4.png"]
    assert "zz_new.png" in after and "zdup_of_img0.png" in after
    assert s.removed_files == 2 and s.replaced_files == 1
    aligned(idx)
    assert top(idx, encoder.embed_items("vision", [c / "img2.png"])) == ["img2.png"]
    assert top(idx, encoder.embed_items("vision", [c / "zdup_of_img0.png"])) == ["zdup_of_img0.png"]
    assert sync_index(idx, c, model).embedded_items == 0  # nothing left to do


def test_updates_refuse_another_model(tmp_path: Path, model: ModelSource) -> None:
    idx = tmp_path / "idx"
    c = corpus(tmp_path / "c", images=2, sounds=0)
    build_index(c, idx, model)
    other = ModelSource(CONFIG, None, encoder=load_encoder(config="imagebind_test"))
    with pytest.raises(ModelMismatch, match="another model"):
        add_to_index(idx, [c], other)
    with pytest.raises(ModelMismatch, match="another model"):
        sync_index(idx, c, other)


def test_cli_add_remove_sync(tmp_path: Path, checkpoint: Path) -> None:
    runner = CliRunner()
    c = corpus(tmp_path / "c", images=3, sounds=1)
    idx = tmp_path / "idx"
    r = runner.invoke(
        app,
        [
            "index",
            "build",
            str(c),
            "-o",
            str(idx),
            "--checkpoint",
            str(checkpoint),
            "--config",
            "imagebind_test",
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    extra = image(tmp_path / "extra.png", seed=9)
    r = runner.invoke(app, ["index", "add", str(idx), str(extra), "--workers", "0"])
    assert r.exit_code == 0, r.output  # the index's own model, from its manifest
    assert "embedded 1 items from 1 files" in r.stdout
    r = runner.invoke(app, ["index", "remove", str(idx), "--path", str(extra)])
    assert r.exit_code == 0 and "removed 1 items (1 files)" in r.stdout
    (c / "img0.png").unlink()
    r = runner.invoke(app, ["index", "sync", str(idx), str(c), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "removed 1 files (1 items)" in r.stdout
    r = runner.invoke(app, ["index", "remove", str(idx)])
    assert r.exit_code == 1 and r.stderr.startswith("error: give --id")
    aligned(idx)
