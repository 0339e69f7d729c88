"""The performance changes of issue 10 leave every vector unchanged: text trimming on the tiny
model, and the index build's length-bucketed text batches (ids and vectors as without)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import Encoder, Modality, load_encoder
from encoders.transforms.text import tokenize, trim_to_longest
from index import BuildOptions, ModelSource, build_index, engine

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
    return load_encoder(config="imagebind_test", modalities=["text"], dtype=torch.float32)


def test_trimming_is_exact_on_the_tiny_model(encoder: Encoder) -> None:
    tokens = tokenize(TEXTS, encoder.preprocess_cfg)
    trimmed = trim_to_longest(tokens)
    assert trimmed.shape[1] < tokens.shape[1]
    full = encoder.forward({"text": tokens})["text"]
    short = encoder.forward({"text": trimmed})["text"]
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    # Each row alone, trimmed to its own length, gives the same vector as in the batch.
    for i in range(len(TEXTS)):
        alone = encoder.embed("text", trim_to_longest(tokens[i : i + 1]))
        np.testing.assert_allclose(alone[0], encoder.embed("text", tokens)[i], atol=1e-6)


class _Recorder:
    """An encoder that records the width of every text batch it embeds (after its trimming)."""

    def __init__(self, enc: Encoder) -> None:
        self.enc = enc
        self.widths: list[int] = []

    def embed(self, modality: Modality | str, x: torch.Tensor | np.ndarray) -> np.ndarray:
        self.widths.append(int(trim_to_longest(torch.as_tensor(x)).shape[1]))
        return self.enc.embed(modality, x)


def _vectors(root: Path) -> dict[str, np.ndarray]:
    """path -> vector, from the committed chunks (vector id == items row id)."""
    chunks = sorted((root / "chunks").glob("*.npy"))
    vectors = np.concatenate([np.load(c) for c in chunks])
    with sqlite3.connect(root / "meta.sqlite") as db:
        rows = db.execute("SELECT id, path FROM items ORDER BY id").fetchall()
    assert len(rows) == len(vectors)
    return {path: vectors[i] for i, (_, path) in enumerate(rows)}


def _ids(root: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(root / "meta.sqlite") as db:
        return [(int(i), str(p)) for i, p in db.execute("SELECT id, path FROM items ORDER BY id")]


def test_length_bucketing_keeps_ids_and_vectors(
    encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS * 2):  # long and short captions alternate
        (corpus / f"t{i:02d}.txt").write_text(f"{text} {i}", encoding="utf-8")
    built = {}
    widths = {}
    for bucket in (1, 4):
        monkeypatch.setattr(engine, "TEXT_BUCKET_BATCHES", bucket)
        rec = _Recorder(encoder)
        source = ModelSource(encoder.config, None, encoder=rec)  # type: ignore[arg-type]
        build_index(corpus, tmp_path / f"idx{bucket}", source, BuildOptions(batch_size=2))
        built[bucket] = tmp_path / f"idx{bucket}"
        widths[bucket] = rec.widths
    # Sorted buckets pair short with short: fewer token positions in all, same batch count.
    assert len(widths[4]) == len(widths[1])
    assert sum(widths[4]) < sum(widths[1])
    # Same ids for the same files, and the same vectors (float rounding aside).
    assert _ids(built[4]) == _ids(built[1])
    a, b = _vectors(built[1]), _vectors(built[4])
    assert a.keys() == b.keys() and len(a) == len(TEXTS) * 2
    for path in a:
        np.testing.assert_allclose(b[path], a[path], atol=1e-6)
    # And each is the vector of that text embedded on its own.
    for path, vec in b.items():
        alone = encoder.embed_items("text", [Path(path).read_text(encoding="utf-8")])[0]
        np.testing.assert_allclose(vec, alone, atol=1e-6)
