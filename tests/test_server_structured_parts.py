"""The server's mapping of OpenAI's and vLLM's constraint and tool fields (no server needed)."""

from __future__ import annotations

import json

import pytest

from aserve.server.errors import APIError
from aserve.server.structured_request import structured_outputs_from
from aserve.server.tool_calls import calls_from_output, parse_hermes, plan_tools

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
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("chatcmpl-tool-")
    required = plan_tools([WEATHER, TIME], "required", None)
    _, calls = calls_from_output(required, '[{"name": "get_time", "parameters": {}}, '
                                           '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert [c.name for c in calls] == ["get_time", "get_weather"] and json.loads(calls[1].arguments) == {"city": "Oslo"}


def test_hermes_parser():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = parse_hermes(text)
    assert content == "Let me check." and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Rome"}
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
