"""The step inputs' three builders (aserve/engine/step_inputs.py) make the same arrays.

Small decode steps are built in plain Python from the block manager's lists, bigger decode
steps in one Python pass and numpy, every other step with numpy alone; the last two read the
persistent table array. Each decode step of real engine runs (async scheduling's placeholder
rows, n > 1 samples forking blocks, beam search's copy-on-write, prefix caching, chunked
prefill) is built all three ways and compared; the other steps' block tables are compared
with the lists.
"""

from __future__ import annotations

import numpy as np
import pytest

from aserve import OfflineLLM, SamplingParams
from aserve.engine import step_inputs
from server_fixtures import TEST_NUM_BLOCKS


def _same(a, b) -> bool:
    fields = ("num_tokens", "num_seqs", "table_width", "num_logits", "num_fills", "num_copies",
              "max_query_len", "max_seq_len")
    return (all(getattr(a, f) == getattr(b, f) for f in fields)
            and a.int64.dtype == b.int64.dtype == np.int64 and np.array_equal(a.int64, b.int64)
            and a.int32.dtype == b.int32.dtype == np.int32 and np.array_equal(a.int32, b.int32))


@pytest.fixture
def compared_steps(monkeypatch):
    """Every decode step's arrays, built each way; the list of (small, decode, vectorized) results."""
    seen = []
    vectorized = step_inputs.vectorized_step_arrays

    def both(sched, row_plan, block_manager, placeholder_rows=None):
        small = step_inputs.small_decode_arrays(sched, row_plan, block_manager, placeholder_rows)
        decode = step_inputs.decode_step_arrays(sched, row_plan, block_manager, placeholder_rows)
        general = vectorized(sched, row_plan, block_manager, placeholder_rows)
        seen.append((small, decode, general))
        return general

    def build(sched, row_plan, block_manager, placeholder_rows=None):
        if sched.decode_only:
            return both(sched, row_plan, block_manager, placeholder_rows)
        # Other steps: the block tables (gathered from the persistent array) against the lists.
        arrays = vectorized(sched, row_plan, block_manager, placeholder_rows)
        lists = [block_manager.block_table(item.seq.seq_id) for item in sched.scheduled]
        width = max(map(len, lists))
        padded = np.array([t + [0] * (width - len(t)) for t in lists], dtype=np.int32)
        assert np.array_equal(arrays.int32_views(arrays.int32)[2], padded)
        return arrays

    monkeypatch.setattr("aserve.engine.engine.build_step_arrays", build)
    return seen


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_the_decode_builders_match_the_vectorized_builder(compared_steps, async_scheduling):
    llm = OfflineLLM(model=None, num_gpu_blocks_override=TEST_NUM_BLOCKS, device="cpu",
                     async_scheduling=async_scheduling, max_num_batched_tokens=64)
    prompts = ["The capital of France is", "Once upon a time " * 6, "1 2 3", "x"]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    llm.generate(prompts[:2], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=24), use_tqdm=False)
    llm.generate(prompts[0], SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=20),
                 use_tqdm=False)
    many = [f"request {i} " * (1 + i % 5) for i in range(3 * step_inputs.SMALL_DECODE_BATCH)]
    llm.generate(many, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert len(compared_steps) > 50
    assert any(small.num_seqs > step_inputs.SMALL_DECODE_BATCH for small, _, _ in compared_steps)
    assert any(small.num_fills for small, _, _ in compared_steps) == async_scheduling
    assert any(small.num_copies for small, _, _ in compared_steps)
    assert any(small.table_width > 1 for small, _, _ in compared_steps)
    for index, (small, decode, general) in enumerate(compared_steps):
        assert _same(small, general), f"decode step {index} differs (small builder)"
        assert _same(decode, general), f"decode step {index} differs (decode builder)"


def test_the_dispatch_takes_the_small_builder_for_small_decode_steps_and_the_decode_builder_above(monkeypatch):
    class Sched:
        def __init__(self, n, decode_only):
            self.scheduled = [None] * n
            self.decode_only = decode_only

    calls = []
    monkeypatch.setattr(step_inputs, "small_decode_arrays", lambda *a: calls.append("small"))
    monkeypatch.setattr(step_inputs, "decode_step_arrays", lambda *a: calls.append("decode"))
    monkeypatch.setattr(step_inputs, "vectorized_step_arrays", lambda *a: calls.append("vectorized"))
    for n, decode_only in ((1, True), (step_inputs.SMALL_DECODE_BATCH, True),
                           (step_inputs.SMALL_DECODE_BATCH + 1, True), (1, False), (300, False)):
        step_inputs.build_step_arrays(Sched(n, decode_only), None, None)
    assert calls == ["small", "small", "decode", "vectorized", "vectorized"]
