"""``bindsearch index ...``: build, info, query, verify, add, remove, sync.

Each command is a thin typer wrapper around a function of this package; user errors are one
line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

# The index commands need FAISS (an extra): without it importing this module fails, and the
# CLI root says how to install it instead of offering commands that cannot run.
import faiss  # noqa: F401
import typer

from encoders import DEFAULT_MODEL, EncoderError, InvalidInput, Modality
from encoders.cli import fail as _fail
from encoders.dtype import DTYPE_HELP
from encoders.formats import RULE

from .corpus import escape_path
from .errors import IndexStoreError

index_app = typer.Typer(
    help="Build, update, inspect and query an index of a media corpus.", no_args_is_help=True
)

T = TypeVar("T")

Checkpoint = Annotated[
    str | None,
    typer.Option(
        help="Weights (.pth/.safetensors). Default: the shipped or downloaded weights of "
        "--config; for an existing index, the weights it was built with. 'none': seeded random "
        "weights (tests).",
    ),
]
Config = Annotated[
    str | None,
    typer.Option(help=f"Model preset or JSON config (default: {DEFAULT_MODEL}, or the index's)."),
]
Device = Annotated[str, typer.Option(help="cpu or cuda.")]
Factory = Annotated[
    str, typer.Option(help="'auto' (from size and memory budget) or a FAISS factory string.")
]
MemoryBudget = Annotated[
    str, typer.Option("--memory-budget", help="Memory the index may use, e.g. 4GB.")
]
TargetRecall = Annotated[
    float, typer.Option(help="Recall@10 the auto recipe tunes its search for.")
]
Workers = Annotated[int, typer.Option(min=0, help="Decode processes (0: decode in-process).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Items per model call.")]
ChunkSize = Annotated[
    int, typer.Option("--chunk-size", min=1, help="Items per committed chunk (resume unit).")
]
Progress = Annotated[
    bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a tty).")
]
FollowSymlinks = Annotated[
    bool,
    typer.Option(
        "--follow-symlinks",
        help="Follow symlinks in a folder to files and folders inside it (links leaving it are "
        "rejected). Default: every symlink is rejected.",
    ),
]
AllowOutside = Annotated[
    bool,
    typer.Option(
        "--allow-outside",
        help="Let a manifest name files outside its own folder (default: such rows are rejected).",
    ),
]


class Engine(StrEnum):
    """Where ``index build`` runs."""

    LOCAL = "local"
    RAY = "ray"


@index_app.command("build")
def build(
    corpus: Annotated[
        Path,
        typer.Argument(
            help="A folder, or a .csv/.jsonl manifest (whose 'modality' column, when set, wins). "
            f"Each file's modality: {RULE} A folder of depth/thermal/imu below CORPUS counts."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The index directory.")],
    checkpoint: Checkpoint = None,
    config: Config = None,
    modalities: Annotated[
        list[str] | None,
        typer.Option("--modalities", help="Only these item modalities (repeat or comma-separate)."),
    ] = None,
    factory: Factory = "auto",
    memory_budget: MemoryBudget = "4GB",
    target_recall: TargetRecall = 0.95,
    workers: Workers = 2,
    batch_size: BatchSize = 16,
    chunk_size: ChunkSize = 512,
    device: Device = "cpu",
    dtype: Annotated[
        str | None,
        typer.Option(
            help=f"{DTYPE_HELP} Default: $BINDSEARCH_DTYPE, else auto. Not part of "
            "the model: the index is searched by any dtype."
        ),
    ] = None,
    segment_seconds: Annotated[
        float, typer.Option(help="Audio/video longer than 1.5x this become segments (0: never).")
    ] = 10.0,
    soundtrack: Annotated[
        bool, typer.Option(help="Also embed a video's soundtrack as audio items.")
    ] = True,
    progress: Progress = None,
    follow_symlinks: FollowSymlinks = False,
    allow_outside: AllowOutside = False,
    engine: Annotated[
        Engine,
        typer.Option(help="local: this machine; ray: Ray actors, sharded (bindsearch[ray])."),
    ] = Engine.LOCAL,
    address: Annotated[
        str | None,
        typer.Option(
            help="--engine ray: the cluster ('auto', 'ray://head:10001'); "
            "default: a local Ray instance."
        ),
    ] = None,
    ray_num_actors: Annotated[
        int | None,
        typer.Option(
            "--ray-num-actors",
            min=1,
            help="--engine ray: embedding actors (default: one per GPU, else CPUs/(1+workers)).",
        ),
    ] = None,
    shard_files: Annotated[
        int | None,
        typer.Option(
            "--shard-files",
            min=1,
            help="--engine ray: files per staged shard, on average (the unit of work and "
            "resume; default: about 32 shards per build, at most 256 files each).",
        ),
    ] = None,
) -> None:
    """Build an index from a corpus; rerun the same command to finish an interrupted build."""
    from .pipeline import BuildOptions, build_index
    from .spec import parse_size

    if engine is Engine.LOCAL and (
        address is not None or ray_num_actors is not None or shard_files is not None
    ):
        _fail("--address, --ray-num-actors and --shard-files need --engine ray")

    def run() -> Any:
        if engine is Engine.RAY:  # a missing extra is the first thing to hear about
            from .ray_engine import import_ray

            import_ray()
        opts = BuildOptions(
            factory=factory,
            memory_budget=parse_size(memory_budget),
            target_recall=target_recall,
            workers=workers,
            batch_size=batch_size,
            chunk_items=chunk_size,
            segment_seconds=segment_seconds,
            soundtrack=soundtrack,
            modalities=_modalities(modalities),
            progress=progress,
            follow_symlinks=follow_symlinks,
            allow_outside=allow_outside,
        )
        model = _model(checkpoint, config, device, dtype)
        if factory != "auto":  # a bad factory string fails now, not after embedding
            _check_factory(factory, model.config.embed_dim)
        if engine is Engine.RAY:
            from .ray_engine import RayOptions, build_index_ray

            ropts = RayOptions(address=address, num_actors=ray_num_actors, shard_files=shard_files)
            return build_index_ray(corpus, output, model, opts, ropts, log=_log)
        return build_index(corpus, output, model, opts, log=_log)

    summary = _guard(run)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"index: {output}")


@index_app.command("import")
def import_(
    emb_dir: Annotated[
        Path,
        typer.Argument(
            help="Precomputed embeddings: clip-retrieval's img_emb/img_emb_N.npy (or text_emb/) "
            "with metadata/metadata_N.parquet, or NAME.npy beside NAME.jsonl (path, caption, "
            "tags, start, end per row)."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The index directory.")],
    modality: Annotated[str, typer.Option("--modality", "-m", help="The items' modality.")],
    checkpoint: Checkpoint = None,
    config: Config = None,
    dim: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="The vectors' dimension when no model made them (--config/--checkpoint "
            "otherwise): the index is then searched by vector only.",
        ),
    ] = None,
    factory: Factory = "auto",
    memory_budget: MemoryBudget = "4GB",
    target_recall: TargetRecall = 0.95,
    chunk_size: Annotated[
        int,
        typer.Option("--chunk-size", min=1, help="Vectors per committed slice (resume unit)."),
    ] = 16384,
    progress: Progress = None,
) -> None:
    """Build an index from precomputed embeddings; rerun the same command to finish it."""
    from .importer import import_embeddings
    from .pipeline import BuildOptions
    from .spec import parse_size

    if dim is not None and (checkpoint is not None or config is not None):
        _fail("give either --dim (vectors without a model) or --config/--checkpoint, not both")

    def run() -> Any:
        opts = BuildOptions(
            factory=factory,
            memory_budget=parse_size(memory_budget),
            target_recall=target_recall,
            progress=progress,
        )
        model = None if dim is not None else _model(checkpoint, config, "cpu")
        d = model.config.embed_dim if model is not None else dim
        if factory != "auto" and d is not None:
            _check_factory(factory, int(d))
        return import_embeddings(
            emb_dir, output, Modality.parse(modality), model, dim, opts, chunk_size, log=_log
        )

    summary = _guard(run)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"index: {output}")


@index_app.command("add")
def add(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    paths: Annotated[list[Path], typer.Argument(help="Files, folders or manifests to add.")],
    checkpoint: Checkpoint = None,
    config: Config = None,
    workers: Workers = 2,
    batch_size: BatchSize = 16,
    device: Device = "cpu",
    progress: Progress = None,
    follow_symlinks: FollowSymlinks = False,
    allow_outside: AllowOutside = False,
) -> None:
    """Add files (new or changed) to an index without rebuilding it."""
    from .pipeline import BuildOptions, add_to_index

    def run() -> Any:
        opts = BuildOptions(
            workers=workers,
            batch_size=batch_size,
            progress=progress,
            follow_symlinks=follow_symlinks,
            allow_outside=allow_outside,
        )
        return add_to_index(
            index, paths, _model_for(index, checkpoint, config, device), opts, log=_log
        )

    for line in _guard(run).lines():
        typer.echo(line)


@index_app.command("sync")
def sync(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    corpus: Annotated[Path, typer.Argument(help="The folder or manifest the index mirrors.")],
    checkpoint: Checkpoint = None,
    config: Config = None,
    workers: Workers = 2,
    batch_size: BatchSize = 16,
    device: Device = "cpu",
    progress: Progress = None,
    follow_symlinks: FollowSymlinks = False,
    allow_outside: AllowOutside = False,
) -> None:
    """Add new files, re-embed changed ones and remove deleted ones."""
    from .pipeline import BuildOptions, sync_index

    def run() -> Any:
        opts = BuildOptions(
            workers=workers,
            batch_size=batch_size,
            progress=progress,
            follow_symlinks=follow_symlinks,
            allow_outside=allow_outside,
        )
        return sync_index(
            index, corpus, _model_for(index, checkpoint, config, device), opts, log=_log
        )

    for line in _guard(run).lines():
        typer.echo(line)


@index_app.command("remove")
def remove(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    ids: Annotated[list[int] | None, typer.Option("--id", help="Item id (repeatable).")] = None,
    paths: Annotated[
        list[str] | None, typer.Option("--path", help="File path (repeatable): all its items.")
    ] = None,
) -> None:
    """Remove items by id or whole files by path."""
    from .pipeline import remove_from_index

    if not ids and not paths:
        _fail("give --id N and/or --path P")
    summary = _guard(lambda: remove_from_index(index, ids or [], paths or []))
    typer.echo(f"removed {summary.removed_items} items ({summary.removed_files} files)")


@index_app.command("info")
def info(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts, recipe and recall per modality, and the files that were rejected."""
    from .fingerprint import has_model

    data = _guard(lambda: index_info(index))
    if as_json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        _fail_if_damaged(index, data)
        return
    c = data["counts"]
    typer.echo(f"index {index}  ({data['dim']}-d, cosine)")
    if has_model(data["model"]):
        typer.echo(
            f"model: {data['model']['checkpoint']}  preprocessing v"
            f"{data['model']['preprocess_version']}"
        )
    else:
        typer.echo("model: none (imported vectors: search with --vector)")
    typer.echo(
        f"{c['items']} items from {c['files']} files; {c['duplicates']} duplicates, "
        f"{c['rejected']} rejected"
    )
    for m, e in data["modalities"].items():
        recall = e.get("recall")
        r = f", recall@10 {recall['recall_at_10']:.3f}" if recall else " (exact)"
        params = e["spec"]["search_params"]
        p = f" {','.join(f'{k}={v}' for k, v in params.items())}" if params else ""
        typer.echo(f"  {m:8s} {e['count']:>9d} items  {e['spec']['factory']}{p}{r}")
        size = data["sizes"][m]
        where = "lists on disk, " if e["spec"].get("storage") == "disk" else ""
        if size is None:
            typer.echo(f"  {'':8s} size unknown: its files are missing or cannot be read")
        else:
            typer.echo(
                f"  {'':8s} {where}resident {_mb(size['resident_bytes'])}, "
                f"on disk (mapped, read as searched) {_mb(size['on_disk_bytes'])}"
            )
    if data["rejected"]:
        typer.echo("rejected files:")
        for r in data["rejected"]:  # escaped: a name may hold bytes a terminal obeys
            typer.echo(f"  {escape_path(r['path'])}: {escape_path(r['error'] or '')}")
    _fail_if_damaged(index, data)


def _fail_if_damaged(index: Path, data: dict[str, Any]) -> None:
    """After all ``index info`` could print: a damaged FAISS file is one ``error:`` line (the
    words ``index query`` refuses it with) and exit status 1."""
    from .store import damaged_error

    if data["damaged"]:
        _fail(damaged_error(index, data["damaged"]))


def index_info(index: Path) -> dict[str, Any]:
    """The manifest plus the rejected files, each modality's sizes and ``damaged``: what is
    wrong with which FAISS files (``faiss_file_problems``; empty when they match the manifest),
    as ``index info --json`` prints it. A modality whose files cannot be read has sizes None."""
    from .ondisk import sizes
    from .store import IndexStore, faiss_file_problems, read_manifest

    manifest = read_manifest(Path(index))
    try:
        with IndexStore.open_readonly(Path(index)) as store:
            rows = store.file_rows("rejected")
    except sqlite3.DatabaseError:
        raise IndexStoreError(
            f"the index at {index} is damaged: meta.sqlite cannot be read; "
            f"run `bindsearch index verify {index}`, then rebuild it"
        ) from None
    rejected = [{"path": r["path"], "error": r["error"]} for r in rows]
    bytes_: dict[str, dict[str, int] | None] = {}
    for m, e in manifest.modalities.items():
        try:
            bytes_[m] = sizes(Path(index), e.file, e.data_file, e.ntotal, manifest.dim)
        except OSError:  # named in ``damaged``
            bytes_[m] = None
    damaged = faiss_file_problems(Path(index), manifest)
    return {**manifest.to_dict(), "sizes": bytes_, "rejected": rejected, "damaged": damaged}


@index_app.command("query")
def query(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    item: Annotated[str | None, typer.Argument(help="A file to search with.")] = None,
    modality: Annotated[
        str | None,
        typer.Option("--modality", "-m", help=f"The modality of ITEM (default: detected). {RULE}"),
    ] = None,
    text: Annotated[str | None, typer.Option(help="Search with this text instead.")] = None,
    vector: Annotated[
        Path | None,
        typer.Option(
            "--vector",
            help="Search with the vectors in this .npy instead: (D,) or (Q, D); with --json one "
            "line of results per query vector.",
        ),
    ] = None,
    targets: Annotated[
        list[str] | None, typer.Option("--target", help="Item modalities to search (repeat).")
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 10,
    tags: Annotated[
        list[str] | None,
        typer.Option(
            "--tags",
            "--tag",
            help="Only items carrying every one of these tags (repeat, or comma-separated).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    checkpoint: Checkpoint = None,
    config: Config = None,
    device: Device = "cpu",
    nprobe: Annotated[
        int | None,
        typer.Option(min=1, help="On-disk index: lists scanned (default: tuned at build)."),
    ] = None,
    rerank: Annotated[
        int | None,
        typer.Option(
            min=1, help="On-disk index: candidates re-ranked exactly (default: tuned at build)."
        ),
    ] = None,
    merge: Annotated[
        str,
        typer.Option(
            help="How the per-modality lists merge: calibrated (by relevance, comparable "
            "across modalities), raw (by cosine), rrf (reciprocal rank fusion) or "
            "per_modality (the top k of each modality)."
        ),
    ] = "calibrated",
) -> None:
    """Search an index with a file of any modality (detected unless -m), text, or vectors."""
    from .calibration import MERGES

    tag_filter = [t.strip() for raw in tags or [] for t in raw.split(",") if t.strip()]
    if sum(x is not None for x in (item, text, vector)) != 1:
        _fail("give one of ITEM (a file), --text or --vector")
    if merge not in MERGES:
        _fail(f"--merge is {merge!r}; accepted: {', '.join(MERGES)}")
    if vector is not None:
        params = {"nprobe": nprobe, "rerank": rerank}
        mods = _guard(lambda: _modalities(targets))
        _query_vectors(index, vector, k, mods, as_json, params, tag_filter or None, merge)
        return

    def run() -> Any:
        from .search import open_index

        m, query_item = _query_item(item, modality, text)
        model = _model_for(index, checkpoint, config, device)
        encoder = model.load([m])
        searcher = open_index(index, encoder, checkpoint=model.identity)
        with searcher:
            searcher.set_search_params(nprobe, rerank)
            if searcher.calibration_note and merge == "calibrated":
                typer.echo(f"note: {searcher.calibration_note}", err=True)
            vec = encoder.embed_items(m, [query_item])
            hits = searcher.search(
                vec, k, _modalities(targets), tag_filter or None, merge=merge, query_modalities=m
            )
            return hits[0]

    hits = _guard(run)
    if as_json:
        json.dump([h.to_dict() for h in hits], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    _print_hits(hits)


def _print_hits(hits: list[Any]) -> None:
    """One line per hit: rank, cosine, calibrated relevance, modality, id, path (segment)."""
    for rank, h in enumerate(hits, 1):
        it = h.item
        seg = f"  {_clock(it.start)}–{_clock(it.end)}" if it.start is not None else ""
        typer.echo(
            f"{rank:>3d}  {h.score:.4f}  rel {h.calibrated:.3f}  {it.modality:8s} "
            f"#{it.id:<7d} {it.path}{seg}"
        )


def _query_vectors(
    index: Path,
    vector: Path,
    k: int,
    targets: tuple[Modality, ...] | None,
    as_json: bool,
    params: dict[str, int | None],
    tags: list[str] | None = None,
    merge: str = "calibrated",
) -> None:
    """``index query --vector``: no model is loaded; the index's own dimension decides."""
    from .search import open_index

    def run() -> Any:
        q = load_query_vectors(vector)
        with open_index(index) as searcher:
            searcher.set_search_params(params["nprobe"], params["rerank"])
            return searcher.search(q, k, targets, tags, merge=merge)

    results = _guard(run)
    for n, hits in enumerate(results):
        if as_json:
            sys.stdout.write(json.dumps({"results": [h.to_dict() for h in hits]}) + "\n")
            continue
        if len(results) > 1:
            typer.echo(f"query {n}:")
        _print_hits(hits)


def load_query_vectors(path: Path) -> Any:
    """(Q, D) float32 query vectors from a ``.npy`` of shape (D,) or (Q, D)."""
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim not in (1, 2) or arr.dtype.kind not in "fiu":
        raise ValueError(
            f"{path} holds {getattr(arr, 'shape', '?')} {getattr(arr, 'dtype', '?')}; "
            "expected numbers of shape (D,) or (Q, D)"
        )
    if arr.size == 0:
        raise ValueError(f"{path} holds no vector")
    return np.atleast_2d(arr).astype(np.float32)


@index_app.command("verify")
def verify(index: Annotated[Path, typer.Argument(help="The index directory.")]) -> None:
    """Check checksums, and that vectors and metadata agree; exit 1 on any problem."""
    from .verify import verify_index

    report = _guard(lambda: verify_index(index))
    for name, what in report.checked.items():
        typer.echo(f"checked {name}: {json.dumps(what)}")
    if report.problems:
        for p in report.problems:
            typer.echo(f"problem: {p}", err=True)
        _fail(f"{len(report.problems)} problems found")
    typer.echo("ok")


# --- helpers ------------------------------------------------------------------------------------


def _model(
    checkpoint: str | None, config: str | None, device: str, dtype: str | None = None
) -> Any:
    from encoders import resolve_model
    from encoders.dtype import choose_dtype

    from .pipeline import ModelSource

    choose_dtype(dtype, device)  # a bad --dtype (or int8 on a GPU) fails before the scan
    if checkpoint is not None and checkpoint.lower() == "none":
        return ModelSource.from_ref(resolve_model(config, random_weights=True), device, dtype)
    return ModelSource.from_ref(resolve_model(config, checkpoint), device, dtype)


def _model_for(index: Path, checkpoint: str | None, config: str | None, device: str) -> Any:
    """The model an existing index was built with, unless told otherwise."""
    from encoders import ModelConfig, resolve_model

    from .fingerprint import has_model
    from .pipeline import ModelSource
    from .store import read_manifest

    manifest = read_manifest(Path(index))
    if checkpoint is not None or config is not None:
        return _model(checkpoint, config, device)
    if not has_model(dict(manifest.model)):
        raise IndexStoreError(
            f"the index at {index} holds imported vectors without a model: search it with "
            "--vector q.npy (or pass the --config/--checkpoint that made them)"
        )
    cfg = ModelConfig.from_dict(manifest.model["config"])
    identity = str(manifest.model["checkpoint"])
    if identity.startswith("random:"):
        seed = int(identity.split(":", 1)[1])
        return ModelSource.from_ref(resolve_model(cfg, random_weights=True, seed=seed), device)
    path = manifest.checkpoint_path
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"the weights the index was built with ({path}) are not there: pass --checkpoint"
        )
    return ModelSource.from_ref(resolve_model(cfg, path), device)


def _query_item(item: str | None, modality: str | None, text: str | None) -> tuple[Modality, str]:
    """What ``index query`` embeds: (modality, path or text), the modality detected if not given."""
    from encoders.formats import detect
    from encoders.transforms.text import read_text_file

    if text is not None:
        return Modality.TEXT, text
    if item is None:
        raise ValueError("give either ITEM (a file) or --text")
    if modality is not None:
        return Modality.parse(modality), item
    if not Path(item).is_file():
        raise FileNotFoundError(f"{item}: no such file")
    found = detect(item)
    if found.modality is None:
        raise InvalidInput(f"{item}: {found.reason}; or give -m/--modality")
    if found.modality is Modality.TEXT:
        try:
            return Modality.TEXT, read_text_file(item)
        except InvalidInput as e:
            raise InvalidInput(f"{item}: {e}") from None
    return found.modality, item


def _modalities(values: list[str] | None) -> tuple[Modality, ...] | None:
    if not values:
        return None
    names = [v for value in values for v in value.split(",") if v.strip()]
    return tuple(Modality.parse(n) for n in names)


def _check_factory(factory: str, dim: int) -> None:
    from .spec import IndexSpec, new_index

    new_index(IndexSpec.parse(factory), dim)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60:02d}:{s % 60:02d}"


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (IndexStoreError, EncoderError, ValueError, KeyError, OSError, sqlite3.Error) as e:
        _fail(str(e).strip("'\""))
