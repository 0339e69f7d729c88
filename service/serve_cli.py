"""``bindsearch serve``: the search service on uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from encoders.cli import fail as _fail

if TYPE_CHECKING:
    from .embedders import Embedder
    from .settings import ServiceSettings

NO_FAISS = (
    "FAISS is not installed: install bindsearch with the 'cpu' extra (faiss-cpu), or 'gpu' "
    "on a CUDA machine (faiss-gpu); never both"
)


def serve(
    index: Annotated[
        Path | None,
        typer.Option(
            help="Index directory, or a .jsonl of items with vectors (tests, demos). "
            "Without one the service embeds but does not search."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help=".pth or .safetensors weights (default: the downloaded official ones)."),
    ] = None,
    config: Annotated[
        str | None, typer.Option(help="Preset name or JSON config of the checkpoint.")
    ] = None,
    host: Annotated[
        str, typer.Option(envvar="BINDSEARCH_HOST", help="Interface to listen on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, envvar="BINDSEARCH_PORT")] = 8000,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (half precision on GPU).")] = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="TESTING ONLY: the --config architecture with random weights; "
            "the vectors mean nothing.",
        ),
    ] = False,
    modalities: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated towers to load, e.g. vision,text (default: all); "
            "inputs of other modalities get 415."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve search and embedding over HTTP (settings: BINDSEARCH_* environment variables)."""
    import uvicorn

    from encoders import EncoderError

    try:
        from index.errors import IndexStoreError
    except ImportError as e:  # index/__init__ imports faiss, which comes from an extra
        _fail(NO_FAISS if "faiss" in str(e) else str(e))

    from .app import create_app
    from .embedders import load_torch_embedder
    from .searchers import check_index_model, load_searcher
    from .settings import ServiceSettings

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides: dict[str, object] = {
            k: v
            for k, v in {
                "index": index,
                "checkpoint": checkpoint,
                "config": config,
                "device": device,
            }.items()
            if v is not None
        }
        if random_weights:
            overrides["random_weights"] = True
        if modalities is not None:
            overrides["modalities"] = [m.strip() for m in modalities.split(",") if m.strip()]
        settings = ServiceSettings.model_validate(overrides)
        _check_weights(settings)
        if uses_demo_defaults(settings):
            # The embedded default: the shipped demo model over the demo world's index,
            # built into the cache on first start (with a progress bar), reused afterwards.
            from .demo import ensure_demo_index

            settings = settings.model_copy(update={"index": ensure_demo_index()})
        searcher = None if settings.index is None else load_searcher(settings.index)
        if searcher is not None:
            check_index_model(
                searcher, settings.config, settings.checkpoint, settings.random_weights
            )
    except (EncoderError, IndexStoreError, ValueError, OSError) as e:
        _fail(str(e))

    def load() -> Embedder:
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        return load_torch_embedder(
            settings.checkpoint,
            settings.config,
            settings.device,
            settings.random_weights,
            modalities=settings.modalities,
        )

    app = create_app(settings, load, searcher)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="on")


def uses_demo_defaults(settings: ServiceSettings) -> bool:
    """True when nothing was chosen: no index, no checkpoint, the demo config, real weights."""
    from .demo import DEMO_CONFIG

    return (
        settings.index is None
        and settings.checkpoint is None
        and settings.config == DEMO_CONFIG
        and not settings.random_weights
    )


def _check_weights(settings: ServiceSettings) -> None:
    """Fail fast, in one line, when there are no weights to load or no device to load on."""
    from encoders import Modality
    from encoders.config import resolve_config
    from encoders.weights import default_checkpoint

    resolve_config(settings.config)
    for m in settings.modalities or ():
        Modality.parse(m)  # ValueError: the accepted names
    if settings.modalities == []:
        raise ValueError("modalities: give at least one tower, e.g. vision,text")
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {settings.device!r} was asked for but there is no CUDA GPU")
    if settings.random_weights:
        return
    if settings.checkpoint is None:
        default_checkpoint(settings.config)
    elif not settings.checkpoint.is_file():
        raise ValueError(f"checkpoint {settings.checkpoint} does not exist")
