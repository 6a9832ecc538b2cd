"""engine/gc_policy.py: the youngest generation is collected less often while the engine works,
and an offline run puts the caller's thresholds back."""

from __future__ import annotations

import gc
import urllib.request
import weakref

from aserve.engine.gc_policy import (FIRST_GENERATION_THRESHOLD, fewer_collections, serve_with_fewer_collections,
                                     stop_serving_with_fewer_collections)


def test_fewer_collections_inside_the_block_and_the_callers_thresholds_after():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(123, 4, 5)
        with fewer_collections():
            assert gc.get_threshold() == (FIRST_GENERATION_THRESHOLD, 4, 5)
        assert gc.get_threshold() == (123, 4, 5)
        try:
            with fewer_collections():
                raise KeyError("a failed run")
        except KeyError:
            pass
        assert gc.get_threshold() == (123, 4, 5)
        gc.set_threshold(10 * FIRST_GENERATION_THRESHOLD, 4, 5)   # a caller's higher one stays
        with fewer_collections():
            assert gc.get_threshold()[0] == 10 * FIRST_GENERATION_THRESHOLD
    finally:
        gc.set_threshold(*saved)


def test_an_offline_run_leaves_the_threshold_as_it_found_it(llm_cache):
    from aserve import SamplingParams

    llm = llm_cache("llama")
    seen = []
    step = llm.engine.step

    def watched_step():
        seen.append(gc.get_threshold()[0])
        return step()

    saved = gc.get_threshold()
    llm.engine.step = watched_step
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    finally:
        del llm.engine.step
    assert seen and set(seen) == {max(saved[0], FIRST_GENERATION_THRESHOLD)}
    assert gc.get_threshold() == saved


def test_a_server_freezes_its_start_up_heap_and_collects_less_often_until_it_stops():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        given_back = serve_with_fewer_collections()
        assert given_back == (700, 10, 10)
        assert gc.get_threshold() == (FIRST_GENERATION_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > 0
        stop_serving_with_fewer_collections(given_back)
        assert gc.get_threshold() == (700, 10, 10)
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_a_stopped_server_leaves_its_engine_to_the_collector():
    """Serving freezes the heap; when the server stops, its engine (held in reference cycles)
    must become collectable again, or a process that starts servers in turn keeps every model."""
    from server_fixtures import ServerThread, small_engine_args

    with ServerThread(small_engine_args()) as server:
        engine = weakref.ref(server.async_engine.engine)
        assert gc.get_freeze_count() > 0
        with urllib.request.urlopen(f"{server.url}/v1/models", timeout=30) as reply:
            assert reply.status == 200
    server.state = None
    gc.collect()
    assert engine() is None


def _engine_process_that_reports_its_collector(args, clients, log_level, log_format):
    """run_engine_process, whose serving loop only sends back how the collector is set then."""
    import aserve.engine.engine_process as engine_process

    def report(engine, clients):
        clients[0].out_conn.send(("collector", gc.get_threshold(), gc.get_freeze_count()))

    engine_process._serve = report
    engine_process.run_engine_process(args, clients, log_level, log_format)


def test_an_engine_process_freezes_its_loaded_heap_and_collects_less_often():
    """The engine in a process of its own (--engine-process) collects as the server's process
    does: with CPython's defaults a served burst made ~200 young and a full collection there."""
    import multiprocessing

    from server_fixtures import small_engine_args

    context = multiprocessing.get_context("spawn")
    ops_in, ops_out = context.Pipe(duplex=False)
    batches_in, batches_out = context.Pipe(duplex=False)
    process = context.Process(target=_engine_process_that_reports_its_collector,
                              args=(small_engine_args(), [(ops_in, batches_out)], 30, None))
    process.start()
    try:
        assert batches_in.poll(120), "the engine process did not load"
        assert batches_in.recv()[0] == "ready"
        assert batches_in.poll(30)
        kind, thresholds, frozen = batches_in.recv()
        assert kind == "collector"
        assert thresholds[0] >= FIRST_GENERATION_THRESHOLD
        assert frozen > 10_000   # the model's modules, torch's and transformers' state
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0
