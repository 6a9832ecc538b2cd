"""The start's warm-up of steps with prompt tokens (aserve/engine/step_warmup.py; on by default on
a GPU, run here by hand on the CPU): it reaches the kinds of step it is for, and leaves the
engine as a fresh one, so that it changes no later output."""

from __future__ import annotations

import pytest

from aserve import EngineArgs, SamplingParams
from aserve.engine.engine import Engine
from aserve.engine.step_warmup import STEP_WARMUP_ENV, step_warmup_enabled, warm_up_step_kinds
from hf_reference import random_prompts
from tiny_models import tiny_model_dir


def _engine(**overrides) -> Engine:
    return Engine(EngineArgs(model=tiny_model_dir("llama"), load_format="auto", device="cpu", seed=0,
                             dtype="float32", **overrides))


def _outputs(engine: Engine, temperature: float) -> list[list[int]]:
    params = SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(5, [40, 7, 23])):
        engine.add_request(f"r{i}", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = list(output.outputs[0].token_ids)
    return [done[f"r{i}"] for i in range(3)]


def test_warm_up_runs_a_mixed_step_with_a_cached_prompt_and_leaves_the_engine_clean():
    engine = _engine()
    steps = []   # per model step: (query lengths, context lengths)
    launch = engine.runner.launch

    def recording_launch(model_input, *rest):
        metadata = model_input.attn_metadata
        steps.append((list(metadata.query_lens_cpu), list(metadata.seq_lens_cpu)))
        return launch(model_input, *rest)

    engine.runner.launch = recording_launch
    free_before = engine.block_manager.num_free_blocks
    assert warm_up_step_kinds(engine) > 0
    mixed = [(q, k) for q, k in steps if 1 in q and max(q) > 1]
    assert mixed, steps                                     # a decode beside prompts
    assert any(qi < ki for q, k in mixed for qi, ki in zip(q, k) if qi > 1), mixed   # a prompt with context
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.prompt_tokens_total == engine.generation_tokens_total == 0
    assert engine.block_manager.num_free_blocks == free_before
    assert engine.block_manager.prefix_cache.num_cached_blocks == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_engine_warmed_up_gives_what_a_fresh_one_gives(temperature):
    """Greedy, and sampled from the engine's seed: the warm-up's own random draws are undone."""
    warmed = _engine()
    warm_up_step_kinds(warmed)
    assert _outputs(warmed, temperature) == _outputs(_engine(), temperature)


def test_warm_up_fits_a_short_context_and_a_failed_one_leaves_a_clean_engine(monkeypatch, caplog):
    """Prompts cut to what max_model_len holds (no cached-context prompt where no block fits
    before the last token); a warm-up that fails is logged, and the engine serves as a fresh one."""
    short = _engine(max_model_len=14)
    warm_up_step_kinds(short)
    assert not short.requests and short.prompt_tokens_total == 0
    assert "warm-up" not in caplog.text   # ran without failing

    engine = _engine()
    add = engine.add_request
    calls = []

    def failing_add(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:   # the first request is stepping by then
            raise RuntimeError("a warm-up failure")
        return add(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", failing_add)
    warm_up_step_kinds(engine)
    monkeypatch.setattr(engine, "add_request", add)
    assert "warm-up" in caplog.text and "a warm-up failure" in caplog.text
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.block_manager.prefix_cache.num_cached_blocks == 0
    assert _outputs(engine, 1.0) == _outputs(_engine(), 1.0)


def test_warm_up_runs_on_gpus_only_and_can_be_switched_off(monkeypatch):
    engine = _engine()
    assert not step_warmup_enabled(engine)           # the CPU: nothing is loaded lazily
    engine.device = type(engine.device)("cuda")
    assert step_warmup_enabled(engine)
    monkeypatch.setenv(STEP_WARMUP_ENV, "0")
    assert not step_warmup_enabled(engine)
    monkeypatch.setenv(STEP_WARMUP_ENV, "yes")
    with pytest.raises(ValueError, match=STEP_WARMUP_ENV):
        step_warmup_enabled(engine)
