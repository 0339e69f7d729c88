"""The CLIP BPE tokenizer: golden parity, round trips, truncation, trimming."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import PreprocessConfig, load_encoder
from encoders.transforms.text import (
    BPE_VOCAB_PATH,
    Tokenizer,
    get_tokenizer,
    tokenize,
    trim_to_longest,
)

CFG = PreprocessConfig()
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def texts(parity_dir: Path) -> list[str]:
    data: list[str] = json.loads((parity_dir / "inputs" / "texts.json").read_text("utf-8"))
    return data


def test_matches_official_tokens(parity_dir: Path, texts: list[str]) -> None:
    expected = np.load(parity_dir / "expected" / "pre_text_tokens.npy")
    got = tokenize(texts, CFG)
    assert got.dtype == torch.int64
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize(
    "text", ["a photo of a dog", "the quick brown fox jumps over 7 lazy dogs", "x", ""]
)
def test_decode_encode_round_trip(text: str) -> None:
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_decode_restores_unicode_and_cleaning() -> None:
    tok = get_tokenizer()
    assert tok.decode(tok.encode("  Café   ZÜRICH  ")) == "café zürich"
    assert tok.decode(tok.encode("Tom &amp;amp; Jerry")) == "tom & jerry"


def test_single_string_and_table_layout() -> None:
    row = tokenize("a photo", CFG)
    assert row.shape == (1, CFG.context_length)
    tok = get_tokenizer()
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (SOT, EOT, 49408)
    assert row[0, 0] == SOT and row[0, 3] == EOT and not row[0, 4:].any()


def test_truncation_keeps_sot_first_tokens_eot() -> None:
    cfg = PreprocessConfig(context_length=8)
    row = tokenize("one two three four five six seven eight nine", cfg)[0]
    full = get_tokenizer().encode("one two three four five six seven eight nine")
    assert row.tolist() == [SOT, *full[:6], EOT]


def test_literal_special_tokens_map_to_their_ids() -> None:
    tok = get_tokenizer()
    (hi,), (there,) = tok.encode("hi"), tok.encode("there")
    row = tokenize("hi <|startoftext|> there <|ENDOFTEXT|>", CFG)[0].tolist()
    assert row[:6] == [SOT, hi, SOT, there, EOT, EOT]  # upper case too: text is lower-cased


def test_vocab_checksum_is_enforced(tmp_path: Path) -> None:
    lines = gzip.decompress(BPE_VOCAB_PATH.read_bytes()).split(b"\n")
    bad = tmp_path / "vocab.txt.gz"
    bad.write_bytes(gzip.compress(b"\n".join(lines[:-1])))
    with pytest.raises(ValueError, match="sha256"):
        Tokenizer(bad)


def test_tokenizer_is_loaded_once() -> None:
    assert get_tokenizer() is get_tokenizer()


def test_trim_to_longest_shape() -> None:
    tokens = tokenize(["a b c", "a", "x <|endoftext|> y z w"], CFG)
    trimmed = trim_to_longest(tokens)
    assert trimmed.shape == (3, 5)  # SOT a b c EOT; the literal EOT of row 3 pools at 2
    torch.testing.assert_close(trimmed, tokens[:, :5])
    with pytest.raises(ValueError):
        trim_to_longest(tokens[0])


def test_trimmed_tokens_give_the_same_embeddings(parity_dir: Path, texts: list[str]) -> None:
    enc = load_encoder(
        parity_dir / "checkpoint.pth",
        config=parity_dir / "config.json",
        modalities=["text"],
        dtype=torch.float32,
    )
    short = [t for t in texts if len(t) < 80]  # rows that leave padding to trim
    tokens = tokenize(short, CFG)
    trimmed = trim_to_longest(tokens)
    assert trimmed.shape[1] < tokens.shape[1]
    # Only float rounding differs (other matmul shapes). forward() is logit-scaled (x100 for
    # the fixture), so it is compared relatively; the unit vectors absolutely.
    full_out = enc.forward({"text": tokens})["text"]
    trim_out = enc.forward({"text": trimmed})["text"]
    torch.testing.assert_close(trim_out, full_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(enc.embed("text", trimmed), enc.embed("text", tokens), atol=1e-5)


def test_embed_trims_text_itself(
    parity_dir: Path, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller passing full-context tokens gets the trimmed (exact) vectors: the model sees
    only the batch's longest row, and a row alone gives the vector it has in any batch."""
    enc = load_encoder(
        parity_dir / "checkpoint.pth",
        config=parity_dir / "config.json",
        modalities=["text"],
        dtype=torch.float32,
    )
    short = [t for t in texts if len(t) < 80]
    tokens = tokenize(short, CFG)  # (N, 77): padded to the full context
    longest = trim_to_longest(tokens).shape[1]
    assert longest < tokens.shape[1]
    seen: list[int] = []
    inner = enc.model.embed_one

    def spy(m: object, x: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        seen.append(x.shape[1])
        return inner(m, x, scaled=scaled)  # type: ignore[arg-type]

    monkeypatch.setattr(enc.model, "embed_one", spy)
    got = enc.embed("text", tokens)
    assert seen == [longest]
    full = torch.nn.functional.normalize(enc.forward({"text": tokens})["text"], dim=-1)
    np.testing.assert_allclose(got, full.numpy(), atol=1e-5)  # forward: never trimmed
    for i in range(len(short)):
        np.testing.assert_allclose(enc.embed("text", tokens[i : i + 1])[0], got[i], atol=1e-5)
    assert seen[-1] == trim_to_longest(tokens[-1:]).shape[1]
    np.testing.assert_allclose(enc.embed("text", tokens.numpy()), got, atol=1e-6)  # numpy in
    with pytest.raises(ValueError, match="text input must have 2 dims"):
        enc.embed("text", tokens[0])
