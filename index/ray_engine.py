"""``bindsearch index build --engine ray``: a sharded build on Ray actors (docs/ray.md).

    driver: FileTasks (scan order, chosen by the writer: committed files are skipped)
      -> plan_shards: runs of contiguous files, each named by the hash of its files and model
      -> shards complete in INDEX/shards/ from a killed run are kept; the rest go to
    actors (one per GPU, else by CPUs): each runs the local engine (decode + Batcher) on a
      shard's files and writes the shard: items.npy + items.jsonl + files.jsonl + done.json,
      into a temporary folder renamed into place; the driver gets back a few numbers
    driver: reads the complete shards back in plan order, one at a time (vectors memory-mapped)
      -> EmbeddedFile per file -> the build's one IndexWriter (ids, duplicates, chunks)
      -> committed: the staged shards are deleted

Vectors never pass through the driver's Ray connection; the driver holds one shard's
metadata (and a chunk's vectors, as any build) at a time. Ids come from scan order alone, so
the index is the one a local build gives (vectors within float tolerance: batches differ).

Resume: a complete shard (its folder renamed into place, ``done.json`` inside) is never
embedded again; a shard being written when its worker or the driver died is redone from
scratch. Shard boundaries depend on the files' paths, not on their position, so a rerun after
a kill during the merge (some files committed, so fewer to do) still finds the later shards
under the same names. A dead actor is restarted by Ray and its shard retried.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from encoders import Modality

from .engine import (
    SHARDS,
    DecodedItem,
    EmbeddedFile,
    EmbeddedItem,
    FileTask,
    KnownContent,
    needed_modalities,
    nothing_known,
)
from .errors import IndexStoreError
from .fingerprint import checkpoint_identity
from .pipeline import BuildOptions, BuildSummary, LocalEngine, Log, ModelSource, run_build
from .store import fsync_path

INSTALL_HINT = "the ray engine needs Ray: pip install 'bindsearch[ray]'"
SHARDS_PER_BUILD = 32  # by default, about this many shards (several per actor) ...
MAX_SHARD_FILES = 256  # ... of at most this many files on average (a big corpus: more shards)
PLAN = "plan.json"  # in INDEX/shards/: the files per shard chosen, kept for the reruns
DONE = "done.json"  # the completion marker, written last inside a shard's temporary folder
IN_FLIGHT = 2  # shards queued per actor, so that one starts as the other is acknowledged


class RayUnavailable(IndexStoreError):
    """``--engine ray`` without Ray installed."""


@dataclass
class RayOptions:
    """Where and how wide the Ray build runs; none of it changes the vectors."""

    address: str | None = None  # None: a local Ray instance; "auto"; "ray://head:10001"
    num_actors: int | None = None  # embedding actors; None: one per GPU, else by CPUs
    gpus_per_actor: float = 1.0  # when the cluster has GPUs
    shard_files: int | None = None  # files per shard on average; None: auto_shard_files

    def check(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"--ray-num-actors must be >= 1, got {self.num_actors}")
        if not 0 < self.gpus_per_actor <= 8:
            raise ValueError(f"GPUs per actor must be in (0, 8], got {self.gpus_per_actor}")
        if self.shard_files is not None and self.shard_files < 1:
            raise ValueError(f"--shard-files must be >= 1, got {self.shard_files}")


def import_ray() -> ModuleType:
    """``ray``, or ``RayUnavailable`` saying how to install it."""
    try:
        import ray
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
    """``build_index`` on Ray: same index, same ids; rerun to finish an interrupted build.

    Uses the Ray instance this process is connected to, if any; otherwise connects to
    ``ray_options.address`` (or starts a local instance) for the build and disconnects after
    (not at all when every file is committed or staged already). Corpus paths, the
    checkpoint and ``out`` must be at the same paths on every node (the workers write their
    shards into ``out/shards/``).
    """
    ray = import_ray()
    opts = options or BuildOptions()
    opts.check()
    ropts = ray_options or RayOptions()
    ropts.check()
    return run_build(corpus, out, model, RayEngine(ray, model, opts, ropts, log), opts, log)


# Ray's own lines a build's output leaves out (docs/ray.md, "Output"): the notice that a new
# local instance uses token authentication (it does, as it should), and the error-level line
# the driver's C++ core worker writes for each embedding actor because actor constructor
# arguments (the model) travel through the object store (harmless while the driver holds
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


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """A run of contiguous files (scan order) embedded and staged together, and its name."""

    name: str
    tasks: tuple[FileTask, ...]


def auto_shard_files(n_files: int) -> int:
    """Files per shard for a build of ``n_files``: about ``SHARDS_PER_BUILD`` shards.

    A power of two, at most ``MAX_SHARD_FILES``. Chosen once per build and recorded beside
    the shards, so that a rerun with fewer files to do cuts them the same way.
    """
    target = max(1, n_files // SHARDS_PER_BUILD)
    return min(MAX_SHARD_FILES, 1 << (target.bit_length() - 1))


def choose_shard_files(staging: Path, n_todo: int, explicit: int | None) -> int:
    """``explicit`` (--shard-files), else what the build being resumed chose, else automatic.

    The choice is recorded in ``staging/plan.json`` for the next rerun.
    """
    recorded = staging / PLAN
    n = explicit
    if n is None:
        try:
            n = int(json.loads(recorded.read_text(encoding="utf-8"))["shard_files"])
        except (OSError, ValueError, KeyError, TypeError):
            n = None
    if n is None or n < 1:
        n = auto_shard_files(n_todo)
    tmp = staging / f".{PLAN}.tmp"
    tmp.write_text(json.dumps({"shard_files": n}), encoding="utf-8")
    os.replace(tmp, recorded)
    return n


def plan_shards(todo: Sequence[FileTask], shard_files: int, salt: str) -> list[ShardPlan]:
    """``todo`` (scan order) cut into shards of about ``shard_files`` files.

    A shard ends before a file whose path hashes to 0 modulo ``shard_files`` (or at twice
    that many files), so boundaries follow the paths: a rerun that has fewer files to do
    (a committed prefix) cuts the rest where the first run did. A shard's name is the hash of
    ``salt`` (the model and settings) and its files' paths, modalities, sizes and mtimes.
    """
    plans: list[ShardPlan] = []
    run: list[FileTask] = []
    for t in todo:
        cut = int.from_bytes(hashlib.sha256(os.fsencode(t.path)).digest()[:8], "big")
        if run and (cut % shard_files == 0 or len(run) >= 2 * shard_files):
            plans.append(_plan(run, salt))
            run = []
        run.append(t)
    if run:
        plans.append(_plan(run, salt))
    return plans


def _plan(tasks: list[FileTask], salt: str) -> ShardPlan:
    h = hashlib.sha256(salt.encode())
    for t in tasks:
        try:
            st = os.stat(t.path, follow_symlinks=False)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except (OSError, ValueError):
            stamp = "-"  # the worker records why it cannot be read
        h.update(os.fsencode(t.path) + b"\0" + f"{t.modality.value}:{stamp}".encode() + b"\0")
    return ShardPlan(h.hexdigest()[:24], tuple(tasks))


# --- a shard on disk ----------------------------------------------------------------------------
#
#   <name>/items.npy     (n, D) float32, the unit vectors of the shard's items, in file order
#   <name>/items.jsonl   one row per vector: path, start, end (``index import``'s layout), and
#                        file (its row in files.jsonl), modality, duration, rank
#   <name>/files.jsonl   one row per file of the plan, in order: path, modality, sha256, size,
#                        mtime_ns, error (rejected), note, skipped (a duplicate), items
#   <name>/done.json     name, files, items, dim: written last; the folder is renamed into place


def _num(x: float | None) -> float | None:
    return None if x is None else float(x)


def write_shard(staging: Path, plan: ShardPlan, engine: LocalEngine, dim: int) -> dict[str, Any]:
    """Embed ``plan``'s files with ``engine`` and stage them as ``staging/<name>/``.

    Returns the acknowledgement the driver gets: counts and times, no vectors. A shard that
    another attempt completed meanwhile is kept and this one dropped.
    """
    final = staging / plan.name
    tmp = staging / f".{plan.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    model_s, wait_s = engine.model_s, engine.decode_wait_s
    vectors: list[np.ndarray] = []
    try:
        with (
            open(tmp / "files.jsonl", "w", encoding="utf-8") as files,
            open(tmp / "items.jsonl", "w", encoding="utf-8") as items,
        ):
            got = {f.seq: f for f in engine.run(plan.tasks)}
            for k, t in enumerate(plan.tasks):
                f = got.get(t.seq)
                if f is None:
                    raise IndexStoreError(f"internal: the local engine returned no {t.path}")
                live = (
                    [] if f.error is not None or f.skipped else [i for i in f.items if not i.dead]
                )
                for it in live:
                    d = it.decoded
                    if it.vector is None:
                        raise IndexStoreError(f"internal: {t.path} has an item without a vector")
                    row = {
                        "path": t.path,
                        "start": _num(d.start_s),
                        "end": _num(d.end_s),
                        "file": k,
                        "modality": d.modality,
                        "duration": _num(d.duration_s),
                        "rank": [int(d.rank[0]), float(d.rank[1])],
                    }
                    items.write(json.dumps(row) + "\n")
                    vectors.append(it.vector)
                row = {
                    "path": t.path,
                    "modality": t.modality.value,
                    "sha256": f.sha256,
                    "size": f.size,
                    "mtime_ns": f.mtime_ns,
                    "error": f.error,
                    "note": f.note,
                    "skipped": f.skipped,
                    "items": len(live),
                }
                files.write(json.dumps(row) + "\n")
        arr = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
        np.save(tmp / "items.npy", arr, allow_pickle=False)
        done = {"name": plan.name, "files": len(plan.tasks), "items": len(arr), "dim": dim}
        (tmp / DONE).write_text(json.dumps(done), encoding="utf-8")
        for p in tmp.iterdir():
            fsync_path(p)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / DONE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another attempt finished it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "name": plan.name,
        "files": len(plan.tasks),
        "items": len(vectors),
        "model_s": engine.model_s - model_s,
        "decode_wait_s": engine.decode_wait_s - wait_s,
    }


def shard_complete(staging: Path, name: str) -> bool:
    """Whether ``staging/<name>`` is a complete shard (renamed into place, marker inside)."""
    return (staging / name / DONE).is_file()


def read_shard(staging: Path, plan: ShardPlan, dim: int) -> Iterator[EmbeddedFile]:
    """The files of a complete shard, in plan order, as the writer takes them.

    Reads the shard's metadata (one shard's worth) and memory-maps its vectors: each file's
    vectors are copied out as it is handed on, so the mapped pages can be dropped.
    """
    folder = staging / plan.name
    where = f"the staged shard {folder}"
    try:
        done = json.loads((folder / DONE).read_text(encoding="utf-8"))
        with open(folder / "files.jsonl", encoding="utf-8") as fh:
            file_rows = [json.loads(line) for line in fh]
        with open(folder / "items.jsonl", encoding="utf-8") as fh:
            item_rows = [json.loads(line) for line in fh]
        vectors = np.load(folder / "items.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexStoreError(f"{where} is unreadable ({e}): delete it and rerun") from None
    paths = [str(r["path"]) for r in file_rows]
    if (
        done.get("name") != plan.name
        or paths != [t.path for t in plan.tasks]
        or len(item_rows) != len(vectors)
        or vectors.ndim != 2
        or (len(vectors) and vectors.shape[1] != dim)
    ):
        raise IndexStoreError(f"{where} does not match its plan: delete it and rerun")
    by_file: list[list[int]] = [[] for _ in file_rows]
    for i, r in enumerate(item_rows):
        by_file[int(r["file"])].append(i)
    for t, r, rows in zip(plan.tasks, file_rows, by_file, strict=True):
        if r["error"] is not None:
            yield EmbeddedFile(t.seq, error=str(r["error"]))
            continue
        f = EmbeddedFile(
            t.seq,
            sha256=r["sha256"],
            size=r["size"],
            mtime_ns=r["mtime_ns"],
            note=r["note"],
            skipped=bool(r["skipped"]),
        )
        for i in rows:
            ir = item_rows[i]
            d = DecodedItem(
                str(ir["modality"]),
                np.empty(0, np.float32),
                ir["start"],
                ir["end"],
                ir["duration"],
                (int(ir["rank"][0]), float(ir["rank"][1])),
            )
            f.items.append(EmbeddedItem(d, np.array(vectors[i], dtype=np.float32)))
        yield f


# --- the workers --------------------------------------------------------------------------------


class ShardWorker:
    """The actor (``ray.remote`` at run time): loads the model once, embeds and stages shards.

    Each shard runs through the local engine (``pipeline.LocalEngine``: decode processes when
    ``options.workers`` > 0, the shared Batcher), so an actor embeds exactly as a local build.
    """

    def __init__(
        self,
        model: ModelSource,
        needed: list[str],
        device: str,
        threads: int,
        options: BuildOptions,
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
        encoder = model.load({Modality.parse(m) for m in needed})
        model = dataclasses.replace(model, encoder=encoder)  # type: ignore[arg-type]
        self.dim = model.config.embed_dim
        self.engine = LocalEngine(model, options, keep_workers=True)

    def build(self, staging: str, plan: ShardPlan) -> dict[str, Any]:
        return write_shard(Path(staging), plan, self.engine, self.dim)


# --- the driver ---------------------------------------------------------------------------------


class RayEngine:
    """The ``StagingEngine`` on Ray: actors embed and stage shards; ``run`` reads them back.

    Every file is embedded (duplicates across shards are known only to the writer, after the
    fact); ``known`` is not asked.
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
        self.shards_built = 0
        self.shards_reused = 0
        self.staging: Path | None = None
        self._model_ref: Any = None

    def stage_in(self, index_dir: Path) -> None:
        self.staging = Path(index_dir) / SHARDS

    def committed(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def run(
        self, todo: Sequence[FileTask], known: KnownContent = nothing_known
    ) -> Iterator[EmbeddedFile]:
        if not todo:
            return
        if self.staging is None:
            raise IndexStoreError("internal: the Ray engine runs only inside a build (stage_in)")
        staging = self.staging
        salt = json.dumps(
            [self.model.fingerprint(), self.opts.settings(), self.model.config.embed_dim],
            sort_keys=True,
        )
        staging.mkdir(parents=True, exist_ok=True)
        per_shard = choose_shard_files(staging, len(todo), self.ropts.shard_files)
        plans = plan_shards(todo, per_shard, salt)
        _clear_other(staging, {p.name for p in plans} | {PLAN})
        done = {p.name for p in plans if shard_complete(staging, p.name)}
        self.shards_reused = len(done)
        missing = [p for p in plans if p.name not in done]
        merged = 0
        dim = self.model.config.embed_dim

        def merge() -> Iterator[EmbeddedFile]:
            nonlocal merged
            while merged < len(plans) and plans[merged].name in done:
                yield from read_shard(staging, plans[merged], dim)
                merged += 1

        if not missing:
            yield from merge()
            return
        try:
            with _session(self.ray, self.ropts.address):  # only when there is work for it
                yield from self._embed(todo, plans, missing, done, merge)
        except self.ray.exceptions.RayError as e:
            # Ray's text is a remote traceback: keep its last line, the actual error.
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1:] or [repr(e)]
            raise IndexStoreError(f"the Ray build failed: {last[0].strip()}") from e
        if merged != len(plans):
            raise IndexStoreError(f"internal: shard {plans[merged].name} was never staged")

    def _embed(
        self,
        todo: Sequence[FileTask],
        plans: list[ShardPlan],
        missing: list[ShardPlan],
        done: set[str],
        merge: Any,
    ) -> Iterator[EmbeddedFile]:
        ray = self.ray
        actors: list[Any] = []
        queue = deque(missing)
        inflight: dict[Any, tuple[Any, ShardPlan]] = {}
        staging = str(self.staging)

        def submit(actor: Any) -> None:
            plan = queue.popleft()
            inflight[actor.build.remote(staging, plan)] = (actor, plan)

        try:
            with _stderr_without(_KNOWN_NOISE):  # Ray's line about each actor, as it starts
                actors = self._start_actors(todo, plans, len(missing))
                for _ in range(IN_FLIGHT):
                    for a in actors:
                        if queue:
                            submit(a)
                yield from merge()
                while inflight:
                    ready, _ = ray.wait(list(inflight), num_returns=1)
                    for ref in ready:
                        actor, plan = inflight.pop(ref)
                        ack = ray.get(ref)  # a few numbers: the vectors are in the shard
                        if ack["name"] != plan.name:
                            raise IndexStoreError(
                                f"internal: shard {plan.name} came back as {ack['name']}"
                            )
                        self.model_s += float(ack["model_s"])
                        self.decode_wait_s += float(ack["decode_wait_s"])
                        self.shards_built += 1
                        done.add(plan.name)
                        if queue:
                            submit(actor)
                    yield from merge()
        finally:
            for a in actors:
                ray.kill(a)
            self._model_ref = None

    def _start_actors(
        self, todo: Sequence[FileTask], plans: list[ShardPlan], n_missing: int
    ) -> list[Any]:
        ray = self.ray
        resources = ray.cluster_resources()
        cpus = max(1.0, float(resources.get("CPU", 1)))
        gpus = int(resources.get("GPU", 0))
        # An actor runs the local engine: its decode processes and the model's thread.
        want_cpus = 1.0 + self.opts.workers
        if gpus:
            n = self.ropts.num_actors or max(1, int(gpus / self.ropts.gpus_per_actor))
            device = "cuda"
        else:
            if self.model.device.startswith("cuda"):
                raise IndexStoreError(
                    f"--device {self.model.device}, but the Ray cluster has no GPUs "
                    f"(resources: {int(cpus)} CPUs): use --device cpu or add GPU nodes"
                )
            n = self.ropts.num_actors or max(1, int(cpus // want_cpus))
            device = self.model.device
        n = min(n, n_missing)
        per_actor: dict[str, Any] = {"num_cpus": min(want_cpus, cpus / n)}  # all n must fit
        if gpus:
            per_actor["num_gpus"] = self.ropts.gpus_per_actor
        if self.log is not None:
            self.log(
                f"ray: {len(todo)} files in {len(plans)} shards ({n_missing} to embed), "
                f"{n} embedding actors on {'GPU' if gpus else 'CPU'} "
                f"({int(cpus)} CPUs, {gpus} GPUs in the cluster)"
            )
        needed = sorted(m.value for m in needed_modalities(todo, self.opts.soundtrack))
        _ = self.model.identity  # hash the checkpoint here, once, not in every actor
        # The model (an encoder object, in tests) goes into the object store once; the driver
        # holds the reference for the whole build, as a restarted actor reads it again.
        self._model_ref = ray.put(self.model)
        worker = ray.remote(ShardWorker).options(max_restarts=-1, max_task_retries=-1, **per_actor)
        return [worker.remote(self._model_ref, needed, device, 1, self.opts) for _ in range(n)]


def _clear_other(staging: Path, keep: set[str]) -> None:
    """Remove what a killed run left in ``staging`` that this plan will not read."""
    for p in staging.iterdir():
        if p.name not in keep:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
