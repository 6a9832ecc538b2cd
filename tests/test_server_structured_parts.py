"""The server's mapping of OpenAI's and vLLM's constraint and tool fields (no server needed)."""

from __future__ import annotations

import json

import pytest

from aserve.server.errors import APIError
from aserve.server.structured_request import structured_outputs_from
from aserve.server.tool_calls import calls_from_output, choice_stream, plan_tools, response_message
from aserve.server.tool_parsers import HermesToolParser

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_each_field_gives_its_constraint():
    assert structured_outputs_from() is None
    assert structured_outputs_from(response_format={"type": "text"}) is None
    assert structured_outputs_from(response_format={"type": "json_object"}).kind == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    got = structured_outputs_from(response_format={"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert got.kind == "json" and json.loads(got.spec) == schema
    assert structured_outputs_from(guided_json=json.dumps(schema)).kind == "json"
    assert structured_outputs_from(guided_regex="a+").kind == "regex"
    assert structured_outputs_from(guided_choice=["a", "b"]).choice == ["a", "b"]
    assert structured_outputs_from(guided_grammar='start: "x"').kind == "grammar"
    assert structured_outputs_from(structured_outputs={"choice": ["y"]}).kind == "choice"


@pytest.mark.parametrize("fields, param", [
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (dict(guided_regex="a", guided_choice=["a"]), "guided_regex"),
    (dict(guided_choice=[]), "guided_choice"),
    (dict(structured_outputs={"regex": "a", "json": {}}), "structured_outputs"),
    (dict(guided_whitespace_pattern=" "), "guided_whitespace_pattern"),
    (dict(guided_regex="a", guided_decoding_backend="xgrammar"), "guided_decoding_backend"),
    (dict(response_format={"type": "structural_tag"}), "response_format"),
])
def test_bad_constraint_fields_are_400s_naming_them(fields, param):
    with pytest.raises(APIError) as info:
        structured_outputs_from(**fields)
    assert info.value.status == 400 and info.value.param == param


def test_tool_choice_plans():
    assert plan_tools(None, None, None).mode == "none"
    assert plan_tools([WEATHER], "none", None).mode == "none"
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named.mode == "named" and json.loads(named.constraint.spec)["required"] == ["city"]
    required = plan_tools([WEATHER, TIME], "required", None)
    assert required.mode == "required" and json.loads(required.constraint.spec)["type"] == "array"
    assert plan_tools([WEATHER], None, "hermes").mode == "auto"     # OpenAI's default with tools
    assert plan_tools([WEATHER], "none", None).template_tools()[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("tools, choice, message", [
    ([WEATHER], None, "enable-auto-tool-choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    (None, "required", "needs tools"),
    ([WEATHER, WEATHER], "none", "unique"),
    ([{"type": "retrieval"}], "none", "tools\\[0\\]"),
    ([WEATHER], "sometimes", "tool_choice must be"),
])
def test_bad_tool_fields_are_400s(tools, choice, message):
    with pytest.raises(APIError, match=message):
        plan_tools(tools, choice, None)


def test_outputs_become_calls():
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)
    content, calls = calls_from_output(named, '{"city": "Paris"}')
    assert content == "" and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("chatcmpl-tool-")
    required = plan_tools([WEATHER, TIME], "required", None)
    _, calls = calls_from_output(required, '[{"name": "get_time", "parameters": {}}, '
                                           '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert [c.name for c in calls] == ["get_time", "get_weather"] and json.loads(calls[1].arguments) == {"city": "Oslo"}


def test_hermes_parser():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = HermesToolParser().extract(text)
    assert content == "Let me check.\n" and calls[0].name == "get_weather"   # vLLM keeps it unstripped
    assert json.loads(calls[0].arguments) == {"city": "Rome"}
    assert HermesToolParser().extract("no calls here") == ("no calls here", [])
    assert HermesToolParser().extract("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    # a last block the output ended inside still counts when its JSON is whole
    content, calls = HermesToolParser().extract('<tool_call>{"name": "get_time", "arguments": {}}')
    assert content is None and [c.name for c in calls] == ["get_time"]


def _stream(parser, text: str, size: int):
    """Feed text in pieces of size characters; (content, {index: [name, arguments]}, headers seen)."""
    content, calls = "", {}
    deltas = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    for delta in deltas:
        content += delta.content
        for fragment in delta.tool_calls:
            if "id" in fragment:
                assert fragment["id"].startswith("chatcmpl-tool-") and fragment["type"] == "function"
                assert fragment["index"] not in calls
                calls[fragment["index"]] = [fragment["function"]["name"], fragment["function"]["arguments"]]
            else:
                assert set(fragment) == {"index", "function"}
                calls[fragment["index"]][1] += fragment["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_hermes_stream_sends_content_then_calls_whatever_the_chunking(size):
    text = ('Sure <tool_c: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    parser = HermesToolParser()
    content, calls = _stream(parser, text, size)
    assert content == "Sure <tool_c: " and parser.called
    assert [c[0] for c in calls.values()] == ["get_weather", "get_time"]
    assert json.loads(calls[0][1]) == {"city": "Rome"} and json.loads(calls[1][1]) == {}
    content, calls = _stream(HermesToolParser(), "plain text < not a tag", size)
    assert content == "plain text < not a tag" and calls == {}


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_required_stream_sends_each_call_with_its_arguments(size):
    plan = plan_tools([WEATHER, TIME], "required", None)
    text = ('[ {"name": "get_weather", "parameters": {"city": "Rome \\"}{, ]\\\\"}},\n'
            ' {"parameters" : {}, "name":"get_time"} ]')
    stream = choice_stream(plan)
    _, calls = _stream(stream, text, size)
    assert stream.called and [c[0] for c in calls.values()] == ["get_weather", "get_time"]
    assert json.loads(calls[0][1]) == {"city": 'Rome "}{, ]\\'} and json.loads(calls[1][1]) == {}


def test_named_stream_is_one_call_of_the_whole_text():
    plan = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)
    stream = choice_stream(plan)
    _, calls = _stream(stream, '{"city": "Oslo"}', 4)
    assert calls == {0: ["get_weather", '{"city": "Oslo"}']}
    assert choice_stream(plan_tools([WEATHER], "none", None)) is None


def test_finish_reasons_of_calls():
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert response_message(named, '{"city": "Oslo"}', "stop")[2] == "stop"   # as OpenAI, for a named call
    assert response_message(named, '{"city": "Os', "length")[2] == "length"
    required = plan_tools([WEATHER], "required", None)
    called = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    assert response_message(required, called, "stop")[2] == "tool_calls"
    assert response_message(plan_tools([WEATHER], "none", None), "hi", "stop") == ("hi", [], "stop")


def test_constraint_and_forced_tool_call_do_not_mix():
    class Request:
        guided_regex = "a"

    from aserve.server.structured_request import request_constraint
    forced = plan_tools([WEATHER], "required", None).constraint
    with pytest.raises(APIError, match="cannot be combined") as info:
        request_constraint(Request(), forced)
    assert info.value.param == "guided_regex"
    assert request_constraint(object(), forced) is forced


def test_history_tool_calls_reach_the_template_with_object_arguments():
    from aserve.server.protocol import ChatCompletionRequest
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]})
    conversation = req.conversation()
    assert conversation[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert conversation[2]["tool_call_id"] == "c1" and conversation[2]["content"] == "sunny"


def test_required_schema_lifts_each_tools_defs_to_the_top():
    point = {"type": "object", "properties": {"x": {"type": "integer"}}}
    tool = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": point}}}}
    schema = json.loads(plan_tools([tool, TIME], "required", None).constraint.spec)
    assert schema["$defs"] == {"Point": point}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    other = {"type": "function", "function": {"name": "jump", "parameters": {"$defs": {"Point": {"type": "string"}}}}}
    with pytest.raises(APIError, match="differs"):
        plan_tools([tool, other], "required", None)
