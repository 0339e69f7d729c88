"""Images from embeddings: the one interface the demo decoder and Stable unCLIP share.

An ``ImageGenerator`` takes the service's contract vectors (L2-normalised float32, one row per
image) and returns PIL images. Each generator applies its own scaling inside: the demo decoder
was trained on unit vectors; Stable unCLIP expects raw ViT-H image embeddings, so it rescales.

    gen = load_generator("demo")                        # shipped with the demo weights
    [img] = gen.generate(vectors[:1], seed=0)           # PIL.Image.Image
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from encoders.errors import EncoderError


@dataclass(frozen=True)
class GeneratorInfo:
    """What a generator is, for ``/v1/info`` and the CLI.

    Args:
        name: "demo" or "unclip" (plus the model id or path it was loaded from).
        dim: the embedding width it accepts; must equal the encoder's.
        image_size: side of the square images it makes, in pixels.
        licence: of its weights, shown wherever they are served.
        default_steps: denoising steps when the caller gives none (1 for a one-shot decoder).
        model_sha256: sha256 of the encoder weights it was made for, when it records one
            (the demo decoder does; it must be the served ``ModelRef.sha256``).
    """

    name: str
    dim: int
    image_size: int
    licence: str
    default_steps: int
    model_sha256: str | None = None


@runtime_checkable
class ImageGenerator(Protocol):
    """Embeddings in, images out."""

    @property
    def info(self) -> GeneratorInfo: ...

    def generate(
        self, embeddings: np.ndarray, *, seed: int = 0, steps: int | None = None
    ) -> list[Image.Image]:
        """One image per row of ``embeddings`` ((B, dim) unit float32); same seed, same images."""
        ...


def check_embeddings(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """(B, dim) float32, or a clear error naming the shape that was given."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise EncoderError(
            f"the generator takes (batch, {dim}) embeddings; got shape {tuple(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise EncoderError("the embeddings contain NaN or infinity")
    return x
