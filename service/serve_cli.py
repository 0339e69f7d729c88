"""``bindsearch serve``: the search service on uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from encoders.cli import fail as _fail
from encoders.dtype import DTYPE_HELP, choose_dtype, parse_dtype

if TYPE_CHECKING:
    from encoders import ModelRef
    from index.search import IndexSearcher

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
            "Without one the service embeds but does not search. A directory with no index "
            "yet is waited for: /readyz answers 503 until `index build -o` makes one there."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help=".pth or .safetensors weights (default: those shipped or downloaded for --config)."
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="Preset name or JSON config of the checkpoint (default: the default model, "
            "with its shipped weights and the demo index)."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(envvar="BINDSEARCH_HOST", help="Interface to listen on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, envvar="BINDSEARCH_PORT")] = 8000,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (half precision on GPU).")] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help=f"{DTYPE_HELP} Default: $BINDSEARCH_DTYPE, else auto."),
    ] = None,
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
    engine: Annotated[
        str,
        typer.Option(
            help="local: the model and the index in this process. ray: encoder and index "
            "shard replicas on Ray Serve, this process the HTTP router (the 'ray' extra; "
            "docs/scale.md).",
        ),
    ] = "local",
    shards: Annotated[
        int, typer.Option(help="--engine ray: index shard replicas (items by id modulo N).")
    ] = 1,
    replicas: Annotated[
        int | None,
        typer.Option(
            help="--engine ray: encoder replicas (default: one per GPU with --device cuda, else 1)."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="--engine ray: the Ray cluster to join ('auto': the one this node is in, or "
            "ray://HOST:10001); default: start a local Ray instance."
        ),
    ] = None,
) -> None:
    """Serve search and embedding over HTTP (settings: BINDSEARCH_* environment variables)."""
    import uvicorn

    if engine not in ENGINES:
        _fail(f"--engine is {engine!r}; accepted: {', '.join(ENGINES)}")
    if engine == "ray":
        _check_ray(shards, replicas)
    elif shards != 1 or replicas is not None or ray_address is not None:
        _fail("--shards, --replicas and --ray-address go with --engine ray")

    from encoders import EncoderError

    try:
        from index.errors import IndexStoreError
    except ImportError as e:  # index/__init__ imports faiss, which comes from an extra
        _fail(NO_FAISS if "faiss" in str(e) else str(e))

    from .app import create_app
    from .embedders import load_torch_embedder
    from .limits import server_options
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
                "dtype": None if dtype is None else parse_dtype(dtype),
            }.items()
            if v is not None
        }
        if random_weights:
            overrides["random_weights"] = True
        if modalities is not None:
            overrides["modalities"] = [m.strip() for m in modalities.split(",") if m.strip()]
        settings = ServiceSettings.model_validate(overrides)
        ref = _check_weights(settings)  # the model, resolved once for everything below
        choose_dtype(settings.dtype, settings.device)  # int8 on a GPU fails now, in one line
        if uses_demo_defaults(settings):
            # The embedded default: the default model over the demo world's index,
            # built into the cache on first start (with a progress bar), reused afterwards.
            from .demo import ensure_demo_index

            settings = settings.model_copy(update={"index": ensure_demo_index(ref=ref)})
        if engine == "ray":
            _serve_ray(settings, ref, host, port, log_level, shards, replicas, ray_address)
            return
        searcher = (
            None
            if settings.index is None
            # every snapshot the server swaps in must be of the served model
            # a folder with no index yet is waited for (/readyz says so), never a restart loop
            else load_searcher(settings.index, check=lambda s: check_index_model(s, ref), wait=True)
        )
        if searcher is not None:
            check_index_model(searcher, ref)
    except (EncoderError, IndexStoreError, ValueError, OSError) as e:
        _fail(str(e))

    def load() -> Embedder:
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        return load_torch_embedder(
            device=settings.device, modalities=settings.modalities, ref=ref, dtype=settings.dtype
        )

    app = create_app(settings, load, searcher)
    limits = server_options(settings.max_header_bytes)  # request heads are capped as read
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="on", **limits)


ENGINES = ("local", "ray")


def _check_ray(shards: int, replicas: int | None) -> None:
    """Fail in one line and exit 1, before anything loads: no Ray Serve (the install hint, as
    ``index build --engine ray`` says it), bad counts."""
    from index.errors import IndexStoreError

    from .ray_serve import RayServeOptions, import_serve

    try:
        import_serve()
        RayServeOptions(shards=shards, replicas=replicas).check()
    except (IndexStoreError, ValueError) as e:  # index.ray_engine.RayUnavailable, bad counts
        _fail(str(e))


def _serve_ray(
    settings: ServiceSettings,
    ref: ModelRef,
    host: str,
    port: int,
    log_level: str,
    shards: int,
    replicas: int | None,
    ray_address: str | None,
) -> None:
    """``serve --engine ray``: deploy the replicas, serve the FastAPI router, clean up after."""
    import uvicorn

    from encoders import EncoderError
    from index.errors import IndexStoreError

    from . import ray_serve
    from .app import create_app
    from .limits import server_options
    from .searchers import check_index_model

    snapshot = None
    try:
        if settings.index is not None:
            snapshot = _open_for_shards(settings.index)
            check_index_model(snapshot, ref)
        deployment = ray_serve.start(
            ref,
            settings.index,
            ray_serve.RayServeOptions(shards=shards, replicas=replicas, address=ray_address),
            device=settings.device,
            dtype=settings.dtype,
            modalities=settings.modalities,
            torch_threads=settings.torch_threads,
            snapshot=snapshot,
        )
    except (EncoderError, IndexStoreError, ValueError, OSError, ConnectionError) as e:
        if snapshot is not None:
            snapshot.close()
        _fail(str(e))
    except Exception as e:  # a deployment that never became healthy (a replica's constructor)
        if snapshot is not None:
            snapshot.close()
        _fail(f"the Ray Serve deployment failed: {str(e).strip().splitlines()[-1]}")
    try:
        # The shards hold the index as it was at start: the front follows no change on disk.
        app = create_app(
            settings.model_copy(update={"index_poll_seconds": 0.0}),
            deployment.embedder,
            deployment.searcher,
        )
        limits = server_options(settings.max_header_bytes)
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="on", **limits)
    finally:
        deployment.stop()


def _open_for_shards(index: Path) -> IndexSearcher:
    """The router's snapshot of an index directory (no .jsonl, no waiting for a first one)."""
    from index.search import open_index

    if index.suffix == ".jsonl" or index.is_file():
        raise ValueError(
            f"--engine ray serves an index directory (bindsearch index build -o DIR), not {index}"
        )
    if not (index / "manifest.json").is_file():
        raise ValueError(
            f"no index at {index}: --engine ray serves a built index (it does not wait for one); "
            f"build it with `bindsearch index build CORPUS -o {index}`"
        )
    return open_index(index, snapshot=True, vectors=False)  # the shards hold the vectors


def uses_demo_defaults(settings: ServiceSettings) -> bool:
    """True when nothing was chosen: no index, no checkpoint, the default model, real weights."""
    from encoders import DEFAULT_MODEL

    return (
        settings.index is None
        and settings.checkpoint is None
        and settings.config in (None, DEFAULT_MODEL)
        and not settings.random_weights
    )


def _check_weights(settings: ServiceSettings) -> ModelRef:
    """The model to serve; fails fast, in one line, without weights or a device to load on."""
    from encoders import Modality, resolve_model

    ref = resolve_model(
        settings.config, settings.checkpoint, random_weights=settings.random_weights
    )
    for m in settings.modalities or ():
        Modality.parse(m)  # ValueError: the accepted names
    if settings.modalities == []:
        raise ValueError("modalities: give at least one tower, e.g. vision,text")
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {settings.device!r} was asked for but there is no CUDA GPU")
    return ref
