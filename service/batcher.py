"""Dynamic batching: one bounded queue per modality, one model thread, one future per input.

A request's inputs are decoded and validated before they get here (``service.pipeline``).
Each queue's worker waits for its first input, then up to ``max_wait_ms`` for more (at most
``max_batch_size``), and hands the batch to the single model thread, so the event loop never
runs the model. While a batch runs, new inputs pile up and form the next, larger batch.
Every future is resolved on success and on failure; inputs whose caller went away are skipped.
A full queue refuses new inputs with ``Overloaded`` (429 + Retry-After) instead of growing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from encoders import Modality

from .embedders import Embedder, Sample
from .errors import ModelFailed, NotReady, Overloaded, ServiceError
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 256
    retry_after_s: int = 1


@dataclass
class _Pending:
    sample: Sample
    future: asyncio.Future[np.ndarray]


class _Lane:
    """The queue and worker of one modality."""

    def __init__(self, batcher: Batcher, modality: Modality) -> None:
        self.batcher = batcher
        self.modality = modality
        self.waiting: deque[_Pending] = deque()
        self.arrived = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"batcher-{modality.value}"
        )

    def _gauge(self) -> None:
        if self.batcher.metrics is not None:
            self.batcher.metrics.queue_depth.labels(self.modality.value).set(len(self.waiting))

    def put(self, sample: Sample) -> asyncio.Future[np.ndarray]:
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Pending(sample, fut))
        self.arrived.set()
        self._gauge()
        return fut

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self.waiting and len(batch) < self.batcher.settings.max_batch_size:
            p = self.waiting.popleft()
            if not p.future.done():  # cancelled: its caller has gone
                batch.append(p)
        self._gauge()
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.batcher.settings
        while True:
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            deadline = loop.time() + cfg.max_wait_ms / 1000.0
            while len(self.waiting) < cfg.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._embed(batch)

    async def _embed(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        m = self.modality
        samples = [p.sample for p in batch]
        try:
            vectors = await loop.run_in_executor(
                self.batcher.model_thread, self.batcher.embedder.embed, m, samples
            )
            vectors = np.asarray(vectors, np.float32)
            if vectors.ndim != 2 or vectors.shape[0] != len(batch):
                raise RuntimeError(
                    f"embedder returned shape {vectors.shape} for a batch of {len(batch)}"
                )
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(NotReady("the service is shutting down"))
            raise
        except Exception as e:
            log.exception("model failed on a %s batch of %d", m.value, len(batch))
            # An embedder's own 503 (a Ray encoder replica restarting) keeps its Retry-After.
            err: ServiceError = (
                e
                if isinstance(e, ServiceError)
                else ModelFailed(
                    f"the model failed on a batch of {m.value} inputs ({type(e).__name__}); "
                    "retry the request"
                )
            )
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        if self.batcher.metrics is not None:
            self.batcher.metrics.batch_size.labels(m.value).observe(len(batch))
            self.batcher.metrics.embedded.labels(m.value).inc(len(batch))
        for p, v in zip(batch, vectors, strict=True):
            if not p.future.done():
                p.future.set_result(v)


class Batcher:
    """Per-modality queues in front of one embedder; create and close inside the event loop."""

    def __init__(
        self,
        embedder: Embedder,
        settings: BatchSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self.embedder = embedder
        self.settings = settings
        self.metrics = metrics
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="bindsearch-model")
        self._lanes: dict[Modality, _Lane] = {}
        self._closed = False

    def _lane(self, m: Modality) -> _Lane:
        lane = self._lanes.get(m)
        if lane is None:
            lane = self._lanes[m] = _Lane(self, m)
        return lane

    def check_room(self, counts: Mapping[Modality, int]) -> None:
        """Raise Overloaded unless every queue can take ``counts[m]`` more inputs."""
        if self._closed:
            raise NotReady("the service is shutting down")
        for m, n in counts.items():
            lane = self._lanes.get(m)
            waiting = len(lane.waiting) if lane is not None else 0
            if waiting + n > self.settings.max_queue:
                if self.metrics is not None:
                    self.metrics.rejected.labels(m.value).inc(n)
                raise Overloaded(
                    f"the {m.value} queue is full ({waiting} of {self.settings.max_queue} "
                    f"inputs waiting); retry after {self.settings.retry_after_s} s",
                    retry_after_s=self.settings.retry_after_s,
                )

    async def embed(self, items: Sequence[tuple[Modality, Sample]]) -> np.ndarray:
        """Prepared samples -> (N, D) unit vectors, in order; all queued or none (429)."""
        counts: dict[Modality, int] = {}
        for m, _ in items:
            counts[m] = counts.get(m, 0) + 1
        self.check_room(counts)
        futures = [self._lane(m).put(s) for m, s in items]
        try:
            rows = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()  # the others are skipped when their batch is taken
            raise
        return np.stack(rows)

    async def close(self) -> None:
        """Stop the workers and answer whatever still waits."""
        self._closed = True
        for lane in self._lanes.values():
            lane.task.cancel()
        for lane in self._lanes.values():
            try:
                await lane.task
            except asyncio.CancelledError:
                pass
            while lane.waiting:
                p = lane.waiting.popleft()
                if not p.future.done():
                    p.future.set_exception(NotReady("the service is shutting down"))
        self.model_thread.shutdown(wait=False, cancel_futures=True)
