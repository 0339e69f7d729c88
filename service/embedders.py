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

from encoders import InvalidInput, Modality

if TYPE_CHECKING:
    from encoders import Encoder

# A prepared sample: whatever the embedder's ``preprocess`` returns, handed back to ``embed``.
Sample = Any


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/info`` says about the model."""

    name: str
    licence: str
    licence_url: str | None
    dim: int
    modalities: tuple[Modality, ...]
    device: str
    dtype: str


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


def unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    v = np.asarray(v, np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    out: np.ndarray = (v / np.maximum(n, 1e-12)).astype(np.float32)
    return out


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
    ) -> None:
        self.dim = dim
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
    """An ``encoders.Encoder`` behind the ``Embedder`` protocol."""

    def __init__(
        self,
        encoder: Encoder,
        name: str,
        licence: str,
        licence_url: str | None = None,
    ) -> None:
        self.encoder = encoder
        self._info = ModelInfo(
            name=name,
            licence=licence,
            licence_url=licence_url,
            dim=encoder.dim,
            modalities=tuple(encoder.modalities),
            device=str(encoder.device),
            dtype=str(encoder.dtype).removeprefix("torch."),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def preprocess(self, modality: Modality, item: bytes | str) -> Sample:
        from encoders import preprocess

        # One item -> its row of the batch: (3, S, S), (clips, 1, F, T), (context,) tokens...
        # The service checked the byte, pixel, duration and text caps before this point.
        return preprocess(modality, [item], self.encoder.preprocess_cfg)[0]

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
    checkpoint: Path | None,
    config: str,
    device: str,
    random_weights: bool = False,
    modalities: Sequence[str] | None = None,
) -> TorchEmbedder:
    """Load the model for ``serve``: a checkpoint, else the cached official weights.

    Raises the encoders' one-line errors (no weights downloaded, bad checkpoint, no GPU).
    """
    from encoders import WEIGHTS, load_encoder
    from encoders.weights import BUNDLED_LICENCE, bundled_weights, default_checkpoint

    if random_weights:
        enc = load_encoder(None, config=config, device=device, modalities=modalities)
        name = f"{config} (random weights)"
        return TorchEmbedder(enc, name, "none: random weights, testing only")
    official = checkpoint is None
    if checkpoint is None:
        checkpoint, config = default_checkpoint(config)
    enc = load_encoder(checkpoint, config=config, device=device, modalities=modalities)
    if official and bundled_weights(config) is not None:
        return TorchEmbedder(enc, config, BUNDLED_LICENCE)
    spec = WEIGHTS.get(config)
    if official and spec is not None:
        return TorchEmbedder(enc, spec.name, spec.licence, spec.licence_url)
    return TorchEmbedder(enc, Path(checkpoint).stem, "unknown: a checkpoint you supplied")
