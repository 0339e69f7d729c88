"""Command-line commands of the encoders package (mounted by ``service.cli``)."""

from __future__ import annotations

import typer

weights_app = typer.Typer(help="Model weights: download, inspect.", no_args_is_help=True)


@weights_app.command("list")
def list_weights() -> None:
    """List the model presets this build knows."""
    from .config import PRESETS

    for name, cfg in sorted(PRESETS.items()):
        typer.echo(f"{name}\tdim={cfg.embed_dim}\tvision={cfg.vision.width}x{cfg.vision.depth}")
