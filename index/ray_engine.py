"""``bindsearch index build --engine ray``: the build's engine on Ray Data (``index.engine``).

    FileTasks (scan order, chosen by the writer: committed files are skipped, as locally)
      -> ray.data.from_items                     one row per file
      -> map_batches(decode_files)   Ray tasks   a file -> one row per item + a header row
      -> map_batches(Embedder)       actors      one per GPU (num_gpus=1), else CPU actors;
                                                 each embeds through the shared Batcher
      -> iter_batches on the driver              the output blocks (the shards), in any order
      -> EmbeddedFile per file, once all its rows are in -> the build's one IndexWriter

Ray Data's output blocks arrive in whatever order the cluster finishes them; the writer puts
the files back in scan order and commits them, so chunks, ids, duplicates and rejections come
out exactly as a local build of the same corpus gives them (vectors agree within float
tolerance: batches differ).

Resume: only committed chunks count. A build killed at any moment and rerun skips the
committed files and redoes the rest; results that had been embedded but not committed are
embedded again, never committed twice (a chunk commit is one transaction). A dead worker or
actor inside a run is Ray's business: tasks are retried and actors restarted.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from encoders import Modality, PreprocessConfig

from ._decode import Decoded, DecodedItem, DecodeTask, decode
from .engine import (
    TEXT_BUCKET_BATCHES,
    Batcher,
    EmbeddedFile,
    EmbeddedItem,
    EncoderLike,
    FileTask,
    KnownContent,
    needed_modalities,
    nothing_known,
)
from .errors import IndexStoreError
from .fingerprint import checkpoint_identity
from .pipeline import BuildOptions, BuildSummary, Log, ModelSource, run_build

INSTALL_HINT = "the ray engine needs Ray: pip install 'bindsearch[ray]'"
DECODE_TASK_MEMORY = 512 << 20  # logical memory per decode task: a worker with torch + one part
MAX_BLOCKS_PER_CPU = 8  # input blocks (decode tasks) per cluster CPU, at most one per file


class RayUnavailable(IndexStoreError):
    """``--engine ray`` without Ray installed."""


@dataclass
class RayOptions:
    """Where and how wide the Ray build runs; none of it changes the vectors."""

    address: str | None = None  # None: a local Ray instance; "auto"; "ray://head:10001"
    num_actors: int | None = None  # embedding actors; None: one per GPU, else CPUs // 2
    gpus_per_actor: float = 1.0  # when the cluster has GPUs

    def check(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"--ray-num-actors must be >= 1, got {self.num_actors}")
        if not 0 < self.gpus_per_actor <= 8:
            raise ValueError(f"GPUs per actor must be in (0, 8], got {self.gpus_per_actor}")


def import_ray() -> ModuleType:
    """``ray`` with Ray Data, or ``RayUnavailable`` saying how to install it."""
    try:
        import ray
        import ray.data  # the extra, not just the core
    except ImportError as e:
        raise RayUnavailable(f"{INSTALL_HINT} ({e})") from None
    return ray


def build_index_ray(
    corpus: str | Path,
    out: str | Path,
    model: ModelSource,
    options: BuildOptions | None = None,
    ray_options: RayOptions | None = None,
    log: Log | None = None,
) -> BuildSummary:
    """``build_index`` on Ray Data: same index, same ids; rerun to finish an interrupted build.

    Uses the Ray instance this process is connected to, if any; otherwise connects to
    ``ray_options.address`` (or starts a local instance) for the build and disconnects after
    (not at all when every file is committed already).
    Corpus paths and the checkpoint must be readable at the same paths on every node.
    """
    ray = import_ray()
    opts = options or BuildOptions()
    opts.check()
    ropts = ray_options or RayOptions()
    ropts.check()
    return run_build(corpus, out, model, RayEngine(ray, model, opts, ropts, log), opts, log)


# Ray's own lines a build's output leaves out (docs/ray.md, "Output"): the notice that a new
# local instance uses token authentication (it does, as it should), and the error-level line
# the driver's C++ core worker writes for each embedding actor because Ray Data keeps actor
# constructor arguments in the object store (its choice, harmless while the driver holds
# them). Any other line, ours or Ray's, and the workers' output still get through.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_KNOWN_NOISE = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
    rb"object store and max_restarts > 0"
)


@contextmanager
def _stderr_without(noise: re.Pattern[bytes]) -> Iterator[None]:
    """Within the block, file descriptor 2 passes through a filter that drops ``noise`` lines.

    Ray's core worker writes to the descriptor, not to ``sys.stderr``. Text that is not a whole
    line yet passes at once unless it may start such a line (a progress bar's update does not
    wait). Without a real stderr (captured in-process) nothing is filtered.
    """
    try:
        sys.stderr.flush()
        target = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        held = b""
        try:
            while chunk := os.read(read_end, 1 << 16):
                *lines, held = (held + chunk).split(b"\n")
                out = b"".join(ln + b"\n" for ln in lines if not noise.search(ln))
                if held and not held.startswith(b"["):  # Ray's lines start with "[<time>"
                    out, held = out + held, b""
                if out:
                    os.write(target, out)
            if held and not noise.search(held):
                os.write(target, held)
        except OSError:  # the terminal went away: nothing left to show
            return

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(target, 2)  # the pipe's last write end closes: the pump drains and ends
        thread.join(timeout=10)
        if not thread.is_alive():  # else a process we started holds the pipe: leave it open
            os.close(read_end)
            os.close(target)


@contextmanager
def _session(ray: ModuleType, address: str | None) -> Iterator[None]:
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = False
    auth = logging.getLogger(_AUTH_LOGGER)
    level = auth.level
    auth.setLevel(logging.ERROR)
    try:
        ray.init(**kwargs)
    finally:
        auth.setLevel(level)
    try:
        yield
    finally:
        ray.shutdown()


# --- the rows that travel through Ray -----------------------------------------------------------
#
# One Arrow schema for every block, so blocks of any file mix concatenate: a header row per file
# (what part 0 learnt: hash, size, error, how many items) and one row per item. ``None`` travels
# as "" (strings) or NaN (floats), because a block of all-None would otherwise get a null type.


def _schema(last: str) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("seq", pa.int64()),
            ("header", pa.bool_()),
            ("n_items", pa.int64()),
            ("sha256", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("error", pa.string()),
            ("note", pa.string()),
            ("modality", pa.string()),
            ("rank_a", pa.int64()),
            ("rank_b", pa.float64()),
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            ("duration_s", pa.float64()),
            (last, pa.large_binary()),  # "data": the model input as .npy; "vector": float32 bytes
            *([("model_s", pa.float64())] if last == "vector" else []),
        ]
    )


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _item_row(seq: int, d: DecodedItem) -> dict[str, Any]:
    return {
        "seq": seq,
        "header": False,
        "n_items": 0,
        "sha256": "",
        "size": 0,
        "mtime_ns": 0,
        "error": "",
        "note": "",
        "modality": d.modality,
        "rank_a": int(d.rank[0]),
        "rank_b": float(d.rank[1]),
        "start_s": _nan(d.start_s),
        "end_s": _nan(d.end_s),
        "duration_s": _nan(d.duration_s),
        "data": _npy(d.array),
    }


def _header_row(seq: int, first: Decoded | None, n_items: int, error: str | None) -> dict[str, Any]:
    return {
        "seq": seq,
        "header": True,
        "n_items": n_items,
        "sha256": (first.sha256 if first else None) or "",
        "size": first.size if first else 0,
        "mtime_ns": first.mtime_ns if first else 0,
        "error": error or "",
        "note": (first.note if first else None) or "",
        "modality": "",
        "rank_a": 0,
        "rank_b": 0.0,
        "start_s": math.nan,
        "end_s": math.nan,
        "duration_s": math.nan,
        "data": b"",
    }


def decode_files(
    batch: Any, cfg: PreprocessConfig, segment_seconds: float, soundtrack: bool
) -> Iterator[Any]:
    """The decode task: each file of ``batch`` (columns seq, path, modality) -> its rows.

    A generator: a long video leaves one part (a few segments) at a time, so a task never
    holds a whole film. The header row comes last; a failed part turns the file's header
    into an error and the driver drops the items it had already received.
    """
    import pyarrow as pa
    import torch

    torch.set_num_threads(1)  # a task per CPU: the tasks are the parallelism
    schema = _schema("data")
    for job in batch.to_pylist():
        seq = int(job["seq"])
        task = DecodeTask(seq, job["path"], job["modality"], cfg, segment_seconds, soundtrack)
        first: Decoded | None = None
        n_items, error = 0, None
        todo = [task]
        while todo and error is None:
            part = todo.pop(0)
            res = decode(part)
            if res.error is not None:
                error = res.error
                break
            if res.part == 0:
                first = res
                todo += [
                    dataclasses.replace(task, part=i + 1, spans=spans, duration=res.duration)
                    for i, spans in enumerate(res.later)
                ]
            rows = []
            for d in res.items:
                if d.duration_s is None and d.modality == Modality.VIDEO.value:
                    d.duration_s = part.duration
                rows.append(_item_row(seq, d))
            n_items += len(rows)
            if rows:
                yield pa.Table.from_pylist(rows, schema=schema)
        yield pa.Table.from_pylist([_header_row(seq, first, n_items, error)], schema=schema)


class Embedder:
    """The actor: loads the model once, embeds the item rows of each batch with a ``Batcher``.

    Header rows pass through; item rows leave with their vector instead of their input. A
    batch holds up to ``TEXT_BUCKET_BATCHES`` model batches, so its text is length-bucketed
    as in the local engine.
    """

    def __init__(
        self, model: ModelSource, needed: list[str], device: str, threads: int, batch_size: int
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        if model.encoder is None and model.checkpoint is not None:
            # The driver hashed its copy (the index records it): this node's must be the same.
            here = checkpoint_identity(model.checkpoint)
            if here != model.identity:
                raise IndexStoreError(
                    f"{model.checkpoint} on this node is not the checkpoint the driver has "
                    f"({here} != {model.identity}): give every node the same weights"
                )
        if device != model.device:
            model = dataclasses.replace(model, device=device)
        self.encoder: EncoderLike = model.load({Modality.parse(m) for m in needed})
        self.batch_size = batch_size

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.drop_columns(["data"]).to_pylist()
        data = batch.column("data")
        batcher = Batcher(lambda: self.encoder, self.batch_size)
        items: list[tuple[int, EmbeddedItem]] = []
        for i, r in enumerate(rows):
            if not r["header"]:
                x = np.load(io.BytesIO(data[i].as_py()), allow_pickle=False)
                item = EmbeddedItem(DecodedItem(r["modality"], x))
                items.append((i, item))
                batcher.add(item)
        batcher.flush()
        vectors: list[bytes] = [b""] * len(rows)
        for i, item in items:
            if item.vector is None:
                raise IndexStoreError("internal: the batcher left an item without a vector")
            vectors[i] = item.vector.tobytes()
        for i, r in enumerate(rows):
            r["vector"] = vectors[i]
            r["model_s"] = batcher.model_s if i == 0 else 0.0
        return pa.Table.from_pylist(rows, schema=_schema("vector"))


# --- the driver ---------------------------------------------------------------------------------


@dataclass
class _Pending:
    """One file between its submission and its result: the rows seen so far."""

    header: dict[str, Any] | None = None
    items: dict[tuple[str, int, float], EmbeddedItem] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        if self.header is None:
            return False
        return bool(self.header["error"]) or len(self.items) == self.header["n_items"]


class RayEngine:
    """The ``Engine`` on Ray Data: decode tasks and embedding actors across a cluster.

    Files come back as the cluster finishes them; every file is embedded (duplicates are
    known only to the writer, after the fact). ``known`` is not asked.
    """

    def __init__(
        self,
        ray: ModuleType,
        model: ModelSource,
        options: BuildOptions,
        ray_options: RayOptions,
        log: Log | None = None,
    ) -> None:
        self.ray, self.model, self.opts, self.ropts = ray, model, options, ray_options
        self.log = log
        self.model_s = 0.0
        self.decode_wait_s = 0.0

    def run(
        self, todo: Sequence[FileTask], known: KnownContent = nothing_known
    ) -> Iterator[EmbeddedFile]:
        if not todo:
            return
        pending = {t.seq: _Pending() for t in todo}
        jobs = [{"seq": t.seq, "path": t.path, "modality": t.modality.value} for t in todo]
        try:
            for table in self._results(jobs, todo):
                yield from self._take(pending, table)
        except self.ray.exceptions.RayError as e:
            # Ray's text is a remote traceback: keep its last line, the actual error.
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1:] or [repr(e)]
            raise IndexStoreError(f"the Ray build failed: {last[0].strip()}") from e
        if pending:
            path = next(t.path for t in todo if t.seq in pending)
            raise IndexStoreError(f"internal: Ray returned no complete result for {path}")

    def _results(self, jobs: list[dict[str, Any]], todo: Sequence[FileTask]) -> Iterator[Any]:
        with _session(self.ray, self.ropts.address):  # only when there is work for the cluster
            yield from self._run_dataset(jobs, todo)

    def _run_dataset(self, jobs: list[dict[str, Any]], todo: Sequence[FileTask]) -> Iterator[Any]:
        ray = self.ray
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        gpus = int(resources.get("GPU", 0))
        if gpus:
            actors = self.ropts.num_actors or max(1, int(gpus / self.ropts.gpus_per_actor))
            device = "cuda"
            per_actor = {"num_cpus": 1, "num_gpus": self.ropts.gpus_per_actor}
        else:
            if self.model.device.startswith("cuda"):
                raise IndexStoreError(
                    f"--device {self.model.device}, but the Ray cluster has no GPUs "
                    f"(resources: {cpus} CPUs): use --device cpu or add GPU nodes"
                )
            # Half the CPUs embed, half decode (decoding a file costs about one model call).
            actors = self.ropts.num_actors or max(1, cpus // 2)
            device = self.model.device
            per_actor = {"num_cpus": 1}
        needed = sorted(needed_modalities(todo, self.opts.soundtrack))
        if self.log is not None:
            self.log(
                f"ray: {len(jobs)} files, {actors} embedding actors on "
                f"{'GPU' if gpus else 'CPU'} ({cpus} CPUs, {gpus} GPUs in the cluster)"
            )
        ctx = _data_context()
        ds = ray.data.from_items(
            jobs, override_num_blocks=min(len(jobs), MAX_BLOCKS_PER_CPU * cpus)
        )
        ds = ds.map_batches(
            decode_files,
            batch_size=1,
            batch_format="pyarrow",
            zero_copy_batch=True,
            fn_kwargs={
                "cfg": self.model.config.preprocess,
                "segment_seconds": self.opts.segment_seconds,
                "soundtrack": self.opts.soundtrack,
            },
            num_cpus=1,
            # A task holds one part of a file (a few video segments). Asking for memory also
            # keeps the decode tasks apart from the actors: Ray Data would otherwise fuse
            # decoding into the actors, and the model would wait for every file.
            memory=DECODE_TASK_MEMORY,
        )
        ds = ds.map_batches(
            Embedder,
            # Room for text's length buckets; the Batcher cuts model batches of batch_size.
            batch_size=self.opts.batch_size * TEXT_BUCKET_BATCHES,
            batch_format="pyarrow",
            fn_constructor_args=(self._shippable_model(), needed, device, 1, self.opts.batch_size),
            # Ray Data's actors restart (and their tasks are retried) when a worker dies.
            compute=ray.data.ActorPoolStrategy(size=actors),
            **per_actor,
        )
        old = ctx.enable_progress_bars
        ctx.enable_progress_bars = False  # one bar: ours, per file
        logger = logging.getLogger("ray.data")
        level = logger.level
        logger.setLevel(logging.WARNING)  # Ray Data's progress reports, every few seconds
        try:
            with _stderr_without(_KNOWN_NOISE):  # the actors start in the first batch
                wait = time.perf_counter()
                for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    self.decode_wait_s += time.perf_counter() - wait
                    yield table
                    wait = time.perf_counter()
        finally:
            ctx.enable_progress_bars = old
            logger.setLevel(level)

    def _shippable_model(self) -> ModelSource:
        # Resolve the identity here (hashing the checkpoint once), not in every actor.
        _ = self.model.identity
        return self.model

    def _take(self, pending: dict[int, _Pending], table: Any) -> Iterator[EmbeddedFile]:
        """The rows of one output block; every file they complete, as an ``EmbeddedFile``."""
        for r in table.to_pylist():
            seq = int(r["seq"])
            self.model_s += float(r["model_s"])
            p = pending.get(seq)
            if p is None:
                continue  # a retried task's copy of a file already handed on
            if r["header"]:
                p.header = r
            else:
                key = (str(r["modality"]), int(r["rank_a"]), float(r["rank_b"]))
                # A retried task may deliver an item again: the first copy stands.
                if key not in p.items:
                    d = DecodedItem(
                        key[0],
                        np.empty(0),
                        _none(r["start_s"]),
                        _none(r["end_s"]),
                        _none(r["duration_s"]),
                        (key[1], key[2]),
                    )
                    vec = np.frombuffer(r["vector"], dtype=np.float32).copy()
                    p.items[key] = EmbeddedItem(d, vec)
            if p.complete:
                del pending[seq]
                yield _embedded_file(seq, p)


def _embedded_file(seq: int, p: _Pending) -> EmbeddedFile:
    h = p.header
    if h is None:
        raise IndexStoreError(f"internal: file #{seq} has no header row")
    if h["error"]:
        return EmbeddedFile(seq, error=str(h["error"]))
    return EmbeddedFile(
        seq,
        sha256=h["sha256"] or None,
        size=int(h["size"]),
        mtime_ns=int(h["mtime_ns"]),
        items=list(p.items.values()),
        note=h["note"] or None,
    )


def _data_context() -> Any:
    from ray.data import DataContext

    # Creating the context trips Ray's own deprecation warnings about its defaults.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return DataContext.get_current()
