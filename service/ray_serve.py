"""``bindsearch serve --engine ray``: encoder and index shard replicas on Ray Serve.

The HTTP front is the service's own FastAPI app, in the ``serve`` process: it is the router.
It is given two Ray-backed implementations of the service's protocols:

- ``RayEmbedder`` (``Embedder``): inputs are decoded here (pure CPU), only the model's input
  tensors travel to the encoder deployment (``--replicas`` replicas, one GPU each with
  ``--device cuda``); a batch is split across the replicas.
- ``ShardedSearcher`` (``Searcher``): the index's metadata, calibration and tags stay here, in
  a read-only snapshot; the vector search of each request is planned here, run by every one of
  the ``--shards`` shard deployments (``index.shard.IndexShard``) and joined and merged here
  (``IndexSearcher.search(run=...)``, the single-process code path).

A shard that fails or does not answer within ``SHARD_TIMEOUT_S`` fails the whole request with
503 and Retry-After (never a merge of the shards that did answer); Ray Serve restarts the
replica. docs/scale.md ("Sharded serving on Ray Serve") says how to run it on a cluster.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from encoders import InputLimits, Modality

from .embedders import ModelInfo, Sample
from .errors import RetryLater, Unavailable

if TYPE_CHECKING:
    from encoders import ModelRef, PreprocessConfig
    from index.results import Hit, IndexInfo, Item
    from index.search import IndexSearcher, ModalitySearch

log = logging.getLogger(__name__)

APP_PREFIX = "bindsearch"  # Ray Serve applications: bindsearch-encoder, bindsearch-shard-0, ...
SHARD_TIMEOUT_S = 5.0  # a shard that has not answered by then fails the request (503)
ENCODER_TIMEOUT_S = 60.0  # a batch through the model (a huge model on CPU is slow)
HEALTH_CHECK_PERIOD_S = 2.0  # Ray Serve's health check of each replica
HEALTH_CHECK_TIMEOUT_S = 10.0


class RayUnreachable(RetryLater, Unavailable):
    """A replica died, is restarting or did not answer in time: 503, retry shortly."""

    type = "unavailable"


def import_serve() -> ModuleType:
    """``ray.serve``, or ``index.ray_engine.RayUnavailable`` saying how to install it."""
    from index.ray_engine import INSTALL_HINT, RayUnavailable

    try:
        import ray.serve
    except ImportError as e:
        raise RayUnavailable(f"{INSTALL_HINT} ({e})") from None
    return ray.serve


# --- the replicas (Ray Serve deployments) ------------------------------------------------------


class EncoderReplica:
    """One model replica: the service's ``TorchEmbedder`` in a Ray actor."""

    def __init__(
        self,
        ref: ModelRef,
        device: str,
        dtype: str | None,
        modalities: Sequence[str] | None,
        torch_threads: int | None,
    ) -> None:
        from .embedders import load_torch_embedder

        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        self._embedder = load_torch_embedder(
            device=device, modalities=modalities, ref=ref, dtype=dtype
        )

    def describe(self) -> tuple[ModelInfo, PreprocessConfig]:
        """What the router needs: the model's ``ModelInfo`` and its preprocessing."""
        return self._embedder.info, self._embedder.encoder.preprocess_cfg

    def embed(self, modality: Modality, batch: Sequence[Sample]) -> np.ndarray:
        return self._embedder.embed(modality, batch)

    def warmup(self) -> None:
        self._embedder.warmup()

    def memory(self) -> dict[str, int]:
        return _memory()


class ShardReplica:
    """One index shard (``index.shard.IndexShard``) in a Ray actor."""

    def __init__(self, root: str, shard: int, shards: int, generation: int) -> None:
        from index.shard import IndexShard

        self._shard = IndexShard.load(root, shard, shards, generation)

    def run_search(
        self, q: np.ndarray, plan: Sequence[ModalitySearch]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        return self._shard.run_search(q, plan)

    def counts(self) -> dict[str, int]:
        return {m.value: n for m, n in self._shard.counts().items()}

    def memory(self) -> dict[str, int]:
        return {**_memory(), "vectors": self._shard.nbytes}


def _memory() -> dict[str, int]:
    """This process's resident and unique memory, bytes (``/proc``; 0 where it is not)."""
    out = {"rss": 0, "uss": 0}
    try:
        for line in Path(f"/proc/{os.getpid()}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Private_Clean", "Private_Dirty"):
                kib = int(rest.split()[0]) * 1024
                if key == "Rss":
                    out["rss"] = kib
                else:
                    out["uss"] += kib
    except (OSError, ValueError, IndexError):
        pass
    return out


# --- the router's side ---------------------------------------------------------------------------


def _ray_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions
    from ray.serve.exceptions import RayServeException

    # GetTimeoutError is also a TimeoutError; a RayTaskError is an exception in the replica.
    return (ray.exceptions.RayError, RayServeException, TimeoutError)


class RayEmbedder:
    """The ``Embedder`` of the router: decodes here, embeds on the encoder deployment."""

    def __init__(self, handle: Any, replicas: int) -> None:
        self._handle = handle
        self._replicas = max(1, replicas)
        self._errors = _ray_errors()
        info, pre = self._call(lambda: handle.describe.remote().result(timeout_s=ENCODER_TIMEOUT_S))
        self._info: ModelInfo = info
        self._pre: PreprocessConfig = pre

    @property
    def info(self) -> ModelInfo:
        return self._info

    def preprocess(self, modality: Modality, item: bytes | str) -> Sample:
        from encoders import preprocess

        # As TorchEmbedder.preprocess: the service checked every cap before this point.
        return preprocess(modality, [item], self._pre, limits=_TEXT_CHECKED)[0]

    def embed(self, modality: Modality, batch: Sequence[Sample]) -> np.ndarray:
        # One part per replica, sent at once: a batch keeps every replica busy.
        n = -(-len(batch) // self._replicas)
        parts = [list(batch[s : s + n]) for s in range(0, len(batch), n)]

        def run() -> np.ndarray:
            calls = [self._handle.embed.remote(modality, p) for p in parts]
            return np.concatenate([c.result(timeout_s=ENCODER_TIMEOUT_S) for c in calls])

        out: np.ndarray = self._call(run)
        return out

    def warmup(self) -> None:
        self._call(lambda: self._handle.warmup.remote().result(timeout_s=ENCODER_TIMEOUT_S))

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except self._errors as e:
            raise RayUnreachable(
                f"an encoder replica is unavailable ({type(e).__name__}): retry shortly"
            ) from None


class ShardedSearcher:
    """The ``Searcher`` of the router: metadata here, vectors on the shard deployments.

    It serves the index as it was when the service started (its snapshot and the shards'
    items are of one generation); a restart serves a changed index.
    """

    def __init__(self, snapshot: IndexSearcher, handles: Sequence[Any], apps: Sequence[str]):
        self._snapshot = snapshot
        self._handles = list(handles)
        self._apps = list(apps)
        self._errors = _ray_errors()

    @property
    def shards(self) -> int:
        return len(self._handles)

    @property
    def dim(self) -> int:
        return self._snapshot.dim

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self._snapshot.fingerprint

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        targets: Sequence[Modality] | None = None,
        tags: Sequence[str] | None = None,
        merge: str = "calibrated",
        query_modalities: Mapping[str, float] | None = None,
    ) -> list[list[Hit]]:
        return self._snapshot.search(
            vectors, k, targets, tags, merge, query_modalities, run=self.run_search
        )

    def run_search(
        self, q: np.ndarray, plan: Sequence[ModalitySearch]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``index.search.RunSearch`` on every shard at once; any shard failing fails it all."""
        from index.shard import join_shards, shard_plan

        n = len(self._handles)
        calls = []
        for s, h in enumerate(self._handles):
            calls.append((s, h.run_search.remote(q, shard_plan(plan, s, n))))
        answers = []
        for s, call in calls:
            try:
                answers.append(call.result(timeout_s=SHARD_TIMEOUT_S))
            except self._errors as e:
                for _, other in calls:
                    other.cancel()
                raise RayUnreachable(
                    f"index shard {s} of {n} is unavailable ({type(e).__name__}); Ray Serve "
                    "restarts it: retry shortly"
                ) from None
        return join_shards(plan, answers)

    def unready_reason(self) -> str | None:
        """Why not every shard and encoder deployment is healthy now, or None."""
        from ray import serve

        try:
            apps = serve.status().applications
        except self._errors as e:
            return f"Ray Serve does not answer ({type(e).__name__})"
        for name in self._apps:
            app = apps.get(name)
            if app is None:
                return f"Ray Serve application {name} is gone"
            for dep, st in app.deployments.items():
                if str(st.status.value) != "HEALTHY":
                    return f"{name}/{dep} is {st.status.value.lower()} (a replica is restarting)"
        return None

    def get_item(self, item_id: int) -> Item | None:
        return self._snapshot.get_item(item_id)

    def get(self, ids: Sequence[int], cols: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return self._snapshot.get(ids, cols)

    def item_vector(self, item_id: int) -> np.ndarray | None:
        return self._snapshot.item_vector(item_id)

    def item_media_path(self, item_id: int) -> Path | None:
        return self._snapshot.item_media_path(item_id)

    def info(self) -> list[IndexInfo]:
        return self._snapshot.info()

    def calibration_note_for(
        self,
        query_modalities: Iterable[Modality | str] | None = None,
        targets: Iterable[Modality | str] | None = None,
    ) -> str | None:
        """The router's snapshot holds the calibration: ``IndexSearcher.calibration_note_for``."""
        return self._snapshot.calibration_note_for(query_modalities, targets)

    def close(self) -> None:
        self._snapshot.close()


_TEXT_CHECKED = InputLimits(max_text_chars=1 << 62)


# --- starting and stopping ----------------------------------------------------------------------


@dataclass
class RayServeOptions:
    """Where and how wide ``serve --engine ray`` runs."""

    shards: int = 1
    replicas: int | None = None  # encoder replicas; None: one per GPU (--device cuda), else 1
    address: str | None = None  # None: a local Ray instance; "auto": the cluster of this node
    shard_cpus: float = 1.0  # logical CPUs a shard replica reserves
    encoder_cpus: float = 1.0  # logical CPUs a CPU encoder replica reserves

    def check(self) -> None:
        if self.shards < 1:
            raise ValueError(f"--shards must be at least 1, got {self.shards}")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")


@dataclass
class RayDeployment:
    """What ``start`` deployed: the router's embedder and searcher, and how to stop it all."""

    embedder: RayEmbedder
    searcher: ShardedSearcher | None
    apps: list[str]
    connected: bool  # ``start`` connected this process to Ray (it was not already)
    local: bool  # ``start`` started the local Ray instance it runs on (no --ray-address)

    def stop(self) -> None:
        """Delete this service's Ray Serve applications; end the local Ray instance ``start``
        started, or disconnect from the cluster it joined."""
        import ray as ray_module
        import ray.serve as serve_module

        ray: Any = ray_module  # untyped
        serve: Any = serve_module
        if self.searcher is not None:
            self.searcher.close()
        for name in self.apps:
            try:
                serve.delete(name)
            except Exception:  # best effort on the way out: Ray may be gone already
                log.warning("could not delete Ray Serve application %s", name)
        if self.local:
            serve.shutdown()
        if self.connected:
            ray.shutdown()


def start(
    ref: ModelRef,
    index: Path | None,
    options: RayServeOptions,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    modalities: Sequence[str] | None = None,
    torch_threads: int | None = None,
    snapshot: IndexSearcher | None = None,
) -> RayDeployment:
    """Connect to (or start) Ray, deploy the encoder and the index shards, return the router's
    parts. ``snapshot``: the index, opened already (``open_index(index, snapshot=True)``)."""
    options.check()
    serve = import_serve()
    import ray as ray_module

    ray: Any = ray_module  # untyped
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"address": options.address, "logging_level": logging.WARNING}
        if options.address is None:
            kwargs["include_dashboard"] = False
        ray.init(**kwargs)
    try:
        # The FastAPI app is the HTTP front: no Serve HTTP proxy.
        serve.start(http_options={"location": "NoServer"})
        gpus = int(ray.cluster_resources().get("GPU", 0))
        on_gpu = device.startswith("cuda")
        if on_gpu and not gpus:
            raise ValueError(f"--device {device}, but the Ray cluster has no GPUs")
        replicas = options.replicas or (gpus if on_gpu else 1)
        resources = {"num_gpus": 1} if on_gpu else {"num_cpus": options.encoder_cpus}
        health = {
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        }
        targets = [
            serve.RunTarget(
                serve.deployment(EncoderReplica)
                .options(
                    name="encoder", num_replicas=replicas, ray_actor_options=resources, **health
                )
                .bind(ref, device, dtype, modalities, torch_threads),
                name=f"{APP_PREFIX}-encoder",
                route_prefix=None,
            )
        ]
        if index is not None and snapshot is not None:
            generation = snapshot.manifest.generation
            for s in range(options.shards):
                targets.append(
                    serve.RunTarget(
                        serve.deployment(ShardReplica)
                        .options(
                            name="shard",
                            num_replicas=1,
                            ray_actor_options={"num_cpus": options.shard_cpus},
                            **health,
                        )
                        .bind(str(Path(index).resolve()), s, options.shards, generation),
                        name=f"{APP_PREFIX}-shard-{s}",
                        route_prefix=None,
                    )
                )
        handles = serve.run_many(targets)
        apps = [t.name for t in targets]
        embedder = RayEmbedder(handles[0], replicas)
        searcher = None
        if snapshot is not None:
            searcher = ShardedSearcher(snapshot, handles[1:], apps)
        return RayDeployment(embedder, searcher, apps, started, started and options.address is None)
    except BaseException:
        if started:
            ray.shutdown()
        raise
