"""AsyncEngine without HTTP: the step driver sleeps when idle, never stalls the loop, the engine
thread never waits for it, and a consumer that goes away aborts its request and frees its
blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from aserve.engine.async_engine import AsyncEngine
from aserve.sampling_params import SamplingParams
from server_fixtures import small_engine_args


@pytest.fixture(scope="module")
def engine():
    from aserve.engine.engine import Engine
    return Engine(small_engine_args())


@pytest.fixture
async def async_engine(engine):
    ae = AsyncEngine(engine)  # a fresh driver on this test's loop, around the shared engine
    ae.start()
    yield ae
    await ae.shutdown()
    assert not engine.has_unfinished_requests()


async def test_generate_yields_cumulative_outputs_until_finished(async_engine):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = [out async for out in async_engine.generate("r1", "Hello", params)]
    counts = [len(o.outputs[0].token_ids) for o in outputs]
    assert counts == sorted(counts) and counts[-1] == 6
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])


async def test_cancelling_the_consumer_aborts_and_frees_blocks(async_engine, engine):
    params = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    started = asyncio.Event()

    async def consume():
        async for _ in async_engine.generate("r2", "Tell me a story", params):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    assert engine.get_stats().num_used_blocks > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await until_idle(engine)  # the engine thread applies the abort at its next step boundary
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert async_engine.num_aborted == 1


async def until_idle(engine, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while engine.get_stats().num_used_blocks and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return engine.get_stats()


async def test_the_engine_steps_on_while_the_loop_is_busy(async_engine, engine):
    """The engine thread never waits for the loop: a loop held up (parsing requests, writing
    chunks) finds the request further along, and its stream skips to the newest output."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    stream = await async_engine.add_request("busy", "Hello", params)
    try:
        await stream.__anext__()
        before = engine.generation_tokens_total
        time.sleep(0.3)  # the loop is held up: no output is taken meanwhile
        assert engine.generation_tokens_total > before + 1
        outputs = [out async for out in stream]
    finally:
        stream.close()
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 64
    assert len(outputs) < 63  # the tokens of the held-up steps came in one output


async def test_a_loop_slow_to_deliver_gets_several_steps_per_output(async_engine):
    """Past its share of the time, the loop rests after writing and the engine hands over
    several steps at once: fewer, bigger outputs, every token still there."""
    async_engine.delivery_rest = 1e6  # any writing is too slow: the loop rests the most each time
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def run(i: int) -> list:
        return [out async for out in async_engine.generate(f"slow-{i}", f"Story {i}:", params)]

    runs = await asyncio.gather(*(run(i) for i in range(8)))
    for outputs in runs:
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 40
        assert len(outputs) <= 10
        texts = [out.outputs[0].text for out in outputs]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


async def test_the_loops_rest_ends_when_the_engine_runs_out_of_steps(async_engine, monkeypatch):
    """The rest after a round of writes leaves the GIL to a stepping engine; once the engine
    has nothing left to step, the last outputs go out at once, not after the whole rest."""
    import aserve.engine.engine_driver as engine_driver_module

    monkeypatch.setattr(engine_driver_module, "_MAX_REST_S", 30.0)
    async_engine.delivery_rest = 1e6   # every rest is the longest, 30 s, unless cut short
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def run(i: int) -> list:
        return [out async for out in async_engine.generate(f"rest-{i}", f"Story {i}:", params)]

    started = time.monotonic()
    runs = await asyncio.wait_for(asyncio.gather(*(run(i) for i in range(4))), 20)
    assert time.monotonic() - started < 10
    for outputs in runs:
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 12


async def test_a_cancel_that_meets_the_end_of_a_rest_is_never_lost(async_engine):
    """The engine going idle (the rest's end) and a shutdown's cancel in one turn of the
    loop: the rest must raise the cancel (Python 3.11's wait_for returned normally, and the
    driver went on to find the engine thread gone, logged as a failure)."""
    async_engine._engine_went_idle.clear()
    rest = asyncio.create_task(async_engine._rest(10.0))
    await asyncio.sleep(0)   # resting now
    async_engine._engine_went_idle.set()
    rest.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rest


async def test_the_driver_sleeps_while_idle(async_engine):
    await asyncio.sleep(0.05)
    before = async_engine.num_steps
    await asyncio.sleep(0.2)
    assert async_engine.num_steps == before


async def test_a_bad_request_is_refused_at_once(async_engine, engine):
    with pytest.raises(ValueError):
        await async_engine.add_request("r3", [5] * 5000, SamplingParams())
    assert async_engine.num_open_streams == 0 and not engine.has_unfinished_requests()


async def test_a_slow_forward_does_not_stall_the_loop(async_engine, engine, monkeypatch):
    real_forward = engine.runner._forward

    def slow_forward(*args):
        time.sleep(0.1)  # stands in for a long forward pass
        return real_forward(*args)

    # The forward that both synchronous and pipelined (async-scheduling) steps run.
    monkeypatch.setattr(engine.runner, "_forward", slow_forward)
    gaps = []

    async def tick():
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            gaps.append(time.perf_counter() - start)

    ticker = asyncio.create_task(tick())
    outputs = [o async for o in async_engine.generate(
        "r4", "Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))]
    ticker.cancel()
    assert outputs[-1].finished
    assert len(gaps) > 30 and max(gaps) < 0.05


async def test_an_abort_from_elsewhere_ends_the_consumer(async_engine):
    stream = await async_engine.add_request("r5", "Hello", SamplingParams(max_tokens=1000, ignore_eos=True))
    await stream.__anext__()
    async_engine.abort("r5")
    with pytest.raises(RuntimeError, match="aborted"):
        async for _ in stream:
            pass


async def test_a_steps_python_work_does_not_stall_the_loop(async_engine, engine, monkeypatch):
    # Scheduling and output processing are Python (~20 ms a step for 300 requests on a CPU
    # core): they run in the engine thread, which yields the GIL every switch interval.
    real_process = engine.process

    def slow_process(*args, **kwargs):
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:  # pure-Python work, holding the GIL between switches
            pass
        return real_process(*args, **kwargs)

    monkeypatch.setattr(engine, "process", slow_process)
    gaps = []

    async def tick():
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            gaps.append(time.perf_counter() - start)

    ticker = asyncio.create_task(tick())
    outputs = [o async for o in async_engine.generate(
        "r6", "Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))]
    ticker.cancel()
    assert outputs[-1].finished
    assert len(gaps) > 15 and max(gaps) < 0.05, f"the loop stalled {max(gaps) * 1000:.0f} ms"
