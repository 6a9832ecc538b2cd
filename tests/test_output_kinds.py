"""SamplingParams.output_kind (vLLM's RequestOutputKind) through the real AsyncEngine on the
built-in model: CUMULATIVE reports every state, FINAL_ONLY only the last, and DELTA's outputs,
joined, are the cumulative answer, also for a consumer that reads late (its deltas merge)."""

from __future__ import annotations

import asyncio

import pytest

from aserve.engine.async_engine import AsyncEngine
from aserve.sampling_params import RequestOutputKind, SamplingParams
from server_fixtures import small_engine_args


@pytest.fixture(scope="module")
def engine():
    from aserve.engine.engine import Engine
    return Engine(small_engine_args())


@pytest.fixture
async def async_engine(engine):
    ae = AsyncEngine(engine)
    ae.start()
    yield ae
    await ae.shutdown()
    assert not engine.has_unfinished_requests()


def _params(kind: RequestOutputKind, **overrides) -> SamplingParams:
    fields = dict(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True, logprobs=2,
                  prompt_logprobs=1, output_kind=kind)
    fields.update(overrides)
    return SamplingParams(**fields)


async def _outputs(async_engine, request_id: str, params: SamplingParams, pause: float = 0.0):
    outputs = []
    async for out in async_engine.generate(request_id, "The quick brown fox", params):
        outputs.append(out)
        if pause:
            await asyncio.sleep(pause)   # a slow consumer: several deltas wait, merged
    return outputs


def _joined(outputs, index: int = 0):
    samples = [o for out in outputs for o in out.outputs if o.index == index]
    logprobs = [p for o in samples for p in o.logprobs]
    return "".join(o.text for o in samples), [t for o in samples for t in o.token_ids], logprobs


async def test_final_only_reports_the_last_output_alone(async_engine):
    cumulative = await _outputs(async_engine, "cumulative", _params(RequestOutputKind.CUMULATIVE))
    final_only = await _outputs(async_engine, "final", _params(RequestOutputKind.FINAL_ONLY))
    assert len(cumulative) > 1 and len(final_only) == 1 and final_only[0].finished
    assert final_only[0].outputs[0].text == cumulative[-1].outputs[0].text
    assert final_only[0].outputs[0].token_ids == cumulative[-1].outputs[0].token_ids


@pytest.mark.parametrize("pause", [0.0, 0.05])
async def test_deltas_join_into_the_cumulative_answer(async_engine, pause):
    final = (await _outputs(async_engine, f"whole-{pause}", _params(RequestOutputKind.CUMULATIVE)))[-1]
    deltas = await _outputs(async_engine, f"delta-{pause}", _params(RequestOutputKind.DELTA), pause)
    whole = final.outputs[0]
    assert len(deltas) > 1 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert _joined(deltas) == (whole.text, whole.token_ids, list(whole.logprobs))
    # Each delta's own part: its new tokens only, never repeated.
    assert all(len(d.outputs[0].token_ids) < len(whole.token_ids) for d in deltas[:-1] if pause == 0)
    assert deltas[-1].outputs[0].cumulative_logprob == pytest.approx(whole.cumulative_logprob)
    assert deltas[-1].outputs[0].finish_reason == whole.finish_reason == "length"
    prompt_logprobs = [p for d in deltas if d.prompt_logprobs is not None for p in d.prompt_logprobs]
    assert prompt_logprobs == list(final.prompt_logprobs)


async def test_deltas_of_several_samples_join_per_sample(async_engine):
    final = (await _outputs(async_engine, "n-whole", _params(RequestOutputKind.CUMULATIVE, n=2)))[-1]
    deltas = await _outputs(async_engine, "n-delta", _params(RequestOutputKind.DELTA, n=2), 0.02)
    for whole in final.outputs:
        assert _joined(deltas, whole.index) == (whole.text, whole.token_ids, list(whole.logprobs))


async def test_best_of_deltas_come_as_one_final_output(async_engine):
    """The n best of best_of samples are known only at the end: nothing is reported before."""
    params = _params(RequestOutputKind.DELTA, n=1, best_of=3, prompt_logprobs=None)
    deltas = await _outputs(async_engine, "best-of", params)
    assert len(deltas) == 1 and deltas[0].finished
    assert len(deltas[0].outputs[0].token_ids) == 24


@pytest.mark.parametrize("value", [3, -1, "DELTA", True, None])
def test_output_kind_is_checked(value):
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=value)


def test_output_kind_takes_the_enum_or_its_value():
    assert SamplingParams(output_kind=2).output_kind is RequestOutputKind.FINAL_ONLY
    assert SamplingParams().output_kind is RequestOutputKind.CUMULATIVE
    assert SamplingParams(output_kind=RequestOutputKind.DELTA).clone().output_kind is RequestOutputKind.DELTA


@pytest.mark.parametrize("stream, kind", [(False, RequestOutputKind.FINAL_ONLY),
                                          (True, RequestOutputKind.CUMULATIVE)])
def test_the_server_asks_non_streaming_requests_for_their_final_output_only(stream, kind):
    from aserve.server.protocol import ChatCompletionRequest, CompletionRequest
    from aserve.server.protocol_generate import GenerateRequest

    assert CompletionRequest(model="m", prompt="x", stream=stream).to_sampling_params().output_kind is kind
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], stream=stream)
    assert chat.to_sampling_params().output_kind is kind
    assert GenerateRequest(prompt="x", stream=stream).to_sampling_params().output_kind is kind
