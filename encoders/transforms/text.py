"""Text -> token ids: the OpenAI CLIP byte-level BPE, as ImageBind's text tower expects it.

Written from the published description of the scheme (see the parity fixture README); the
vocabulary is OpenAI's MIT-licensed ``bpe_simple_vocab_16e6.txt.gz``, vendored in
``encoders/data`` and checked against its sha256 when loaded.

Pipeline per text: clean (ftfy, double HTML unescape, whitespace collapse, lower-case) ->
pre-tokenise with a regex -> UTF-8 bytes mapped to printable symbols -> BPE merges by rank.
A row is ``[SOT] + ids[: context - 2] + [EOT]``, zero-padded to the context length.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import itertools
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch

from ..config import PreprocessConfig
from .errors import InvalidInput

__all__ = [
    "BPE_VOCAB_PATH",
    "BPE_VOCAB_SHA256",
    "Tokenizer",
    "count_tokens",
    "get_tokenizer",
    "read_text_file",
    "tokenize",
    "trim_to_longest",
]

BPE_VOCAB_PATH = Path(__file__).resolve().parents[1] / "data" / "bpe_simple_vocab_16e6.txt.gz"
BPE_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
_END_OF_WORD = "</w>"

# Pre-tokenisation. Alternation order matters: the special tokens win over the punctuation run,
# contractions over the letter run. IGNORECASE only matters for the specials (text is already
# lower-cased), and is kept so the match set is the reference one.
_PIECES = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>"
    r"|'(?:s|t|re|ve|m|ll|d)"
    r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
# The `regex` module's \s (Unicode White_Space), not `re`'s, so e.g. U+001C..U+001F survive.
_WHITESPACE = regex.compile(r"\s+")


def _byte_symbols() -> tuple[list[str], list[str]]:
    """One printable character per byte value: (by byte value, in token-table order).

    Bytes that are already visible Latin-1 characters stand for themselves; the other 68
    (controls, space, soft hyphen, ...) are given the code points 256, 257, ... in byte order,
    so no symbol is whitespace and BPE never sees a separator inside a word. The token table
    lists the visible bytes first (ascending), then the remapped ones (ascending).
    """
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    hidden = sorted(set(range(256)) - set(visible))
    by_byte = [""] * 256
    for b in visible:
        by_byte[b] = chr(b)
    for k, b in enumerate(hidden):
        by_byte[b] = chr(256 + k)
    return by_byte, [by_byte[b] for b in visible + hidden]


def clean_text(text: str) -> str:
    """The reference cleaning: ftfy, HTML unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    collapsed: str = _WHITESPACE.sub(" ", text)  # `regex` ships no type hints
    return collapsed.strip().lower()


class Tokenizer:
    """CLIP BPE tokenizer over a merges file.

    Token table: the 256 byte symbols, the same with ``</w>``, one id per merge (in rank
    order), then ``<|startoftext|>`` and ``<|endoftext|>``.
    """

    def __init__(
        self,
        vocab_path: str | Path = BPE_VOCAB_PATH,
        vocab_size: int = 49408,
        sha256: str | None = BPE_VOCAB_SHA256,
        cache_size: int = 65536,
    ) -> None:
        """Load and verify the merges file.

        Args:
            vocab_path: the gzipped merges file (first line a header, then one merge a line).
            vocab_size: total ids; fixes how many merges are used (``vocab_size - 514``).
            sha256: expected digest of the file; None skips the check (custom vocabularies).
            cache_size: words whose merges are memoised (BPE dominates the cost).
        """
        path = Path(vocab_path)
        raw = path.read_bytes()
        if sha256 is not None:
            got = hashlib.sha256(raw).hexdigest()
            if got != sha256:
                raise ValueError(
                    f"BPE vocabulary {path} has sha256 {got}, expected {sha256}: the file is "
                    "corrupt or not OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz"
                )
        n_merges = vocab_size - 2 * 256 - 2
        lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 1 + n_merges]
        if len(lines) != n_merges:
            raise ValueError(f"{path} holds {len(lines)} merges, vocab_size needs {n_merges}")
        merges = [tuple(line.split()) for line in lines]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not a merges file: every line must hold two symbols")

        self._byte_to_symbol, ordered = _byte_symbols()
        self._symbol_to_byte = {s: b for b, s in enumerate(self._byte_to_symbol)}
        table = [*ordered, *(s + _END_OF_WORD for s in ordered)]
        table += [a + b for a, b in merges]
        table += [SOT, EOT]
        self._id_to_token = table
        self._token_to_id = {t: i for i, t in enumerate(table)}
        self._rank = {(a, b): r for r, (a, b) in enumerate(merges)}
        self.vocab_size = len(table)
        self.sot_id = self._token_to_id[SOT]
        self.eot_id = self._token_to_id[EOT]
        # Per-instance memo (an lru_cache on the method would pin every instance alive).
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._word_ids_uncached)

    def _merge(self, word: str) -> list[str]:
        """BPE one pre-token (already byte symbols): repeatedly join the best-ranked pair."""
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        rank = self._rank
        while len(parts) > 1:
            best: tuple[str, str] | None = None
            best_rank = 0
            for pair in itertools.pairwise(parts):
                r = rank.get(pair)
                if r is not None and (best is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            # Join every occurrence of the pair, scanning left to right without overlap.
            joined: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    joined.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    joined.append(parts[i])
                    i += 1
            parts = joined
        return parts

    def _word_ids_uncached(self, piece: str) -> tuple[int, ...]:
        if piece in (SOT, EOT):  # a literal special token in the text is the special id
            return (self._token_to_id[piece],)
        word = "".join(self._byte_to_symbol[b] for b in piece.encode("utf-8"))
        return tuple(self._token_to_id[p] for p in self._merge(word))

    def encode(self, text: str) -> list[int]:
        """Cleaned, BPE-encoded ids of one text, without start/end tokens or truncation."""
        ids: list[int] = []
        for piece in _PIECES.findall(clean_text(text)):
            ids.extend(self._word_ids(piece))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text: word ends become spaces, trailing space dropped; bad UTF-8 -> U+FFFD."""
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out = bytearray()
        for i in seq:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            token = self._id_to_token[i]
            if token in (SOT, EOT):
                out += token.encode("ascii")
                continue
            word_end = token.endswith(_END_OF_WORD)
            if word_end:
                token = token[: -len(_END_OF_WORD)]
            out += bytes(self._symbol_to_byte[s] for s in token)
            if word_end:
                out += b" "
        return out.decode("utf-8", errors="replace").rstrip(" ")

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
        """Texts -> (N, context_length) int64 rows: SOT, ids cut to fit, EOT, zero padding."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, got {type(text).__name__} at index {row}")
            ids = [*[self.sot_id, *self.encode(text)][: context_length - 1], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_size: int = 49408) -> Tokenizer:
    """The vendored CLIP tokenizer, loaded once per process (about 0.3 s to build)."""
    return Tokenizer(vocab_size=vocab_size)


def tokenize(texts: str | Sequence[str], cfg: PreprocessConfig) -> torch.Tensor:
    """Texts -> (N, cfg.context_length) int64 token ids, exactly as the official loader.

    A str is one text (N = 1). Long texts keep their first ``context_length - 2`` BPE tokens.
    """
    return get_tokenizer(cfg.vocab_size)(texts, cfg.context_length)


def count_tokens(text: str, vocab_size: int = 49408) -> int:
    """BPE tokens of ``text``, without start/end tokens: a row keeps the first ``context - 2``.

    What a caller reports when a long text is cut (``tokenize`` truncates CLIP-style).
    """
    return len(get_tokenizer(vocab_size).encode(text))


def trim_to_longest(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the columns after the last pooled position of the batch: (N, L) -> (N, L').

    The model pools each row at the argmax of its ids (its first end-of-text token), and the
    causal mask means later positions never influence earlier ones, so the embeddings are
    unchanged while attention runs over fewer positions. Returns a view.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (N, L), got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        return tokens
    last = int(tokens.argmax(dim=-1).max())
    return tokens[:, : last + 1]


MAX_TEXT_FILE_BYTES = 1 << 20  # a text item is a caption-sized string; the model reads 77 tokens


def read_text_file(path: str | Path, max_chars: int = 20_000) -> str:
    """A text file (``.txt``/``.md``/``.text``) -> its UTF-8 text, stripped, cut to ``max_chars``.

    Raises ``InvalidInput`` for a file over 1 MiB, one that is not UTF-8, or one with no text.
    """
    with open(path, "rb") as f:
        raw = f.read(MAX_TEXT_FILE_BYTES + 1)
    if len(raw) > MAX_TEXT_FILE_BYTES:
        raise InvalidInput(f"text file over {MAX_TEXT_FILE_BYTES} bytes; accepted: a caption")
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise InvalidInput("not UTF-8 text; accepted: UTF-8 text files") from None
    if not text:
        raise InvalidInput("the text file holds no text")
    return text[:max_chars]
