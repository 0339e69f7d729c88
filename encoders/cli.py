"""Command-line commands of the encoders package (mounted by ``bindsearch.cli``), and ``fail``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .errors import EncoderError


def fail(msg: object) -> NoReturn:
    """``error: <msg>`` on stderr and exit status 1: a user error is not a crash (no traceback).

    What every ``bindsearch`` command does with a user error.
    """
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


weights_app = typer.Typer(help="Model weights: download, inspect.", no_args_is_help=True)


@weights_app.command("list")
def list_weights() -> None:
    """List the model presets this build knows, with their weights and the weights' licence."""
    from .config import PRESETS
    from .weights import BUNDLED, BUNDLED_LICENCE, weights_for_config

    for name, cfg in sorted(PRESETS.items()):
        spec = weights_for_config(name)
        if spec is not None:
            weights = f"weights={spec.name} (download)\tlicence={spec.licence}"
        elif name in BUNDLED:
            weights = f"weights=shipped\tlicence={BUNDLED_LICENCE.split(' ')[0]}"
        else:
            weights = "weights=none (random or --checkpoint)"
        dims = f"dim={cfg.embed_dim}\tvision={cfg.vision.width}x{cfg.vision.depth}"
        typer.echo(f"{name}\t{dims}\t{weights}")


CacheDir = Annotated[
    Path | None,
    typer.Option(help="Cache folder (default: $BINDSEARCH_CACHE, else ~/.cache/bindsearch)."),
]


@weights_app.command("download")
def download(
    name: Annotated[str, typer.Argument(help="Registered weights, e.g. imagebind_huge.")],
    cache_dir: CacheDir = None,
    url: Annotated[str | None, typer.Option(help="A mirror to download from instead.")] = None,
    sha256: Annotated[
        str | None, typer.Option(help="Expected sha256 of the file (hex), overriding ours.")
    ] = None,
    keep_pth: Annotated[
        bool,
        typer.Option(
            help="Keep the downloaded file (.pth, or open_clip's .safetensors) next to its "
            "converted copy."
        ),
    ] = False,
) -> None:
    """Download published weights (resumable), check them, convert them to safetensors."""
    from . import weights

    try:
        spec = weights.resolve_weights(name)
        # The licence comes first: it binds whoever downloads, so show it before any byte.
        typer.echo(f"Licence of {spec.name}: {spec.licence} ({spec.licence_url})")
        typer.echo(spec.licence_notice)
        res = weights.fetch_weights(
            spec, cache_dir, url=url, sha256=sha256, progress=True, keep_source=keep_pth
        )
    except (EncoderError, OSError) as e:  # OSError: the cache folder (disk full, permissions)
        fail(e)
    if res.checksum == "recorded":
        typer.echo(
            f"{spec.filename} has no published checksum, so its sha256 was recorded on first "
            f"use: {res.source_sha256} (in {res.sidecar}); later downloads must match it."
        )
    elif res.checksum == "matched-record":
        typer.echo(f"sha256 {res.source_sha256} matches the one recorded in {res.sidecar}.")
    elif res.checksum == "verified":
        typer.echo(f"sha256 {res.source_sha256} verified.")
    else:
        typer.echo("Already downloaded and converted: nothing fetched.")
    typer.echo(str(res.path))


@weights_app.command("path")
def path(
    name: Annotated[str, typer.Argument(help="Registered weights, e.g. imagebind_huge.")],
    cache_dir: CacheDir = None,
) -> None:
    """Print where downloaded weights are cached (an error if they are not)."""
    from . import weights

    try:
        typer.echo(str(weights.cached_weights_path(name, cache_dir)))
    except EncoderError as e:
        fail(e)
