"""From request inputs to unit vectors: caps, modality, decoding off the loop, the batcher.

Order matters: cheap checks first (counts, bytes, text length, the modality), then a load
check against the queues (so an overloaded service does not decode what it will refuse),
then decoding in the thread pool, then the batcher. Errors come out as ``ServiceError``s.

A text longer than the model's context is not refused: the model reads its first
``max_text_tokens`` tokens (CLIP-style truncation) and ``TextTokens`` says so to the route,
which tells the client. ``max_text_chars`` is only a bound on the work (README, "Limits").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from encoders import InputLimits, InvalidInput, Modality
from encoders.formats import detect
from encoders.transforms.text import count_tokens
from encoders.vectors import mix as mix_vectors

from .batcher import Batcher
from .embedders import Embedder, Sample
from .errors import InvalidContent, MalformedRequest, PayloadTooLarge, UnsupportedMedia
from .settings import ServiceSettings

# Texts up to this length are tokenized on the event loop (BPE of a sentence: ~0.1 ms), not in
# the decode pool: two thread hops cost more than that on a busy machine.
INLINE_TEXT_CHARS = 1000


@dataclass(frozen=True)
class TextInput:
    text: str
    name: str = "text"


@dataclass(frozen=True)
class BlobInput:
    """An upload's bytes; ``modality`` None means: detect it (``encoders.formats.detect``).

    ``filename`` is the client's name for the file, a name hint for detection only (it never
    reaches the filesystem); ``name`` is how messages call the input.
    """

    data: bytes
    modality: Modality | None
    name: str
    filename: str | None = None


Input = TextInput | BlobInput


@dataclass(frozen=True)
class TextTokens:
    """A text's BPE tokens and how many of them the model read (the rest were cut)."""

    tokens: int
    read: int

    @property
    def truncated(self) -> bool:
        return self.tokens > self.read


@dataclass(frozen=True)
class Embedded:
    """``Pipeline.embed_all``'s answer: (N, D) unit vectors, their modalities, text tokens.

    ``texts[i]`` is None unless input ``i`` was text (a string or a text file) and the model
    says how many tokens it reads.
    """

    vectors: np.ndarray
    modalities: list[Modality]
    texts: list[TextTokens | None]


def parse_modality(value: str | None, what: str = "modality") -> Modality | None:
    """A client's modality name (None or empty: not given); 400 listing the accepted names."""
    if value is None or not value.strip():
        return None
    try:
        return Modality.parse(value)
    except ValueError as e:
        raise MalformedRequest(f"{what}: {e}") from None


def decode_base64(data: str, name: str) -> bytes:
    """Standard or URL-safe base64, padding optional; 400 when it is not base64."""
    try:  # the common case, standard alphabet without whitespace: no 100 KB regex pass
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        pass
    s = re.sub(r"\s+", "", data)
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest(f"{name}: `data` is not valid base64") from None


_DATA_URI = re.compile(r"^data:(?P<params>[^,]*?);base64,(?P<payload>.*)$", re.DOTALL)


def parse_data_uri(s: str, name: str) -> BlobInput | None:
    """``data:<mime>[;modality=<m>];base64,<payload>`` -> a BlobInput; None if not a data URI.

    ``;modality=`` names the modality (``data:image/png;modality=depth;base64,...``);
    otherwise it is detected from the content as for every upload (the MIME type is not read:
    one rule decides, see docs/modalities.md).
    """
    if not s.startswith("data:"):
        return None
    m = _DATA_URI.match(s)
    if m is None:
        raise MalformedRequest(
            f"{name}: a data URI must be base64: data:<mime>[;modality=<name>];base64,<payload>"
        )
    params = [p.strip() for p in m["params"].split(";")]
    modality: Modality | None = None
    for p in params[1:]:
        if p.lower().startswith("modality="):
            modality = parse_modality(p.split("=", 1)[1], f"{name}: modality")
    return BlobInput(decode_base64(m["payload"], name), modality, name)


def mix(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Embedding arithmetic (``encoders.vectors.mix``); 422 when the terms cancel out."""
    try:
        return mix_vectors(vectors, weights)
    except InvalidInput as e:
        raise InvalidContent(str(e)) from None


class Pipeline:
    """Caps, modality resolution, decoding (thread pool) and batching, for one app."""

    def __init__(
        self,
        embedder: Embedder,
        batcher: Batcher,
        settings: ServiceSettings,
        decode_pool: ThreadPoolExecutor,
    ) -> None:
        self.embedder = embedder
        self.batcher = batcher
        self.settings = settings
        self.decode_pool = decode_pool
        self.modalities = frozenset(embedder.info.modalities)
        self.limits = InputLimits(
            max_bytes=settings.max_upload_bytes,
            max_text_chars=settings.max_text_chars,
            max_audio_seconds=settings.max_audio_seconds,
            max_pixels=settings.max_pixels,
        )

    def check_count(self, n: int, what: str = "inputs") -> None:
        if n > self.settings.max_inputs:
            raise PayloadTooLarge(
                f"{n} {what} in one request; the limit is {self.settings.max_inputs}"
            )

    def modality_of(self, inp: Input) -> Modality:
        """The input's modality (detected if not given), checked against caps and the model."""
        if isinstance(inp, TextInput):
            m = Modality.TEXT
            if len(inp.text) > self.settings.max_text_chars:
                raise PayloadTooLarge(
                    f"{inp.name}: {len(inp.text)} characters; the limit is "
                    f"{self.settings.max_text_chars}"
                )
            if not inp.text.strip():
                raise InvalidContent(f"{inp.name}: the text is empty")
        else:
            if len(inp.data) > self.settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"{inp.name}: {len(inp.data)} bytes; the limit is "
                    f"{self.settings.max_upload_bytes} bytes per upload"
                )
            if not inp.data:
                raise InvalidContent(f"{inp.name}: the upload is empty (0 bytes)")
            m = inp.modality or self._detect(inp)
        if m not in self.modalities:
            accepted = ", ".join(sorted(x.value for x in self.modalities))
            raise UnsupportedMedia(
                f"{inp.name}: this model does not embed {m.value}; it embeds {accepted}"
            )
        return m

    @staticmethod
    def _detect(inp: BlobInput) -> Modality:
        found = detect(inp.data, inp.filename)
        if found.modality is None:
            raise UnsupportedMedia(
                f"{inp.name}: {found.reason}; or give `modality` to say what it is"
            )
        return found.modality

    def _decode(self, m: Modality, inp: Input) -> tuple[Sample, TextTokens | None]:
        """Runs in the decode pool: header caps (pixels, duration), then the full decode."""
        item: bytes | str
        note = None
        if isinstance(inp, TextInput):
            item = inp.text
            note = self._text_tokens(item)
        elif m is Modality.TEXT:  # a text file: its UTF-8 content, with the caps of `text`
            item = self._file_text(inp)
            note = self._text_tokens(item)
        else:
            item = inp.data
            try:
                self.limits.check_content(m, item, inp.name)
            except InvalidInput as e:
                raise PayloadTooLarge(str(e)) from None
        try:
            return self.embedder.preprocess(m, item), note
        except InvalidInput as e:
            msg = str(e).replace("<bytes #0>", inp.name)
            raise InvalidContent(msg if inp.name in msg else f"{inp.name}: {msg}") from None

    def _text_tokens(self, text: str) -> TextTokens | None:
        """How many tokens ``text`` has and the model reads; None when it reads them all."""
        info = self.embedder.info
        if info.max_text_tokens is None:
            return None
        n = count_tokens(text, info.vocab_size)
        return TextTokens(n, min(n, info.max_text_tokens))

    def _file_text(self, inp: BlobInput) -> str:
        try:
            text = inp.data.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            raise InvalidContent(f"{inp.name}: a text file must be UTF-8") from None
        if not text:
            raise InvalidContent(f"{inp.name}: the text file holds no text")
        if len(text) > self.settings.max_text_chars:
            raise PayloadTooLarge(
                f"{inp.name}: {len(text)} characters; the limit is {self.settings.max_text_chars}"
            )
        return text

    async def embed(self, inputs: Sequence[Input]) -> tuple[np.ndarray, list[Modality]]:
        """Inputs -> ((N, D) unit vectors, their modalities), in order."""
        out = await self.embed_all(inputs)
        return out.vectors, out.modalities

    async def embed_all(self, inputs: Sequence[Input]) -> Embedded:
        """Inputs -> their unit vectors, modalities and text token counts, in order."""
        self.check_count(len(inputs))
        mods = [self.modality_of(inp) for inp in inputs]
        counts: dict[Modality, int] = {}
        for m in mods:
            counts[m] = counts.get(m, 0) + 1
        self.batcher.check_room(counts)  # shed load before spending CPU on decoding
        loop = asyncio.get_running_loop()

        async def decode(m: Modality, inp: Input) -> tuple[Sample, TextTokens | None]:
            if isinstance(inp, TextInput) and len(inp.text) <= INLINE_TEXT_CHARS:
                return self._decode(m, inp)  # tens of microseconds: a thread hop costs more
            return await loop.run_in_executor(self.decode_pool, self._decode, m, inp)

        decoded = await asyncio.gather(
            *(decode(m, inp) for m, inp in zip(mods, inputs, strict=True))
        )
        samples = [s for s, _ in decoded]
        vectors = await self.batcher.embed(list(zip(mods, samples, strict=True)))
        return Embedded(vectors, mods, [t for _, t in decoded])
