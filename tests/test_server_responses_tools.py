"""/v1/responses with constraints and function tools, through a real server with a Hermes-style
chat template, on the built-in random model: its free text never parses, so every parsed call
or JSON here is the grammar's doing. Function calls and their outputs come back as input items
and reach the template as the chat route gives them."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server_fixtures import ServerThread
from tests.test_server_structured_outputs import PERSON, SCHEMAS, TEMPLATE, TOOLS, jsonschema

# The same tools in the Responses API's flat shape.
FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def server():
    with ServerThread(chat_template=TEMPLATE, tool_call_parser="hermes") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client(timeout=120)


def rendered_length(server, messages, tools=None) -> int:
    tokenizer = server.async_engine.engine.tokenizer
    text = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, tools=tools, tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def check_call(item, name=None) -> None:
    assert item.type == "function_call" and item.status == "completed"
    assert item.call_id.startswith("call_") and item.id.startswith("fc_")
    assert name is None or item.name == name
    jsonschema.validate(json.loads(item.arguments), SCHEMAS[item.name])


def test_text_format_json_schema_gives_valid_json(client):
    resp = client.responses.create(input="A person, please.", max_output_tokens=400, extra_body={"seed": 3},
                                   text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                    "strict": True}})
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), PERSON)
    assert resp.text.format.type == "json_schema"


def test_text_format_json_object_gives_an_object(client):
    # The random model closes its object within 200 tokens about half the time (as on the
    # chat route): of six seeds, some finish, and every one is a prefix the grammar allowed.
    finished = 0
    for seed in range(6):
        resp = client.responses.create(input="Some JSON, please.", max_output_tokens=200,
                                       text={"format": {"type": "json_object"}}, extra_body={"seed": seed})
        if resp.status == "completed":
            finished += 1
            assert isinstance(json.loads(resp.output_text), dict)
        else:
            assert resp.incomplete_details.reason == "max_output_tokens"
            assert resp.output_text.lstrip().startswith("{")
    assert finished


def test_the_clients_parse_and_stream_helpers_get_their_pydantic_model(client, server):
    """The openai client's responses.parse and responses.stream(text_format=...): the schema
    goes out as text.format, the answer comes back parsed (the stream helper also checks
    that the events arrive in a valid order)."""
    from typing import Literal

    from pydantic import BaseModel

    class Weather(BaseModel):
        sky: Literal["clear", "cloudy"]
        degrees: int

    parsed = client.responses.parse(model=server.model_name, input=QUESTION, text_format=Weather,
                                    max_output_tokens=100)
    assert isinstance(parsed.output_parsed, Weather) and parsed.status == "completed"
    with client.responses.stream(model=server.model_name, input=QUESTION, text_format=Weather,
                                 max_output_tokens=100) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Weather)


def test_named_tool_choice_gives_a_function_call_item(client):
    resp = client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=300, extra_body={"seed": 10},
                                   tool_choice={"type": "function", "name": "get_weather"})
    item, = resp.output   # the call alone: a forced call has no message text
    check_call(item, "get_weather")
    assert resp.status == "completed" and resp.tools[0].name == "get_weather"


def test_required_tool_choice_gives_calls(client):
    resp = client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=600, extra_body={"seed": 11},
                                   tool_choice="required")
    # The random model may go on adding calls until max_output_tokens: then its text comes back.
    if resp.status == "incomplete":
        assert resp.output_text.lstrip().startswith("[")
        return
    assert resp.output and all(item.type == "function_call" for item in resp.output)
    for item in resp.output:
        check_call(item)


def test_a_streamed_call_sends_its_arguments_as_they_come(client):
    events = list(client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=300,
                                          extra_body={"seed": 12}, stream=True,
                                          tool_choice={"type": "function", "name": "get_weather"}))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added"] + [
        "response.function_call_arguments.delta"] * len(deltas) + [
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert len(deltas) > 1   # piece by piece, as the grammar-forced text arrives
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added, done, item_done, completed = events[2], events[-3], events[-2], events[-1]
    assert added.item.arguments == "" and added.item.status == "in_progress"
    assert "".join(d.delta for d in deltas) == done.arguments == item_done.item.arguments
    assert done.name == "get_weather" and all(d.item_id == added.item.id == item_done.item.id for d in deltas)
    check_call(completed.response.output[0], "get_weather")
    assert completed.response.output[0].id == added.item.id


def test_the_clients_stream_helper_assembles_a_streamed_call(client, server):
    with client.responses.stream(model=server.model_name, input=QUESTION, tools=FLAT_TOOLS,
                                 max_output_tokens=300, extra_body={"seed": 12},
                                 tool_choice={"type": "function", "name": "get_weather"}) as stream:
        final = stream.get_final_response()
    check_call(final.output[0], "get_weather")


def test_required_calls_stream_one_item_after_another(client):
    plain = client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=600,
                                    extra_body={"seed": 11}, tool_choice="required")
    events = list(client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=600,
                                          extra_body={"seed": 11}, tool_choice="required", stream=True))
    final = events[-1].response
    # The same calls (the stream sends the arguments' text as written, with its whitespace).
    assert [(i.name, json.loads(i.arguments)) for i in final.output if i.type == "function_call"] == [
        (i.name, json.loads(i.arguments)) for i in plain.output if i.type == "function_call"]
    # Items open and close in turn: each added comes after the previous one's done.
    opened = [e.output_index for e in events if e.type == "response.output_item.added"]
    closed = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert opened == closed == list(range(len(final.output)))
    order = [(e.type, e.output_index) for e in events if e.type.startswith("response.output_item")]
    assert order == [(kind, i) for i in opened for kind in ("response.output_item.added",
                                                            "response.output_item.done")]


def test_calls_and_their_outputs_reach_the_template(client, server):
    first = client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=300, extra_body={"seed": 10},
                                    tool_choice={"type": "function", "name": "get_weather"})
    call, = first.output
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    chained = client.responses.create(previous_response_id=first.id, input=[answer], tools=FLAT_TOOLS,
                                      tool_choice="none", max_output_tokens=2)
    # The same turn sent whole, as input items: the same prompt.
    whole = client.responses.create(
        input=[{"role": "user", "content": QUESTION},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               answer], tools=FLAT_TOOLS, tool_choice="none", max_output_tokens=2)
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "", "tool_calls": [{
                    "id": call.call_id, "type": "function",
                    "function": {"name": call.name, "arguments": json.loads(call.arguments)}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"}]
    expected = rendered_length(server, messages, tools=TOOLS)
    assert chained.usage.input_tokens == whole.usage.input_tokens == expected


def test_auto_tool_choice_answers_text_when_no_call_is_written(client):
    resp = client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=8, extra_body={"seed": 13})
    assert resp.output[0].type == "message" and resp.output_text and resp.tool_choice == "auto"


def test_auto_tool_choice_streams_its_text_as_a_message(client):
    plain = client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=8, temperature=0)
    events = list(client.responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=8, temperature=0,
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    assert [i.type for i in events[-1].response.output] == ["message"]


def test_auto_tool_choice_without_the_flags_is_a_400():
    with ServerThread() as srv:
        with pytest.raises(openai.BadRequestError) as info:
            srv.openai_client().responses.create(input=QUESTION, tools=FLAT_TOOLS, max_output_tokens=2)
    assert info.value.body["param"] == "tool_choice"


def test_a_format_and_a_forced_call_together_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input=QUESTION, tools=FLAT_TOOLS, tool_choice="required", max_output_tokens=2,
                                text={"format": {"type": "json_object"}})
    assert info.value.body["param"] == "text"
