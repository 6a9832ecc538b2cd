"""Outputs crossing from an engine process (engine/output_wire.py): a request run as DELTA in
the engine, encoded, decoded and joined in the server gives, step by step, the outputs the
engine gives it as CUMULATIVE; so does one whose text the server makes from its token ids
(server_detokenizer.py); delta and final-only requests come through as the engine made them; a
request nobody waits for is dropped with its state."""

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
    encoder, decoder = OutputEncoder(), OutputDecoder()
    in_engine = [decoder.engine_params(f"r{i}", p) for i, p in enumerate(params)]
    assert all(p.output_kind == RequestOutputKind.DELTA and p.detokenize for p in in_engine)
    got = []
    for step in _run(engine, lambda i: in_engine[i]):
        items = copy.deepcopy(encoder.encode(step))   # as if pickled: nothing shared
        got.append([decoder.decode(item, lambda _: True) for item in items])
    assert [[_fields(o) for o in step] for step in got] == [[_fields(o) for o in step] for step in want]
    assert not decoder._latest and not decoder._prompts and not encoder._prompt_sent


# Random ids of the byte-level default model: many are stray bytes of multi-byte characters, so
# texts hold characters split over tokens, and some end inside one (U+FFFD at the end).
@pytest.mark.parametrize("extra", [
    {}, {"logprobs": 2}, {"skip_special_tokens": False}, {"output_kind": RequestOutputKind.DELTA},
    {"stop": ["w1"]}, {"output_kind": RequestOutputKind.FINAL_ONLY}, {"n": 2, "temperature": 0.9, "seed": 5}])
def test_text_made_in_the_server_is_the_engines_text(engine, extra):
    extra = {"temperature": 0.0, **extra}
    params = [SamplingParams(max_tokens=7 + 3 * i, ignore_eos=True, **extra) for i in range(len(PROMPTS))]
    want = _run(engine, lambda i: params[i])
    encoder, decoder = OutputEncoder(), OutputDecoder(engine.tokenizer)
    in_engine = [decoder.engine_params(f"r{i}", p) for i, p in enumerate(params)]
    # Only a plain one-sample request (its outputs DELTA in the engine, or its final one) with no stop strings.
    made_here = "stop" not in extra and "n" not in extra
    assert [p.detokenize for p in in_engine] == [not made_here] * len(PROMPTS)
    assert all(p.detokenize for p in params)   # the caller's params are left as they were
    steps = _run(engine, lambda i: in_engine[i])
    if made_here:   # the engine process sends token ids alone
        assert all(o.text == "" for step in steps for out in step for o in out.outputs)
    got = [[decoder.decode(item, lambda _: True) for item in copy.deepcopy(encoder.encode(step))] for step in steps]
    assert [[_fields(o) for o in step] for step in got] == [[_fields(o) for o in step] for step in want]
    texts = "".join(o.text for step in want for out in step for o in out.outputs)
    assert texts and (not made_here or "\ufffd" in texts)   # split characters were made here
    assert not decoder._detokenizers._pending and not decoder._detokenizers._running


def test_a_request_refused_or_aborted_leaves_no_detokenizer(engine):
    decoder = OutputDecoder(engine.tokenizer)
    decoder.engine_params("gone", SamplingParams(max_tokens=4))
    assert "gone" in decoder._detokenizers
    decoder.forget("gone")
    assert "gone" not in decoder._detokenizers and not decoder._detokenizers._pending


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
    encoder, decoder = OutputEncoder(), OutputDecoder(engine.tokenizer)
    params = decoder.engine_params("left", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert params.output_kind == RequestOutputKind.DELTA and not params.detokenize
    engine.add_request("left", PROMPTS[0], params)
    first = decoder.decode(encoder.encode(_next_outputs(engine))[0], lambda _: True)
    assert first.prompt_token_ids == PROMPTS[0] and len(first.outputs[0].token_ids) >= 1
    assert decoder.decode(encoder.encode(_next_outputs(engine))[0], lambda _: False) is None
    assert not decoder._latest and not decoder._prompts and not decoder._joined
    assert "left" not in decoder._detokenizers
    engine.abort_request("left")
    encoder.forget("left")
    while engine.has_unfinished_requests():
        engine.step()
    assert not encoder._prompt_sent


def test_a_server_that_makes_text_builds_the_byte_table_before_the_first_output(engine, monkeypatch):
    """The byte-level tokenizer's table is built with the server's decoder (while the engine
    process loads), not by its first stream's first output in the middle of a burst."""
    import aserve.engine.byte_level_decoding as byte_level_decoding
    from aserve.engine.detokenizer import IncrementalDetokenizer

    tokenizer = copy.deepcopy(engine.tokenizer)   # one whose table nothing has built yet
    builds = []
    build = byte_level_decoding._build
    monkeypatch.setattr(byte_level_decoding, "_build", lambda *args: builds.append(args) or build(*args))
    OutputDecoder(tokenizer)
    assert len(builds) == 1
    IncrementalDetokenizer(tokenizer, PROMPTS[0], skip_special_tokens=True).append(7, False)
    assert len(builds) == 1
