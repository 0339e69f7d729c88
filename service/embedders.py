"""The ``Embedder`` protocol the service talks to, a fake one for tests, and the real one.

The service never imports torch: ``TorchEmbedder`` wraps an ``encoders.Encoder`` and is the
only place that touches tensors, and the batches it is given are opaque to the service.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from encoders import InputLimits, InvalidInput, Modality
from encoders.vectors import unit as unit  # re-exported: service.searchers uses it

if TYPE_CHECKING:
    from encoders import Encoder, ModelRef

# A prepared sample: whatever the embedder's ``preprocess`` returns, handed back to ``embed``.
Sample = Any


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/info`` says about the model.

    ``sha256`` (of the weights) and ``decoder`` (the demo decoder made for them) come from the
    model's ``encoders.ModelRef``; None for a fake model or random weights. ``max_text_tokens``:
    the BPE tokens (``vocab_size``) of a text the model reads, the rest cut CLIP-style; None:
    it reads every token.
    """

    name: str
    licence: str
    licence_url: str | None
    dim: int
    modalities: tuple[Modality, ...]
    device: str
    dtype: str
    sha256: str | None = None
    decoder: Path | None = None
    max_text_tokens: int | None = None
    vocab_size: int = 49408


@runtime_checkable
class Embedder(Protocol):
    """Turns inputs into L2-normalised float32 vectors, in two steps the service schedules.

    ``preprocess`` runs in a pool of decode threads before a request joins the queue;
    ``embed`` runs on the single model thread with a batch of prepared samples of one modality.
    """

    @property
    def info(self) -> ModelInfo: ...

    def preprocess(self, modality: Modality, item: bytes | str) -> Sample:
        """One input (bytes; a string for text) -> one prepared sample; raises InvalidInput."""
        ...

    def embed(self, modality: Modality, batch: Sequence[Sample]) -> np.ndarray:
        """Prepared samples -> (N, D) float32 unit vectors, in order."""
        ...

    def warmup(self) -> None:
        """Run each tower once so the first request does not pay for lazy initialisation."""
        ...


class FakeEmbedder:
    """Deterministic hash-based vectors, no model: for service tests.

    The vector of an input depends only on its modality and content, so tests can compute the
    expected answer with ``vector_for``. Inputs whose bytes start with ``b"BAD"`` (or text
    starting with ``"BAD"``) fail preprocessing; ``fail_embed`` makes every batch fail;
    ``gate``, when given, is waited on before each batch (to pile requests up in tests), and
    ``entered`` is set when a batch has reached the model.
    """

    def __init__(
        self,
        dim: int = 8,
        modalities: Sequence[Modality] = tuple(Modality),
        fail_embed: bool = False,
        gate: threading.Event | None = None,
        on_batch: Callable[[Modality, int], None] | None = None,
        max_text_tokens: int | None = 75,
    ) -> None:
        self.dim = dim
        self.max_text_tokens = max_text_tokens  # reported as the real model's (77 - 2)
        self._modalities = tuple(modalities)
        self.fail_embed = fail_embed
        self.gate = gate
        self.on_batch = on_batch
        self.batch_sizes: list[int] = []
        self.entered = threading.Event()

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name="fake",
            licence="none (hash-based test vectors)",
            licence_url=None,
            dim=self.dim,
            modalities=self._modalities,
            device="cpu",
            dtype="float32",
            max_text_tokens=self.max_text_tokens,
        )

    def vector_for(self, modality: Modality | str, item: bytes | str) -> np.ndarray:
        """The (D,) unit vector this embedder gives ``item``."""
        data = item.encode() if isinstance(item, str) else item
        seed = hashlib.sha256(Modality.parse(modality).value.encode() + b"\0" + data).digest()
        rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
        return unit(rng.standard_normal(self.dim))

    def preprocess(self, modality: Modality, item: bytes | str) -> Sample:
        if modality is Modality.TEXT and not isinstance(item, str):
            raise InvalidInput("text must be a string")
        if (isinstance(item, str) and item.startswith("BAD")) or (
            isinstance(item, bytes) and item.startswith(b"BAD")
        ):
            raise InvalidInput(f"cannot read as {modality.value} (fake decoder refused it)")
        return (modality, item)

    def embed(self, modality: Modality, batch: Sequence[Sample]) -> np.ndarray:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.batch_sizes.append(len(batch))
        if self.on_batch is not None:
            self.on_batch(modality, len(batch))
        if self.fail_embed:
            raise RuntimeError("fake model failure")
        return np.stack([self.vector_for(m, item) for m, item in batch]).astype(np.float32)

    def warmup(self) -> None:
        return None


class TorchEmbedder:
    """An ``encoders.Encoder`` behind the ``Embedder`` protocol.

    Its name, licence and sha256 are the encoder's ``ref``'s; ``name``/``licence`` override
    the display (tests).
    """

    def __init__(
        self,
        encoder: Encoder,
        name: str | None = None,
        licence: str | None = None,
        licence_url: str | None = None,
    ) -> None:
        self.encoder = encoder
        ref = encoder.ref
        pre = encoder.preprocess_cfg
        self._info = ModelInfo(
            name=ref.name if name is None else name,
            licence=ref.licence if licence is None else licence,
            licence_url=ref.licence_url if licence is None else licence_url,
            dim=encoder.dim,
            modalities=tuple(encoder.modalities),
            device=str(encoder.device),
            dtype=encoder.precision,
            sha256=ref.sha256,
            decoder=ref.decoder,
            max_text_tokens=pre.context_length - 2,  # start and end tokens take two
            vocab_size=pre.vocab_size,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def preprocess(self, modality: Modality, item: bytes | str) -> Sample:
        from encoders import preprocess

        # One item -> its row of the batch: (3, S, S), (clips, 1, F, T), (context,) tokens...
        # The service checked the byte, pixel, duration and text caps before this point (its
        # max_text_chars may be above the encoders' default).
        return preprocess(modality, [item], self.encoder.preprocess_cfg, limits=_TEXT_CHECKED)[0]

    def embed(self, modality: Modality, batch: Sequence[Sample]) -> np.ndarray:
        import torch

        x = torch.stack(list(batch))  # text: Encoder.embed trims it to the longest row (exact)
        out: np.ndarray = self.encoder.embed(modality, x)
        return out

    def warmup(self) -> None:
        for m in self.encoder.modalities:
            sample = _warmup_sample(m)
            if sample is None:
                continue  # video: the vision tower is warmed by an image
            try:
                row = self.preprocess(m, sample)
            except InvalidInput:
                continue
            self.embed(m, [row])


_TEXT_CHECKED = InputLimits(max_text_chars=1 << 62)


def _warmup_sample(m: Modality) -> bytes | str | None:
    """A tiny valid input of ``m`` (or None), to run each tower once before serving."""
    import io

    buf = io.BytesIO()
    if m is Modality.TEXT:
        return "warm-up"
    if m in (Modality.VISION, Modality.DEPTH, Modality.THERMAL):
        from PIL import Image

        Image.new("RGB" if m is Modality.VISION else "L", (32, 32)).save(buf, "PNG")
    elif m is Modality.AUDIO:
        import soundfile

        soundfile.write(buf, np.zeros(16000, np.float32), 16000, format="WAV")
    elif m is Modality.IMU:
        np.save(buf, np.zeros((200, 6), np.float32))
    else:
        return None
    return buf.getvalue()


def load_torch_embedder(
    checkpoint: Path | None = None,
    config: str | None = None,
    device: str = "cpu",
    random_weights: bool = False,
    modalities: Sequence[str] | None = None,
    *,
    ref: ModelRef | None = None,
    dtype: str | None = None,
) -> TorchEmbedder:
    """Load the model for ``serve``: ``ref``, else ``encoders.resolve_model(config, checkpoint)``.

    ``dtype``: a name or "auto" (``encoders.dtype.choose_dtype``; None: $BINDSEARCH_DTYPE).

    Raises the encoders' one-line errors (no weights downloaded, bad checkpoint, no GPU).
    """
    from encoders import load_encoder, resolve_model

    if ref is None:
        ref = resolve_model(config, checkpoint, random_weights=random_weights)
    return TorchEmbedder(load_encoder(ref, device=device, dtype=dtype, modalities=modalities))
