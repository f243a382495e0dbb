"""Dynamic batching: requests that arrive together share one call of a batch function.

Concurrent coroutines each :meth:`DynamicBatcher.submit` one item and await its result. A worker task
collects items until ``max_batch`` are waiting or ``max_wait`` seconds have passed since the first one,
runs the batch function once on all of them in an executor thread (so the event loop keeps serving),
and hands every caller its own result. Under load the batches grow and the cost of a call is shared;
a lone request waits at most ``max_wait``.

This module knows nothing about models or HTTP: the server passes the encoder and the index in as
batch functions, and the tests pass plain Python functions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class DynamicBatcher(Generic[T, R]):
    """Collects items from concurrent callers and runs ``run_batch`` on them together.

    Args:
        run_batch: Maps a list of items to a sequence of as many results, in the same order. A result
            that is an exception instance is raised in its own caller only; an exception raised by
            ``run_batch`` itself is raised in every caller of that batch.
        max_batch: The most items in one call.
        max_wait: Seconds to wait for more items after the first one of a batch arrives.
        executor: Where ``run_batch`` runs; one thread serialises the calls (needed for an encoder that
            takes calls from one thread at a time). None uses the event loop's default executor.
        on_batch: Called with the size of every batch (metrics).
        regroup: Where a batch holds fewer items than the previous round (the last batch plus what
            arrived while it ran), wait at most this fraction of the last batch's run time for the rest.
            Clients that each wait for their answer before asking again otherwise settle into groups that
            take turns, each batch half full; 0 never waits for them.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch: int = 64,
        max_wait: float = 0.002,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        regroup: float = 0.0,
    ) -> None:
        if max_batch < 1 or max_wait < 0 or regroup < 0:
            raise ValueError("max_batch must be at least 1, max_wait and regroup not negative")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.executor = executor
        self.on_batch = on_batch
        self.regroup = regroup
        self._round = 0  # items in the last batch plus those that arrived while it ran
        self._last_run = 0.0  # seconds the last batch took
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its result."""
        queue = self._ensure_worker()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await queue.put((item, future))
        return await future

    def _ensure_worker(self) -> asyncio.Queue[tuple[T, asyncio.Future[R]]]:
        """The queue of the running loop, with its worker task started (once per event loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._work(self._queue))
        assert self._queue is not None
        return self._queue

    async def _work(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> None:
        while True:
            batch = await self._collect(queue)
            await self._run(batch)

    async def _collect(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> list[tuple[T, asyncio.Future[R]]]:
        """Wait for one item, then gather more until the batch is full or ``max_wait`` has passed (while it holds
        fewer than the previous round, until ``regroup`` times the last run has passed, if that is later)."""
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline, regroup_until = start + self.max_wait, start + self.regroup * self._last_run
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = (max(deadline, regroup_until) if len(batch) < self._round else deadline) - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Run one batch in the executor and settle every caller's future."""
        live = [(item, future) for item, future in batch if not future.done()]  # skip callers that left
        if not live:
            return
        if self.on_batch is not None:
            self.on_batch(len(live))
        items = [item for item, _ in live]
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch, items)
            if len(results) != len(items):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._last_run = loop.time() - start
            self._round = min(self.max_batch, len(live) + (self._queue.qsize() if self._queue is not None else 0))
        for (_, future), result in zip(live, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def aclose(self) -> None:
        """Stop the worker task (pending callers are cancelled)."""
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await worker
