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


def echo_taking(seconds: float, calls: list[int]):
    """A batch function that records its batch sizes, takes ``seconds`` and returns its items."""

    def run(xs: list[int]) -> list[int]:
        calls.append(len(xs))
        time.sleep(seconds)
        return xs

    return run


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
    run = echo_taking(0.05, calls)
    batcher = DynamicBatcher(run, max_batch=64, max_wait=0.0, executor=executor)  # the server's default

    async def main():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the lone first query is not held back: its batch is running now
        rest = await asyncio.gather(*(batcher.submit(i) for i in range(1, 8)))
        return [await first, *rest]

    assert asyncio.run(main()) == list(range(8))
    executor.shutdown()
    assert calls == [1, 7]


def closed_loop(regroup: float, rounds: int = 8, run_s: float = 0.04, think_s: float = 0.002) -> list[int]:
    """Batch sizes for 8 callers that each wait for an answer, think ``think_s``, and ask again (as HTTP
    clients do); half of them start while the first batch runs, which splits them into two groups."""
    calls: list[int] = []
    executor = ThreadPoolExecutor(1)
    run = echo_taking(run_s, calls)
    batcher = DynamicBatcher(run, max_batch=64, max_wait=0.0, executor=executor, regroup=regroup)

    async def caller(c: int, delay: float) -> None:
        await asyncio.sleep(delay)
        for i in range(rounds):
            assert await batcher.submit(c * 100 + i) == c * 100 + i
            await asyncio.sleep(think_s)

    async def main():
        await asyncio.gather(*(caller(c, 0.0 if c < 4 else run_s / 4) for c in range(8)))

    asyncio.run(main())
    executor.shutdown()
    return calls


def test_callers_that_take_turns_are_regrouped_into_full_batches():
    # without regrouping the two groups of 4 keep taking turns: every batch half full
    assert closed_loop(regroup=0.0) == [4] * 16
    # with it, the second batch waits (at most half a batch's run time) for the first group's next queries
    # (the first group's last query waits in the final full batch; the late group's last one is alone)
    assert closed_loop(regroup=0.5) == [4] + [8] * 7 + [4]


def test_regrouping_waits_once_for_callers_that_left_and_never_for_a_lone_caller():
    calls: list[int] = []
    executor = ThreadPoolExecutor(1)
    run = echo_taking(0.02, calls)
    batcher = DynamicBatcher(run, max_batch=64, max_wait=0.0, executor=executor, regroup=10.0)

    async def main() -> list[float]:
        await asyncio.gather(*(batcher.submit(i) for i in range(8)))  # a round of 8
        took = []
        for i in range(3):  # then one caller alone: only its first query waits for the 7 that left
            start = time.perf_counter()
            await batcher.submit(i)
            took.append(time.perf_counter() - start)
        return took

    took = asyncio.run(main())
    executor.shutdown()
    assert calls == [8, 1, 1, 1]
    assert took[0] >= 0.2  # waited 10 x the last run (20 ms) for the rest of the round
    assert max(took[1:]) < 0.15  # then the round is 1: no wait


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
