"""Dynamic batching: requests queue up, one inference worker thread runs them in batches.

A request (one or several decoded images) waits in a bounded asyncio queue. The batching
loop takes the first request, adds whatever else is queued, and waits up to
``max_wait_ms`` for more until the batch holds ``max_batch`` images; the batch then runs
on the single inference thread while the next one gathers. ``max_batch = 1`` turns
batching off. A full queue is refused at once (:class:`QueueFull`, a 503 with
Retry-After), so a burst cannot grow memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fedlens.shared.inference import stack_images

from .reload import ServedModel

__all__ = ["Batcher", "QueueFull", "BatchResult"]

_log = logging.getLogger("fedlens.serve")


class QueueFull(Exception):
    """The request queue is at its bound; the client should retry later."""


@dataclass(frozen=True)
class BatchResult:
    """One request's answer: probabilities ``[n, K]`` and the model that computed them."""

    probabilities: np.ndarray
    model: ServedModel


@dataclass
class _Job:
    images: list[np.ndarray]
    future: asyncio.Future[BatchResult]
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gather requests into batches for one inference thread.

    Parameters
    ----------
    current : callable
        Returns the model to use; called once per batch (hot reload swaps between batches).
    max_batch : int
        Images per batch (a single request with more images runs as one batch).
    max_wait_ms : float
        How long a batch waits for more requests once it has one; 0 takes only what is
        already queued (batches still form under load, at no latency cost).
    max_queue : int
        Requests waiting at most; more are refused with :class:`QueueFull`.
    on_batch : callable, optional
        Called with each batch's image count (metrics).
    """

    def __init__(
        self,
        current: Callable[[], ServedModel],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._current = current
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda _n: None)
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedlens-infer")

    @property
    def depth(self) -> int:
        """Requests waiting now (not counting the batch running)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.create_task(self._loop(), name="fedlens-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, images: list[np.ndarray]) -> BatchResult:
        """Queue decoded images (``uint8 [C, S, S]``); their probabilities once their batch ran.

        Raises
        ------
        QueueFull
            When ``max_queue`` requests are already waiting.
        """
        assert self._queue is not None, "Batcher.start() was not awaited"
        job = _Job(images, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are already waiting") from None
        return await job.future

    async def _gather(self) -> list[_Job]:
        assert self._queue is not None
        jobs = [await self._queue.get()]
        n = len(jobs[0].images)
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        job = await self._queue.get()
                except TimeoutError:
                    break
            jobs.append(job)
            n += len(job.images)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            jobs = [j for j in jobs if not j.future.done()]  # a client that went away was cancelled
            if not jobs:
                continue
            model = self._current()
            images = [img for j in jobs for img in j.images]
            self._on_batch(len(images))
            try:
                probs = await loop.run_in_executor(self._executor, _run, model, images)
            except Exception as exc:  # reported to each request of the batch; the loop goes on
                _log.exception("inference failed on a batch of %d image(s)", len(images))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            start = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(BatchResult(probs[start : start + len(j.images)], model))
                start += len(j.images)


def _run(model: ServedModel, images: list[np.ndarray]) -> np.ndarray:
    return model.predictor.probabilities(stack_images(images))
