"""Which generator to load, by name ("demo", "unclip") or path, checked against the model width."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encoders.errors import EncoderError

from .generation import GeneratorInfo, ImageGenerator

GENERATORS = ("demo", "unclip")


def load_generator(name: str | Path = "demo", **kwargs: Any) -> ImageGenerator:
    """A generator by name: "demo" (shipped decoder), "unclip" (Stable unCLIP, optional extra).

    Keyword arguments go to ``generate.decoder.load_demo_decoder`` or
    ``generate.unclip.load_unclip`` respectively.
    """
    if str(name) == "demo":
        from .decoder import load_demo_decoder

        return load_demo_decoder(**kwargs)
    if str(name) == "unclip":
        from .unclip import load_unclip

        return load_unclip(**kwargs)
    raise EncoderError(f"unknown generator {str(name)!r}; choose one of {', '.join(GENERATORS)}")


def load_named_generator(
    spec: str | Path,
    dim: int,
    device: str = "cpu",
    model_sha256: str | None = None,
    decoder: Path | None = None,
) -> ImageGenerator:
    """A generator taking ``dim``-d vectors, by name or path.

    ``spec``: "demo" (``decoder``, the one made for the model, else the shipped one), a
    ``.safetensors`` file of demo-decoder weights, "unclip" (Stable unCLIP H from the hub or
    the HF cache), or a Stable unCLIP directory / hub id. ``model_sha256``, when given, must be
    the sha256 of the encoder weights a demo decoder was trained against. Raises
    ``EncoderError`` (one line) when it cannot load or takes another width.
    """
    name = str(spec)
    if name == "none":
        raise EncoderError("no generator: 'none' was chosen")
    gen: ImageGenerator
    if name == "demo" or (name.endswith(".safetensors") and Path(name).is_file()):
        from .decoder import load_demo_decoder

        path = decoder if name == "demo" else Path(name)
        gen = load_demo_decoder(path, device=device, dim=dim, encoder_sha256=model_sha256)
    else:
        from .unclip import UNCLIP_MODEL, load_unclip

        model = UNCLIP_MODEL if name == "unclip" else name
        gen = load_unclip(model, device=device, dim=dim)
    check_generator_dim(gen.info, dim)
    return gen


def check_generator_dim(info: GeneratorInfo, dim: int) -> None:
    """A clear error when a generator takes another embedding width than the model makes."""
    if info.dim != dim:
        raise EncoderError(
            f"the generator {info.name} takes {info.dim}-d embeddings but the model makes "
            f"{dim}-d ones: use a generator made for this model's space"
        )
