"""OpenAI's Responses API (/v1/responses) through a real server on loopback, with the official
openai client: greedy text and logprobs equal OfflineLLM's on the same chat prompt, streamed
or not; conversations chained by previous_response_id; the store's routes; background runs
and their cancel; bad input as 400s naming the field."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import requests

from aserve import OfflineLLM, SamplingParams
from aserve.server.responses_store import EventLog, ResponseStore, StoredResponse
from server_fixtures import TEST_NUM_BLOCKS, ServerThread, module_server_and_client

server, client = module_server_and_client()

QUESTION = "Hello there!"
EVENTS_OF_A_MESSAGE = ["response.created", "response.in_progress", "response.output_item.added",
                       "response.content_part.added"]
END_OF_A_MESSAGE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def offline():
    return OfflineLLM(model=None, num_gpu_blocks_override=TEST_NUM_BLOCKS, device="cpu")


def rendered(offline, messages) -> list[int]:
    tok = offline.get_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def greedy(offline, messages, max_tokens: int, logprobs=None):
    return offline.generate([rendered(offline, messages)],
                            SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs),
                            use_tqdm=False)[0].outputs[0]


def post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.url + path, json={"model": server.model_name, **body}, timeout=60)


# ----------------------------------------------------------------------------- text
def test_greedy_response_equals_offline_chat(client, server, offline):
    resp = client.responses.create(model=server.model_name, input=QUESTION, instructions="Be terse.",
                                   max_output_tokens=10, temperature=0)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": QUESTION}]
    expected = greedy(offline, messages, 10)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == server.model_name
    message, = resp.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert resp.output_text == expected.text
    assert resp.usage.input_tokens == len(rendered(offline, messages))
    assert resp.usage.output_tokens == len(expected.token_ids) == 10
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    # Cut off by max_output_tokens: OpenAI's "incomplete", on the response and its message.
    assert resp.status == message.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.instructions == "Be terse." and resp.temperature == 0 and resp.max_output_tokens == 10


def test_a_finished_response_is_completed(client, offline):
    resp = client.responses.create(input=QUESTION, max_output_tokens=200, temperature=0,
                                   extra_body={"stop": [" "]})
    assert resp.status == "completed" and resp.incomplete_details is None
    assert resp.output[0].status == "completed" and " " not in resp.output_text


def test_message_items_with_parts_and_roles_render_as_chat(client, offline):
    """Input items in every text shape: parts, the developer role (a system message), an
    assistant's earlier answer, reasoning items (skipped)."""
    items = [{"role": "developer", "content": "Answer in French."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                             {"type": "input_text", "text": " you"}]},
             {"type": "reasoning", "id": "rs_1", "summary": []},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Bonjour"}]},
             {"role": "user", "content": QUESTION}]
    resp = client.responses.create(input=items, max_output_tokens=6, temperature=0)
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi you"},
                {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": QUESTION}]
    assert resp.output_text == greedy(offline, messages, 6).text
    assert resp.usage.input_tokens == len(rendered(offline, messages))


def test_logprobs_equal_offline(client, offline):
    resp = client.responses.create(input=QUESTION, max_output_tokens=5, temperature=0, top_logprobs=2,
                                   include=["message.output_text.logprobs"])
    expected = greedy(offline, [{"role": "user", "content": QUESTION}], 5, logprobs=2)
    got = resp.output[0].content[0].logprobs
    assert len(got) == len(expected.token_ids) == 5
    for entry, token_id, want in zip(got, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(want[token_id].logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(max(lp.logprob for lp in want.values()), abs=1e-4)
    # Without include, no logprobs (an empty list, as OpenAI sends).
    plain = client.responses.create(input=QUESTION, max_output_tokens=3, temperature=0, top_logprobs=2)
    assert plain.output[0].content[0].logprobs == []


# ----------------------------------------------------------------------------- streaming
def test_stream_sends_openais_events_in_order(client):
    plain = client.responses.create(input=QUESTION, max_output_tokens=12, temperature=0,
                                    include=["message.output_text.logprobs"], top_logprobs=1)
    events = list(client.responses.create(input=QUESTION, max_output_tokens=12, temperature=0, stream=True,
                                          include=["message.output_text.logprobs"], top_logprobs=1))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == EVENTS_OF_A_MESSAGE + ["response.output_text.delta"] * len(deltas) + END_OF_A_MESSAGE + [
        "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # A delta per step that brought tokens (test_server_stream_chunks.py: one per token while
    # the loop keeps up); each carries its tokens' logprobs.
    assert sum(len(d.logprobs) for d in deltas) == plain.usage.output_tokens == 12
    assert "".join(d.delta for d in deltas) == plain.output_text
    assert [lp.logprob for d in deltas for lp in d.logprobs] == pytest.approx(
        [lp.logprob for lp in plain.output[0].content[0].logprobs], abs=1e-5)
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in deltas) and events[-2].item.id == item_id
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.output_text == plain.output_text and final.usage.output_tokens == 12
    assert final.status == "incomplete" and events[-2].item.status == "incomplete"


def test_a_streamed_response_is_stored_and_chainable(client, offline):
    events = list(client.responses.create(input=QUESTION, max_output_tokens=4, temperature=0, stream=True))
    final = events[-1].response
    assert client.responses.retrieve(final.id).output_text == final.output_text
    follow = client.responses.create(input="More", previous_response_id=final.id, max_output_tokens=3,
                                     temperature=0)
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": final.output_text},
                {"role": "user", "content": "More"}]
    assert follow.usage.input_tokens == len(rendered(offline, messages))


def test_a_fault_after_the_headers_ends_the_stream_with_an_error_event(server):
    """A fault in the request's own step is the stream's last event (OpenAI's "error" event),
    a 500 for the same fault unstreamed, and the engine goes on serving."""
    outputs = server.async_engine.engine.outputs
    original = outputs.append_token

    def poisoned(request, *args, **kwargs):
        if "poison" in request.request_id:
            raise RuntimeError("injected fault")
        return original(request, *args, **kwargs)

    server.call(lambda: setattr(outputs, "append_token", poisoned))
    try:
        body = {"input": QUESTION, "max_output_tokens": 4, "request_id": "poison"}
        unstreamed = post(server, "/v1/responses", body)
        streamed = post(server, "/v1/responses", {**body, "stream": True})
    finally:
        server.call(lambda: setattr(outputs, "append_token", original))
    assert unstreamed.status_code == 500 and "injected fault" in unstreamed.json()["error"]["message"]
    assert streamed.status_code == 200
    last = streamed.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ") and "injected fault" in last
    assert post(server, "/v1/responses", {"input": QUESTION, "max_output_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------------- conversations
def test_previous_response_id_continues_the_conversation(client, offline):
    first = client.responses.create(input=QUESTION, instructions="Be terse.", max_output_tokens=6, temperature=0)
    second = client.responses.create(input="Tell me more.", previous_response_id=first.id, max_output_tokens=6,
                                     temperature=0)
    # The earlier turn and its answer; the earlier instructions are not carried over (OpenAI's rule).
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "Tell me more."}]
    assert second.output_text == greedy(offline, messages, 6).text
    assert second.usage.input_tokens == len(rendered(offline, messages))
    assert second.previous_response_id == first.id
    third = client.responses.create(input="Again.", previous_response_id=second.id, instructions="Be terse.",
                                    max_output_tokens=4, temperature=0)
    messages = [{"role": "system", "content": "Be terse."}] + messages + [
        {"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Again."}]
    assert third.output_text == greedy(offline, messages, 4).text


def test_an_unknown_previous_response_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(input=QUESTION, previous_response_id="resp_nope", max_output_tokens=2)
    assert info.value.body["param"] == "previous_response_id"


# ----------------------------------------------------------------------------- the store
def test_retrieve_delete_and_input_items(client):
    resp = client.responses.create(input=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                          {"role": "user", "content": "c"}], max_output_tokens=2, metadata={"k": "v"})
    assert resp.store and resp.metadata == {"k": "v"}
    assert client.responses.retrieve(resp.id).model_dump() == resp.model_dump()
    newest_first = client.responses.input_items.list(resp.id)
    assert [item.content[0].text for item in newest_first.data] == ["c", "b", "a"]
    oldest_first = client.responses.input_items.list(resp.id, order="asc", limit=2)
    assert [item.content[0].text for item in oldest_first.data] == ["a", "b"] and oldest_first.has_more
    rest = client.responses.input_items.list(resp.id, order="asc", after=oldest_first.last_id)
    assert [item.content[0].text for item in rest.data] == ["c"] and not rest.has_more
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)


def test_store_false_is_not_kept(client):
    resp = client.responses.create(input=QUESTION, max_output_tokens=2, store=False)
    assert resp.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_without_a_store_store_is_ignored_and_background_refused():
    with ServerThread(state_options={"responses": ResponseStore(0)}) as srv:
        client = srv.openai_client()
        resp = client.responses.create(input=QUESTION, max_output_tokens=2)
        assert resp.store is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(resp.id)
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(input=QUESTION, max_output_tokens=2, background=True)
        assert info.value.body["param"] == "background"


def test_the_store_forgets_its_oldest_past_its_bound():
    store = ResponseStore(2)
    for name in "abc":
        store.put(name, object())
    assert store.get("a") is None and store.get("b") is not None and len(store) == 2
    with pytest.raises(ValueError, match="max_stored_responses"):
        ResponseStore(-1)


def test_the_oldest_finished_streams_events_are_dropped_past_the_bound():
    async def fill(log: EventLog, size: int, ended: bool) -> EventLog:
        await log.write(b"x" * size)
        if ended:
            log.close()
        return log

    store = ResponseStore(10, max_event_bytes=250)
    for name, size, ended in (("old", 100, True), ("running", 100, False), ("new", 100, True)):
        store.put(name, StoredResponse({}, [], events=asyncio.run(fill(EventLog(), size, ended))))
    store.trim_event_logs()
    assert store.get("old").events is None   # the oldest finished: dropped
    assert store.get("running").events is not None and store.get("new").events is not None


# ----------------------------------------------------------------------------- background
def test_a_background_response_runs_and_is_polled(client, offline):
    queued = client.responses.create(input=QUESTION, max_output_tokens=8, temperature=0, background=True)
    assert queued.status == "queued" and queued.background and queued.output == []
    deadline = time.monotonic() + 30
    resp = queued
    while resp.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        resp = client.responses.retrieve(queued.id)
    assert resp.status == "incomplete"
    assert resp.output_text == greedy(offline, [{"role": "user", "content": QUESTION}], 8).text


def test_cancel_ends_a_background_response_and_frees_its_blocks(client, server):
    queued = client.responses.create(input=QUESTION, max_output_tokens=2000, background=True,
                                     extra_body={"ignore_eos": True})
    server.wait_until(lambda s: s.num_running == 1)
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(queued.id).status == "cancelled"
    stats = server.wait_until(lambda s: s.num_running == 0 and s.num_used_blocks == 0)
    assert stats.num_running == 0 and stats.num_used_blocks == 0
    # Cancelling again answers the same; a response that was not in the background is a 400.
    assert client.responses.cancel(queued.id).status == "cancelled"
    plain = client.responses.create(input=QUESTION, max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response."):   # vLLM's words
        client.responses.cancel(plain.id)


def test_background_needs_store_but_store_null_is_the_default(client):
    """vLLM's tests: store null means the default (true), so background is allowed; store
    false with background is refused in vLLM's words."""
    queued = client.responses.create(input=QUESTION, max_output_tokens=2, background=True, extra_body={"store": None})
    assert queued.background and queued.status in ("queued", "in_progress", "completed", "incomplete")
    with pytest.raises(openai.BadRequestError, match="background can only be used when `store` is true"):
        client.responses.create(input=QUESTION, max_output_tokens=2, background=True, store=False)


def test_a_background_stream_is_followed_and_resumable(client, server):
    """background with stream: the creating request follows the run's events; GET with
    stream=true and starting_after reads the same events again from any point."""
    events = list(client.responses.create(input=QUESTION, max_output_tokens=6, temperature=0, background=True,
                                          stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    response_id = events[-1].response.id
    assert client.responses.retrieve(response_id).output_text == events[-1].response.output_text
    again = requests.get(f"{server.url}/v1/responses/{response_id}", params={"stream": "true", "starting_after": 3},
                         timeout=30)
    numbers = [int(line.split(b'"sequence_number":')[1].split(b"}")[0].split(b",")[0])
               for line in again.content.split(b"\n") if line.startswith(b"data: ")]
    assert numbers == list(range(4, len(events)))
    resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=len(events) - 2))
    assert [e.type for e in resumed] == ["response.incomplete"]


def test_a_background_stream_goes_on_after_its_client_leaves(client, server):
    with requests.post(server.url + "/v1/responses", stream=True, timeout=60,
                       json={"input": QUESTION, "stream": True, "background": True, "max_output_tokens": 40,
                             "ignore_eos": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith(b"data: "))
    response_id = first.split(b'"id":"')[1].split(b'"')[0].decode()
    deadline = time.monotonic() + 30
    while client.responses.retrieve(response_id).status == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.05)
    done = client.responses.retrieve(response_id)
    assert done.status == "incomplete" and done.usage.output_tokens == 40


def test_cancel_ends_a_background_stream_for_its_readers(client, server):
    with requests.post(server.url + "/v1/responses", stream=True, timeout=60,
                       json={"input": QUESTION, "stream": True, "background": True, "max_output_tokens": 2000,
                             "ignore_eos": True}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        response_id = first.split(b'"id":"')[1].split(b'"')[0].decode()
        assert client.responses.cancel(response_id).status == "cancelled"
        rest = list(lines)   # the stream ends: the reader is not left waiting
    assert not any(b"response.incomplete" in line for line in rest)
    stats = server.wait_until(lambda s: s.num_running == 0 and s.num_used_blocks == 0)
    assert stats.num_running == 0 and stats.num_used_blocks == 0


def test_only_a_background_stream_can_be_streamed_again(client, server):
    plain = client.responses.create(input=QUESTION, max_output_tokens=2)
    resp = requests.get(f"{server.url}/v1/responses/{plain.id}", params={"stream": "true"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stream"


def test_a_disconnected_stream_frees_its_blocks(server):
    with requests.post(server.url + "/v1/responses", stream=True, timeout=60,
                       json={"input": QUESTION, "stream": True, "max_output_tokens": 2000, "ignore_eos": True}) as r:
        next(r.iter_lines())
    stats = server.wait_until(lambda s: s.num_running == 0 and s.num_used_blocks == 0)
    assert stats.num_running == 0 and stats.num_used_blocks == 0


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": 5}, "input"),
    ({"input": "hi", "include": ["nonsense"]}, "include"),
    ({"input": "hi", "background": True, "store": False}, "background"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "temperature": "hot"}, "temperature"),
    ({"input": "hi", "top_logprobs": -1}, "top_logprobs"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text"),
    ({"input": "hi", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": "hi", "priority": 3}, "priority"),
    ({"input": "hi", "stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"input": "hi", "truncation": "sometimes"}, "truncation"),
    ({}, "input"),
])
def test_bad_requests_are_400s_naming_the_field(server, body, param):
    resp = post(server, "/v1/responses", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_an_unknown_model_is_a_404(server):
    resp = requests.post(server.url + "/v1/responses", json={"model": "nope", "input": "hi"}, timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_a_too_long_input_is_a_400_unless_truncation_is_auto(client, server):
    long_input = "word " * (server.state.max_model_len + 10)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input=long_input, max_output_tokens=2)
    assert info.value.body["code"] == "context_length_exceeded"
    resp = client.responses.create(input=long_input, max_output_tokens=2, truncation="auto")
    assert resp.usage.input_tokens == server.state.max_model_len - 2 and resp.usage.output_tokens == 2


def test_the_engine_keeps_serving_after_bad_requests(client, offline):
    for body in ({"input": []}, {"input": "hi", "max_output_tokens": -3}):
        with pytest.raises(openai.BadRequestError):
            client.responses.create(**body)
    resp = client.responses.create(input=QUESTION, max_output_tokens=3, temperature=0)
    assert resp.output_text == greedy(offline, [{"role": "user", "content": QUESTION}], 3).text

