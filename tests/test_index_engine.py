"""The build's engine contract (``index.engine``): engines return files in any order and one
writer gives the same index; text batches are length-bucketed on both engines (the local one
and the Ray actor's shard, run here without Ray); the Ray engine imports no private name."""

from __future__ import annotations

import ast
import dataclasses
import os
import random
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import Encoder, Modality, load_encoder
from encoders.config import resolve_config
from index import BuildOptions, IndexStoreError, ModelSource, build_index, engine
from index.engine import (
    DecodedItem,
    EmbeddedFile,
    EmbeddedItem,
    FileTask,
    KnownContent,
    nothing_known,
)
from index.importer import import_embeddings
from index.pipeline import LocalEngine, run_build
from index.ray_engine import (
    auto_shard_files,
    choose_shard_files,
    plan_shards,
    read_shard,
    shard_complete,
    write_shard,
)

from .test_index_media import mixed_corpus

CONFIG = resolve_config("imagebind_test")
REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "a dog",
    "a red ring moving left far in the snow under a grey sky while a bird flies over the hill",
    "cat",
    "two people playing guitar on a street corner at night in the rain",
    "sunset",
    "an old man walking his small dog along the beach at dawn",
]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return load_encoder(config=CONFIG, dtype=torch.float32)


class LengthRecorder:
    """An encoder that records, per text batch, each row's length (its end-of-text position)."""

    def __init__(self, enc: Encoder) -> None:
        self.enc = enc
        self.batches: list[list[int]] = []

    def embed(self, modality: Modality | str, x: torch.Tensor | np.ndarray) -> np.ndarray:
        if Modality.parse(modality) is Modality.TEXT:
            self.batches.append(torch.as_tensor(x).argmax(dim=-1).tolist())
        return self.enc.embed(modality, x)


def text_corpus(root: Path) -> Path:
    root.mkdir()
    for i, text in enumerate(TEXTS * 2):  # long and short captions alternate
        (root / f"t{i:02d}.txt").write_text(f"{text} {i}", encoding="utf-8")
    return root


def assert_bucketed(batches: list[list[int]], batch_size: int, n_texts: int) -> None:
    """Batches of ``batch_size``; within each window of TEXT_BUCKET_BATCHES, sorted by length."""
    assert sum(map(len, batches)) == n_texts
    assert all(len(b) == batch_size for b in batches[:-1])
    window = engine.TEXT_BUCKET_BATCHES
    for start in range(0, len(batches), window):
        lengths = [n for b in batches[start : start + window] for n in b]
        assert lengths == sorted(lengths), lengths


def test_local_engine_buckets_text_batches(encoder: Encoder, tmp_path: Path) -> None:
    corpus = text_corpus(tmp_path / "corpus")
    rec = LengthRecorder(encoder)
    source = ModelSource(CONFIG, None, encoder=rec)  # type: ignore[arg-type]
    build_index(corpus, tmp_path / "idx", source, BuildOptions(batch_size=2))
    assert len(rec.batches) == 6
    assert_bucketed(rec.batches, 2, len(TEXTS) * 2)
    # The first window took the first 8 files in scan order, sorted: short ones first.
    assert rec.batches[0][0] < rec.batches[3][-1]


def test_a_ray_shard_is_embedded_as_locally_and_staged_for_import(
    encoder: Encoder, tmp_path: Path
) -> None:
    """The Ray actor's work on one shard (no cluster needed): the local engine's batches, a
    shard in ``index import``'s layout, read back by the driver with each text's vector."""
    corpus = text_corpus(tmp_path / "corpus")
    paths = sorted(corpus.iterdir())
    todo = [FileTask(i, str(p), Modality.TEXT) for i, p in enumerate(paths)]
    # One shard: a cut needs a path hashing to 0 modulo shard_files, and the paths are under
    # tmp_path (different each run): with 64, 1 run in 6 cut the 12 files in two.
    (plan,) = plan_shards(todo, 1 << 40, "salt")
    rec = LengthRecorder(encoder)
    source = ModelSource(CONFIG, None, encoder=rec)  # type: ignore[arg-type]
    staging = tmp_path / "shards"
    ack = write_shard(staging, plan, LocalEngine(source, BuildOptions(batch_size=2)), 16)
    assert ack["name"] == plan.name and (ack["files"], ack["items"]) == (12, 12)
    assert set(ack) == {"name", "files", "items", "model_s", "decode_wait_s"}  # no vectors
    assert_bucketed(rec.batches, 2, 12)
    assert shard_complete(staging, plan.name)
    assert [p.name for p in staging.iterdir()] == [plan.name]  # no temporary folder left
    files = list(read_shard(staging, plan, CONFIG.embed_dim))
    assert [f.seq for f in files] == list(range(12))
    texts = [p.read_text(encoding="utf-8") for p in paths]
    got = np.stack([f.items[0].vector for f in files if f.items[0].vector is not None])
    np.testing.assert_allclose(got, encoder.embed_items("text", texts), atol=1e-6)
    # The staged shard is an embeddings folder `index import` reads (items.npy + items.jsonl).
    s = import_embeddings(staging / plan.name, tmp_path / "imported", "text", dim=16)
    assert s.embedded_items == 12 and s.items_by_modality == {"text": 12}


def test_shard_boundaries_follow_the_paths_not_the_positions() -> None:
    """A rerun with a committed prefix (fewer files to do) plans the later shards as before."""
    todo = [FileTask(i, f"/corpus/f{i:04d}.txt", Modality.TEXT) for i in range(400)]
    plans = plan_shards(todo, 8, "salt")
    assert [t for p in plans for t in p.tasks] == todo  # contiguous, in scan order, all of them
    assert len(plans) > 20 and max(len(p.tasks) for p in plans) <= 16
    assert len({p.name for p in plans}) == len(plans)
    later = plan_shards([dataclasses.replace(t, seq=t.seq - 37) for t in todo[37:]], 8, "salt")
    names = {p.name for p in plans}
    assert sum(p.name in names for p in later) >= len(later) - 2  # the cut shard, maybe one more
    assert plan_shards(todo, 8, "another model")[0].name != plans[0].name


def test_the_files_per_shard_are_chosen_once_per_build(tmp_path: Path) -> None:
    assert [auto_shard_files(n) for n in (1, 40, 128, 1000, 10**7)] == [1, 1, 4, 16, 256]
    assert choose_shard_files(tmp_path, 1000, None) == 16
    # A rerun has fewer files to do (a committed prefix): it keeps the first run's choice.
    assert choose_shard_files(tmp_path, 100, None) == 16
    assert choose_shard_files(tmp_path, 100, 5) == 5  # --shard-files wins, and is recorded
    assert choose_shard_files(tmp_path, 100, None) == 5


# --- any order, one writer ---------------------------------------------------------------------


class Shuffled:
    """An engine that returns the local engine's files in a random order, all at the end."""

    def __init__(self, inner: LocalEngine, seed: int) -> None:
        self.inner, self.seed = inner, seed

    @property
    def model_s(self) -> float:
        return self.inner.model_s

    @property
    def decode_wait_s(self) -> float:
        return self.inner.decode_wait_s

    def run(
        self, todo: Sequence[FileTask], known: KnownContent = nothing_known
    ) -> Iterator[EmbeddedFile]:
        files = list(self.inner.run(todo))  # nothing skipped early: the writer deduplicates
        random.Random(self.seed).shuffle(files)
        yield from files


def rows(idx: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(idx / "meta.sqlite") as db:
        items = db.execute("SELECT id, path, modality, start_s, chunk FROM items ORDER BY id")
        files = db.execute("SELECT path, status, duplicate_of, error FROM files ORDER BY path")
        return [*items.fetchall(), *files.fetchall()]


def test_files_in_any_order_give_the_same_index(encoder: Encoder, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    mixed_corpus(corpus)
    model = ModelSource(CONFIG, None, encoder=encoder)
    opts = {"chunk_items": 3, "batch_size": 2}
    ref = build_index(corpus, tmp_path / "ref", model, BuildOptions(**opts))
    o = BuildOptions(**opts)
    got = run_build(corpus, tmp_path / "any", model, Shuffled(LocalEngine(model, o), 1), o)
    assert rows(tmp_path / "any") == rows(tmp_path / "ref")
    assert (got.embedded_items, got.duplicates, got.chunks) == (
        ref.embedded_items,
        ref.duplicates,
        ref.chunks,
    )
    assert got.duplicates >= 1 and got.rejected == ref.rejected


class Loses(Shuffled):
    """An engine that never returns the first file."""

    def run(
        self, todo: Sequence[FileTask], known: KnownContent = nothing_known
    ) -> Iterator[EmbeddedFile]:
        yield from list(self.inner.run(todo))[1:]


def test_an_engine_that_loses_a_file_is_an_error(encoder: Encoder, tmp_path: Path) -> None:
    corpus = text_corpus(tmp_path / "corpus")
    model = ModelSource(CONFIG, None, encoder=encoder)
    o = BuildOptions()
    with pytest.raises(Exception, match=r"no result for .*t00\.txt"):
        run_build(corpus, tmp_path / "idx", model, Loses(LocalEngine(model, o), 0), o)


def test_the_local_engine_skips_known_content(encoder: Encoder, tmp_path: Path) -> None:
    corpus = text_corpus(tmp_path / "corpus")
    (corpus / "copy.txt").write_bytes((corpus / "t03.txt").read_bytes())
    rec = LengthRecorder(encoder)
    model = ModelSource(CONFIG, None, encoder=rec)  # type: ignore[arg-type]
    opts = BuildOptions(batch_size=64)
    todo = [FileTask(i, str(p), Modality.TEXT) for i, p in enumerate(sorted(corpus.glob("*.txt")))]
    files = list(LocalEngine(model, opts).run(todo))
    skipped = [todo[f.seq].path for f in files if f.skipped]
    assert skipped == [str(corpus / "t03.txt")]  # the later copy in scan order (copy < t03)
    assert sum(map(len, rec.batches)) == len(todo) - 1
    files = list(LocalEngine(model, opts).run(todo, known=lambda sha: True))
    assert all(f.skipped and not f.items for f in files)


def test_embedded_file_is_embedded_when_its_live_items_have_vectors() -> None:
    live = EmbeddedItem(DecodedItem("text", np.zeros(3)))
    dead = EmbeddedItem(DecodedItem("text", np.zeros(3)), dead=True)
    f = EmbeddedFile(0, items=[live, dead])
    assert not f.embedded
    live.vector = np.ones(4, np.float32)
    assert f.embedded


# --- the Ray engine uses only public names ------------------------------------------------------


def test_the_ray_engine_imports_no_private_name() -> None:
    tree = ast.parse((REPO / "index" / "ray_engine.py").read_text(encoding="utf-8"))
    imported = [
        (node.module or "", alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    ]
    assert ("pipeline", "run_build") in imported  # the walk sees the relative imports
    private = [(m, n) for m, n in imported if n.startswith("_")]
    assert private == []
    # Nor does it reach into another module's private attributes (pipe._select and the like).
    attrs = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        and not node.attr.startswith("__")
    ]
    assert attrs == []


# --- staged shards left behind -------------------------------------------------------------------


def leftover_shards(idx: Path) -> Path:
    """What a Ray build killed mid-way leaves in INDEX/shards/: a plan and a complete shard."""
    shard = idx / engine.SHARDS / "0123abcd"
    shard.mkdir(parents=True)
    (shard / "done.json").write_text("{}")
    (idx / engine.SHARDS / "plan.json").write_text("{}")
    return shard


class Staging(Shuffled):
    """A staging engine (as the Ray engine is to the build), embedding locally."""

    shards_built = shards_reused = 0

    def stage_in(self, index_dir: Path) -> None:
        self.staging = index_dir / engine.SHARDS

    def committed(self) -> None:
        self.committed_seen = self.staging.is_dir()


def test_a_finished_local_build_deletes_the_shards_a_ray_build_left(
    encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only after its commit, and never while a staging (Ray) build holds them: that build is
    refused while another holds them, and deletes them itself once committed."""
    corpus = text_corpus(tmp_path / "corpus")
    model = ModelSource(CONFIG, None, encoder=encoder)
    o = BuildOptions()
    with pytest.raises(Exception, match="no result for"):  # interrupted: nothing committed
        run_build(corpus, tmp_path / "idx", model, Loses(LocalEngine(model, o), 0), o)
    leftover_shards(tmp_path / "idx")
    summary = build_index(corpus, tmp_path / "idx", model, o)
    assert summary.embedded_items == len(TEXTS) * 2
    assert not (tmp_path / "idx" / engine.SHARDS).exists()
    assert rows(tmp_path / "idx")  # the index itself is whole

    # A staging build running (it holds INDEX/shards/): a local build leaves its shards alone,
    # and another staging build is refused in one line.
    idx = tmp_path / "busy"
    with pytest.raises(Exception, match="no result for"):
        run_build(corpus, idx, model, Loses(LocalEngine(model, o), 0), o)
    fd = engine.hold_staging(idx)
    try:
        shard = leftover_shards(idx)
        monkeypatch.setattr(engine, "_LOCK_TRIES", 1)
        with pytest.raises(IndexStoreError, match=r"another build is staging shards in .*busy"):
            run_build(corpus, idx, model, Staging(LocalEngine(model, o), 0), o)
        build_index(corpus, idx, model, o)
        assert (shard / "done.json").is_file() and rows(idx)
    finally:
        os.close(fd)
    # Released: the next build (of a complete index, which it leaves as it is) deletes them.
    again = build_index(corpus, idx, model, o)
    assert again.already == len(TEXTS) * 2
    assert not (idx / engine.SHARDS).exists()
    # A staging build holds its folder through its commit.
    staged = Staging(LocalEngine(model, o), 0)
    run_build(corpus, tmp_path / "staged", model, staged, o)
    assert staged.committed_seen
    assert engine.remove_staging(tmp_path / "staged")


def test_leftover_shards_behind_a_symlink_are_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / engine.SHARDS).symlink_to(elsewhere)
    assert not engine.remove_staging(tmp_path / "idx")
    assert (elsewhere / "keep").is_dir()
