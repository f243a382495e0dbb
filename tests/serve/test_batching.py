"""The dynamic batcher with plain Python batch functions (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lipkit.serve.batching import DynamicBatcher


def fake_encode(calls: list[int]):
    """A batch function that records its batch sizes and returns one distinct vector per text."""

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        time.sleep(0.01)  # a model call takes time, so requests pile up behind it
        return np.array([[len(t), sum(map(ord, t))] for t in texts], dtype=np.float32)

    return encode


def test_concurrent_requests_share_encoder_calls_and_get_their_own_vectors():
    calls: list[int] = []
    sizes: list[int] = []
    executor = ThreadPoolExecutor(1)
    batcher = DynamicBatcher(fake_encode(calls), max_batch=16, max_wait=0.005, executor=executor, on_batch=sizes.append)
    texts = [f"query number {i}" for i in range(50)]

    async def main():
        return await asyncio.gather(*(batcher.submit(t) for t in texts))

    vectors = asyncio.run(main())
    executor.shutdown()
    assert len(calls) < len(texts) and sum(calls) == len(texts) and max(calls) <= 16
    assert calls == sizes
    for text, vector in zip(texts, vectors, strict=True):
        np.testing.assert_array_equal(vector, [len(text), sum(map(ord, text))])


def test_a_lone_request_waits_at_most_max_wait():
    batcher = DynamicBatcher(lambda xs: [x * 2 for x in xs], max_batch=64, max_wait=0.05)

    async def main():
        start = time.perf_counter()
        result = await batcher.submit(21)
        return result, time.perf_counter() - start

    result, waited = asyncio.run(main())
    assert result == 42 and waited < 1.0


def test_without_a_wait_the_queries_that_arrive_during_a_batch_form_the_next():
    calls: list[int] = []
    executor = ThreadPoolExecutor(1)

    def run(xs: list[int]) -> list[int]:
        calls.append(len(xs))
        time.sleep(0.05)
        return xs

    batcher = DynamicBatcher(run, max_batch=64, max_wait=0.0, executor=executor)  # the server's default

    async def main():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the lone first query is not held back: its batch is running now
        rest = await asyncio.gather(*(batcher.submit(i) for i in range(1, 8)))
        return [await first, *rest]

    assert asyncio.run(main()) == list(range(8))
    executor.shutdown()
    assert calls == [1, 7]


def test_errors_reach_only_their_callers():
    def run(xs: list[int]):
        return [ValueError(f"bad {x}") if x < 0 else x + 1 for x in xs]

    batcher = DynamicBatcher(run, max_wait=0.01)

    async def main():
        return await asyncio.gather(*(batcher.submit(x) for x in (1, -2, 3)), return_exceptions=True)

    good, bad, other = asyncio.run(main())
    assert good == 2 and other == 4 and isinstance(bad, ValueError) and str(bad) == "bad -2"


def test_a_failing_batch_fails_every_caller_and_the_batcher_keeps_working():
    state = {"fail": True}

    def run(xs: list[int]):
        if state["fail"]:
            raise RuntimeError("encoder broke")
        return xs

    batcher = DynamicBatcher(run, max_wait=0.01)

    async def main():
        first = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        state["fail"] = False
        return first, await batcher.submit(3)

    first, later = asyncio.run(main())
    assert [str(e) for e in first] == ["encoder broke", "encoder broke"] and later == 3


def test_calls_are_serialised_on_a_one_thread_executor():
    active, peak = [0], [0]
    lock = threading.Lock()

    def run(xs: list[int]):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.005)
        with lock:
            active[0] -= 1
        return xs

    executor = ThreadPoolExecutor(1)
    batcher = DynamicBatcher(run, max_batch=2, max_wait=0.0, executor=executor)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(20)))

    assert asyncio.run(main()) == list(range(20)) and peak[0] == 1
    executor.shutdown()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(lambda xs: xs, max_batch=0)
