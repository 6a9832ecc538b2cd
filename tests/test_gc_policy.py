"""engine/gc_policy.py: the youngest generation is collected less often while the engine works,
and an offline run puts the caller's thresholds back."""

from __future__ import annotations

import gc

from aserve.engine.gc_policy import FIRST_GENERATION_THRESHOLD, fewer_collections, serve_with_fewer_collections


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


def test_a_server_freezes_its_start_up_heap_and_collects_less_often():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        serve_with_fewer_collections()
        assert gc.get_threshold() == (FIRST_GENERATION_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*saved)
