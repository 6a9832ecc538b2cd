"""Outputs crossing from an engine process (engine/output_wire.py): a request run as DELTA in
the engine, encoded, decoded and joined in the server gives, step by step, the outputs the
engine gives it as CUMULATIVE; delta and final-only requests come through as the engine made
them; a request nobody waits for is dropped with its state."""

from __future__ import annotations

import copy

import pytest

from aserve import OfflineLLM, SamplingParams
from aserve.engine.output_wire import OutputDecoder, OutputEncoder, as_delta_in_engine
from aserve.sampling_params import RequestOutputKind
from hf_reference import random_prompts

PROMPTS = random_prompts(21, [6, 19, 2, 33])


@pytest.fixture(scope="module")
def engine():
    # No prefix caching: each run must compute what the one before it did (num_cached_tokens).
    engine = OfflineLLM(device="cpu", kv_cache_memory_gb=0.05, enable_prefix_caching=False).engine
    engine.stream_outputs = True   # every step's outputs, as a server's engine makes them
    return engine


def _run(engine, params_of) -> list[list]:
    """Every step's outputs (as dicts of their fields), each request added with params_of(i)."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params_of(i))
    steps = []
    while engine.has_unfinished_requests():
        steps.append(engine.step())
    return steps


def _next_outputs(engine) -> list:
    """The next step's outputs that are not empty (a step's tokens may come a step later)."""
    while True:
        outputs = engine.step()
        if outputs:
            return outputs


def _fields(output) -> dict:
    fields = dict(vars(output))
    fields["outputs"] = [vars(o) for o in output.outputs]
    # The times differ from run to run; that they cross intact is the encoder's plain copy.
    fields["metrics"] = output.metrics.num_generation_tokens if output.metrics is not None else None
    return fields


@pytest.mark.parametrize("extra", [{}, {"logprobs": 3, "prompt_logprobs": 2}, {"stop": ["w1"]}])
def test_joined_deltas_are_the_engines_cumulative_outputs_step_by_step(engine, extra):
    params = [SamplingParams(temperature=0.0, max_tokens=9 + i, ignore_eos=True, **extra)
              for i in range(len(PROMPTS))]
    want = _run(engine, lambda i: params[i])
    in_engine = [as_delta_in_engine(p) for p in params]
    assert all(p is not None and p.output_kind == RequestOutputKind.DELTA for p in in_engine)
    encoder, decoder = OutputEncoder(), OutputDecoder()
    for i in range(len(PROMPTS)):
        decoder.join_deltas_of(f"r{i}")
    got = []
    for step in _run(engine, lambda i: in_engine[i]):
        items = copy.deepcopy(encoder.encode(step))   # as if pickled: nothing shared
        got.append([decoder.decode(item, lambda _: True) for item in items])
    assert [[_fields(o) for o in step] for step in got] == [[_fields(o) for o in step] for step in want]
    assert not decoder._latest and not decoder._prompts and not encoder._prompt_sent


def test_delta_final_only_and_several_samples_pass_through_as_made(engine):
    kinds = [RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY, RequestOutputKind.CUMULATIVE,
             RequestOutputKind.CUMULATIVE]
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=kinds[0]),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=kinds[1]),
              SamplingParams(temperature=0.8, n=2, seed=3, max_tokens=6, ignore_eos=True),
              SamplingParams(use_beam_search=True, best_of=2, temperature=0.0, max_tokens=4, ignore_eos=True)]
    assert [as_delta_in_engine(p) for p in params] == [None] * 4
    want = _run(engine, lambda i: params[i])
    encoder, decoder = OutputEncoder(), OutputDecoder()
    got = [[decoder.decode(item, lambda _: True) for item in copy.deepcopy(encoder.encode(step))]
           for step in _run(engine, lambda i: params[i])]
    assert [[_fields(o) for o in step] for step in got] == [[_fields(o) for o in step] for step in want]


def test_outputs_of_a_request_nobody_waits_for_are_dropped_with_its_state(engine):
    params = as_delta_in_engine(SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    engine.add_request("left", PROMPTS[0], params)
    encoder, decoder = OutputEncoder(), OutputDecoder()
    decoder.join_deltas_of("left")
    first = decoder.decode(encoder.encode(_next_outputs(engine))[0], lambda _: True)
    assert first.prompt_token_ids == PROMPTS[0] and len(first.outputs[0].token_ids) >= 1
    assert decoder.decode(encoder.encode(_next_outputs(engine))[0], lambda _: False) is None
    assert not decoder._latest and not decoder._prompts and not decoder._joined
    engine.abort_request("left")
    encoder.forget("left")
    while engine.has_unfinished_requests():
        engine.step()
    assert not encoder._prompt_sent
