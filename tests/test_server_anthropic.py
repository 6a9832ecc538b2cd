"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) through a real server on
loopback, with the official `anthropic` client: greedy text equals OfflineLLM's on the same
chat prompt, streamed or not; stop reasons; tool use through a Hermes-style template; errors
in Anthropic's shape; the key as x-api-key."""

from __future__ import annotations

import json

import anthropic
import pytest
import requests

from aserve import OfflineLLM, SamplingParams
from server_fixtures import TEST_NUM_BLOCKS, ServerThread
from tests.test_server_structured_outputs import SCHEMAS, TEMPLATE, TOOLS, jsonschema

SYSTEM = "Be terse."
MESSAGES = [{"role": "user", "content": "Hello there!"}]
GREEDY = {"temperature": 0}   # this client has no temperature argument: sent as an extra field
# The same tools in Anthropic's shape.
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]


@pytest.fixture(scope="module")
def server():
    with ServerThread() as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline():
    return OfflineLLM(model=None, num_gpu_blocks_override=TEST_NUM_BLOCKS, device="cpu")


def rendered(tokenizer, messages, template=None, tools=None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tools=tools, add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def greedy(offline, messages, max_tokens: int):
    ids = rendered(offline.get_tokenizer(), messages)
    return offline.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0].outputs[0]


def test_a_message_equals_offline_chat(client, server, offline):
    msg = client.messages.create(model=server.model_name, max_tokens=10, system=SYSTEM, messages=MESSAGES,
                                 extra_body=GREEDY)
    chat = [{"role": "system", "content": SYSTEM}] + MESSAGES
    expected = greedy(offline, chat, 10)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    (block,) = msg.content
    assert block.type == "text" and block.text == expected.text
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert msg.usage.input_tokens == len(rendered(offline.get_tokenizer(), chat))
    assert msg.usage.output_tokens == 10


def test_a_streamed_message_equals_the_plain_one(client, server):
    plain = client.messages.create(model=server.model_name, max_tokens=12, system=SYSTEM, messages=MESSAGES,
                                   extra_body=GREEDY)
    with client.messages.stream(model=server.model_name, max_tokens=12, system=SYSTEM, messages=MESSAGES,
                                extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12


def test_a_stop_sequence_is_reported(client, server):
    msg = client.messages.create(model=server.model_name, max_tokens=200, messages=MESSAGES, stop_sequences=[" "],
                                 extra_body=GREEDY)
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == " "
    assert " " not in msg.content[0].text


def test_count_tokens_counts_the_rendered_prompt(client, server):
    count = client.messages.count_tokens(model=server.model_name, system=SYSTEM, messages=MESSAGES)
    msg = client.messages.create(model=server.model_name, max_tokens=1, system=SYSTEM, messages=MESSAGES)
    assert count.input_tokens == msg.usage.input_tokens


def test_content_blocks_and_turns_render_as_chat(client, server, offline):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " you"}]},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                  {"type": "text", "text": "Hello"}]},
                {"role": "user", "content": "More"}]
    msg = client.messages.create(model=server.model_name, max_tokens=6, system=[{"type": "text", "text": SYSTEM}],
                                 messages=messages, extra_body=GREEDY)
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi you"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]
    assert msg.content[0].text == greedy(offline, chat, 6).text
    assert msg.usage.input_tokens == len(rendered(offline.get_tokenizer(), chat))


def test_system_messages_inside_messages_join_the_system_prompt(client, server):
    inside = client.messages.count_tokens(model=server.model_name, messages=[
        {"role": "system", "content": "Be "}, {"role": "system", "content": [{"type": "text", "text": "terse."}]},
        *MESSAGES])
    assert inside.input_tokens == client.messages.count_tokens(model=server.model_name, system=SYSTEM,
                                                               messages=MESSAGES).input_tokens


KWARGS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if reasoning_effort is defined %}(effort {{ reasoning_effort }}){% endif %}"
                   "{% if persona is defined %}(as {{ persona }}){% endif %}assistant:")


def test_chat_template_kwargs_and_effort_reach_the_template():
    """vLLM's extras on /v1/messages: chat_template_kwargs, and output_config.effort as the
    template's reasoning_effort (the request's own kwargs win)."""
    with ServerThread(chat_template=KWARGS_TEMPLATE) as srv:
        client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)

        def count(**extra) -> int:
            return client.messages.count_tokens(model=srv.model_name, messages=MESSAGES,
                                                extra_body=extra).input_tokens

        plain = count()
        assert count(chat_template_kwargs={"persona": "a pirate"}) > plain
        effort = count(output_config={"effort": "high"})
        assert effort > plain
        assert count(output_config={"effort": "high"}, chat_template_kwargs={"reasoning_effort": "low"}) != effort
        body = {"model": srv.model_name, "max_tokens": 1, "messages": MESSAGES, "output_config": {"effort": 3}}
        bad = requests.post(srv.url + "/v1/messages", json=body, timeout=30)
        assert bad.status_code == 400 and "output_config.effort" in bad.json()["error"]["message"]


def test_output_config_format_gives_valid_json(client, server):
    schema = {"type": "object", "properties": {"w": {"enum": ["x", "y"]}}, "required": ["w"],
              "additionalProperties": False}
    msg = client.messages.create(model=server.model_name, max_tokens=100, messages=MESSAGES,
                                 output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(msg.content[0].text)["w"] in ("x", "y") and msg.stop_reason == "end_turn"


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}], "max_tokens": 4}, "image"),
    ({"messages": [{"role": "robot", "content": "x"}], "max_tokens": 4}, "role"),
    ({"messages": MESSAGES}, "max_tokens"),
    ({"messages": [], "max_tokens": 4}, "at least one message"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 4, "tools": [{"type": "web_search_20250305", "name": "w"}]}, "tools"),
    ({"messages": MESSAGES, "max_tokens": 4, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"messages": MESSAGES, "max_tokens": 4, "output_config": {"format": {"type": "xml"}}}, "output_config"),
])
def test_bad_requests_are_400s_in_anthropics_shape(server, body, words):
    resp = requests.post(server.url + "/v1/messages", json={"model": server.model_name, **body}, timeout=30)
    assert resp.status_code == 400, resp.text
    answer = resp.json()
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert words in answer["error"]["message"]


def test_unparsable_json_and_unknown_models_answer_in_anthropics_shape(server, client):
    resp = requests.post(server.url + "/v1/messages", data=b"{nope", headers={"Content-Type": "application/json"},
                         timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=2, messages=MESSAGES)
    assert info.value.body["error"]["type"] == "not_found_error"


def test_the_key_may_come_as_x_api_key():
    with ServerThread(api_key="secret") as srv:
        ok = anthropic.Anthropic(base_url=srv.url, api_key="secret", max_retries=0)
        assert ok.messages.create(model=srv.model_name, max_tokens=2, messages=MESSAGES).usage.output_tokens == 2
        with pytest.raises(anthropic.AuthenticationError) as info:
            anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0).messages.create(
                model=srv.model_name, max_tokens=2, messages=MESSAGES)
        assert info.value.body["error"]["type"] == "authentication_error"
        # The OpenAI client's header works on Anthropic's route, and x-api-key on OpenAI's.
        bearer = requests.post(srv.url + "/v1/messages", headers={"Authorization": "Bearer secret"}, timeout=30,
                               json={"max_tokens": 2, "messages": MESSAGES})
        assert bearer.status_code == 200
        assert requests.get(srv.url + "/v1/models", headers={"x-api-key": "secret"}, timeout=30).status_code == 200


def test_a_disconnected_stream_frees_its_blocks(server):
    with requests.post(server.url + "/v1/messages", stream=True, timeout=60,
                       json={"messages": MESSAGES, "max_tokens": 2000, "stream": True, "ignore_eos": True}) as r:
        next(r.iter_lines())
    stats = server.wait_until(lambda s: s.num_running == 0 and s.num_used_blocks == 0)
    assert stats.num_running == 0 and stats.num_used_blocks == 0


# ----------------------------------------------------------------------------- tools
@pytest.fixture(scope="module")
def tool_server():
    with ServerThread(chat_template=TEMPLATE, tool_call_parser="hermes") as s:
        yield s


@pytest.fixture(scope="module")
def tool_client(tool_server):
    return anthropic.Anthropic(base_url=tool_server.url, api_key="unused", max_retries=0, timeout=120)


def test_a_forced_tool_gives_a_tool_use_block(tool_client):
    msg = tool_client.messages.create(model="", max_tokens=300, messages=MESSAGES, tools=ANTHROPIC_TOOLS,
                                      tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"seed": 10})
    (call,) = msg.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, SCHEMAS["get_weather"])
    assert msg.stop_reason == "tool_use"


def test_a_streamed_tool_use_arrives_piece_by_piece(tool_client):
    plain = tool_client.messages.create(model="", max_tokens=300, messages=MESSAGES, tools=ANTHROPIC_TOOLS,
                                        tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"seed": 10})
    with tool_client.messages.stream(model="", max_tokens=300, messages=MESSAGES, tools=ANTHROPIC_TOOLS,
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     extra_body={"seed": 10}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    pieces = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(pieces) > 1 and final.stop_reason == "tool_use"
    (block,) = final.content
    assert block.type == "tool_use" and block.input == plain.content[0].input
    jsonschema.validate(block.input, SCHEMAS["get_weather"])


def test_streamed_required_calls_come_one_block_after_another(tool_client):
    with tool_client.messages.stream(model="", max_tokens=600, messages=MESSAGES, tools=ANTHROPIC_TOOLS,
                                     tool_choice={"type": "any"}, extra_body={"seed": 11}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.index for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == stops == list(range(len(final.content)))
    if final.stop_reason == "tool_use":
        for block in final.content:
            assert block.type == "tool_use"
            jsonschema.validate(block.input, SCHEMAS[block.name])


def test_tool_use_and_tool_result_reach_the_template(tool_client, tool_server):
    messages = MESSAGES + [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris", "unit": "celsius", "days": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}]
    count = tool_client.messages.count_tokens(model="", messages=messages, tools=ANTHROPIC_TOOLS)
    chat = MESSAGES + [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [{
            "id": "toolu_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 1}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}]
    tokenizer = tool_server.async_engine.engine.tokenizer
    assert count.input_tokens == len(rendered(tokenizer, chat, TEMPLATE, TOOLS))
    msg = tool_client.messages.create(model="", max_tokens=2, messages=messages, tools=ANTHROPIC_TOOLS,
                                      tool_choice={"type": "none"})
    assert msg.usage.input_tokens == count.input_tokens and msg.content[0].type == "text"


def test_auto_tool_choice_without_the_flags_is_a_400(client, server):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=server.model_name, max_tokens=2, messages=MESSAGES, tools=ANTHROPIC_TOOLS)
    assert "enable-auto-tool-choice" in info.value.body["error"]["message"]
