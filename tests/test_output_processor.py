"""OutputProcessor.make_output: its fast path for one-sample requests (positional arguments,
for the streaming server's output per request per step) builds exactly what the general
path builds, step after step, for every kind of request that takes it."""

from __future__ import annotations

from aserve import SamplingParams

REQUESTS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=2, prompt_logprobs=1),
    "stop string": SamplingParams(temperature=0.0, max_tokens=9, stop=["a", "e", " "], ignore_eos=True),
    # best_of sequences from the first sample on: the general path, alongside.
    "best_of": SamplingParams(temperature=1.0, seed=5, n=1, best_of=2, max_tokens=4),
    "n=2": SamplingParams(temperature=1.0, seed=7, n=2, best_of=2, max_tokens=4),
}


def test_one_sample_outputs_equal_the_general_path(llm_cache, monkeypatch):
    engine = llm_cache("opt").engine
    processor = engine.outputs
    fast_path = processor._one_sample_output
    compared = []

    def checked(request, seq):
        fast = fast_path(request, seq)
        assert fast == processor._any_output(request), request.request_id
        compared.append((request.request_id, fast.finished))
        return fast

    monkeypatch.setattr(processor, "_one_sample_output", checked)
    monkeypatch.setattr(engine, "stream_outputs", True)   # an output per request per step, final ones too
    for name, params in REQUESTS.items():
        engine.add_request(f"out-{name}", [5, 9, 13, 17, 21][: 2 + len(name) % 4], params)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    one_sample = {"out-greedy", "out-logprobs", "out-stop string"}   # the others fork at their first sample
    assert {request_id for request_id, _ in compared} == one_sample
    assert {request_id for request_id, finished in compared if finished} == one_sample
    assert set(finals) == {f"out-{name}" for name in REQUESTS}
    assert finals["out-stop string"].outputs[0].finish_reason == "stop"
