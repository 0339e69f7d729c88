"""``bindsearch embed``: files or texts -> L2-normalised vectors, from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ._cli import fail as _fail
from .errors import EncoderError
from .modality import Modality
from .models import DEFAULT_MODEL


def embed_files(
    modality: str,
    items: list[str],
    checkpoint: Path | None = None,
    config: str | None = None,
    official: bool = False,
    device: str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Embed ``items`` (paths, or strings for text) -> (N, D) float32 unit vectors.

    ``config``/``checkpoint``: see ``encoders.resolve_model`` (None: the default model).
    """
    from .encoder import load_encoder
    from .models import resolve_model

    m = Modality.parse(modality)
    enc = load_encoder(resolve_model(config, checkpoint), device=device, modalities=[m])
    return enc.embed_items(m, items, official=official, batch_size=batch_size)


def embed(
    items: Annotated[list[str], typer.Argument(help="Files to embed (for text: the strings).")],
    modality: Annotated[
        str,
        typer.Option("--modality", "-m", help="vision, video, text, audio, depth, thermal or imu."),
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write (N, D) float32 .npy here.")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help=".pth or .safetensors weights.")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help=f"Preset name or JSON (ours or the official ImageBindModel kwargs); default "
            f"{DEFAULT_MODEL}. Without --checkpoint: imagebind_demo uses the shipped demo "
            "weights, imagebind_huge the downloaded ones."
        ),
    ] = None,
    official: Annotated[
        bool, typer.Option("--official", help="Reproduce the official preprocessing bit for bit.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the vectors as JSON.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
) -> None:
    """Embed files (or texts) into L2-normalised vectors, in input order."""
    if output is None and not as_json:
        _fail("give -o OUT.npy and/or --json")
    try:
        vectors = embed_files(modality, items, checkpoint, config, official, device, batch_size)
    except (EncoderError, ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e).strip("'\""))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        np.save(output, vectors.astype(np.float32))
        typer.echo(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {output}", err=True)
    if as_json:
        json.dump(vectors.tolist(), sys.stdout)
        sys.stdout.write("\n")
