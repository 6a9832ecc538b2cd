"""The tool-call parsers of --tool-call-parser (llama3_json, mistral, pythonic, qwen3_coder, granite,
phi4_mini_json, seed_oss;
hermes has its own tests in test_server_structured_parts.py): each format's calls, its content,
text that only looks like calls, and a stream cut anywhere giving what the whole text gives."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aserve.server.tool_parsers import PARSERS, calls_from_deltas


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict


TOOLS = [
    Tool("get_weather", {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "ratio": {"type": "number"}, "tags": {"type": "array"}, "where": {"type": "object"},
        "maybe": {"type": ["string", "null"]}}}),
    Tool("get_time", {"type": "object", "properties": {}}),
]


def extract(parser: str, text: str):
    content, calls = PARSERS[parser](TOOLS).extract(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def stream(parser: str, pieces: list[str]):
    p = PARSERS[parser](TOOLS)
    content, deltas = "", []
    for piece in pieces:
        d = p.feed(piece)
        content, deltas = content + d.content, deltas + d.tool_calls
    d = p.finish()
    content, deltas = content + d.content, deltas + d.tool_calls
    return content, [(c.name, json.loads(c.arguments)) for c in calls_from_deltas(deltas)], deltas


# (parser, text, expected content, expected calls)
CASES = [
    # llama3_json
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    ("llama3_json", '\n {"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": '
                    '{"city": "Oslo", "days": 2}}', None,
     [("get_time", {}), ("get_weather", {"city": "Oslo", "days": 2})]),
    ("llama3_json", 'Use {"a": 1} in code.', 'Use {"a": 1} in code.', []),            # a later { is text
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),                          # JSON, not a call
    ("llama3_json", '{"name": "get_time", "parameters": {', '{"name": "get_time", "parameters": {', []),
    ("llama3_json", "plain answer", "plain answer", []),
    # mistral: v0.3's JSON array, and the v11 tokenizers' name[ARGS]{...}
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, '
                '{"name": "get_time", "arguments": {}}]', None,
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ("mistral", 'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{}',
     "Let me check.", [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ("mistral", '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}', None, [("get_time", {})]),
    ("mistral", '[TOOL_CALLS]get_weather{"city": "Rome"}', None, [("get_weather", {"city": "Rome"})]),
    ("mistral", "[TOOL_CALLS] not json", "[TOOL_CALLS] not json", []),
    ("mistral", "no calls [TOOL_", "no calls [TOOL_", []),
    # pythonic
    ("pythonic", '[get_weather(city="Paris", days=3, tags=["a", "b"], where={"x": 1.5}), get_time()]', None,
     [("get_weather", {"city": "Paris", "days": 3, "tags": ["a", "b"], "where": {"x": 1.5}}), ("get_time", {})]),
    ("pythonic", "<|python_start|>[get_time()]<|python_end|>", None, [("get_time", {})]),
    ("pythonic", "[1, 2, 3]", "[1, 2, 3]", []),
    ("pythonic", "[get_weather(city=somewhere)]", "[get_weather(city=somewhere)]", []),   # not a literal
    ("pythonic", "[get_weather(metric=true)]", "[get_weather(metric=true)]", []),   # JSON's true: olmo3's only
    ("pythonic", "See [get_time()] above", "See [get_time()] above", []),
    ("pythonic", "[get_time(", "[get_time(", []),
    # qwen3_coder: values typed by the tool's schema
    ("qwen3_coder", "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n"
                    "<parameter=ratio>\n0.5\n</parameter>\n<parameter=tags>\n[\"a\"]\n</parameter>\n"
                    "<parameter=where>\n{'lat': 1}\n</parameter>\n<parameter=maybe>\nnull\n</parameter>\n"
                    "<parameter=extra>\n42\n</parameter>\n</function>\n</tool_call>",
     "I'll look.\n", [("get_weather", {"city": "New York", "days": 3, "metric": True, "ratio": 0.5, "tags": ["a"],
                                       "where": {"lat": 1}, "maybe": "null", "extra": "42"})]),
    ("qwen3_coder", "<tool_call>\n<function=get_time>\n</function>\n</tool_call>\n<tool_call>\n"
                    "<function=get_weather>\n<parameter=city>\n  two lines\nhere \n</parameter>\n</function>\n</tool_call>",
     None, [("get_time", {}), ("get_weather", {"city": "  two lines\nhere "})]),
    ("qwen3_coder", "<function=get_weather>\n<parameter=days>\nmany\n</parameter>\n</function>", None,
     [("get_weather", {"days": "many"})]),                      # not an integer: kept as text
    # cut off by max_tokens inside the call: what is there counts, as in vLLM
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nLima", None,
     [("get_weather", {"city": "Lima"})]),
    ("qwen3_coder", "a <b> c", "a <b> c", []),
    ("qwen3_coder", "ends on a tag <tool_call>\n", "ends on a tag <tool_call>\n", []),
    ("qwen3_coder", "<function=get_weather>\n<parameter=ratio>\nnan\n</parameter>\n</function>", None,
     [("get_weather", {"ratio": "nan"})]),                      # JSON has no nan: kept as text
    # granite: a JSON array opening the answer, after <|tool_call|> (3.0) or <tool_call> (3.1+)
    ("granite", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                '{"name": "get_time", "arguments": {}}]', None, [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ("granite", ' <tool_call> [{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),
    ("granite", '[{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),
    ("granite", 'Later: [{"name": "get_time", "arguments": {}}]', 'Later: [{"name": "get_time", "arguments": {}}]',
     []),                                                       # only at the start, as vLLM's
    ("granite", "[1, 2]", "[1, 2]", []),
    ("granite", "<|tool_call|>[{", "<|tool_call|>[{", []),      # cut off: text
    # phi4_mini_json: functools[...] anywhere, the text before it the content
    ("phi4_mini_json", 'Checking. functools[{"name": "get_weather", "arguments": {"city": "Lima", "days": 1}}]',
     "Checking. ", [("get_weather", {"city": "Lima", "days": 1})]),
    ("phi4_mini_json", "no functools here", "no functools here", []),
    # seed_oss: Qwen3-Coder's calls inside <seed:tool_call>
    ("seed_oss", "Let me see.<seed:tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n"
                 "</function>\n</seed:tool_call>", "Let me see.", [("get_weather", {"days": 2})]),
    # olmo3: one Python call a line inside <function_calls>, JSON's null/true/false taken
    ("olmo3", '<function_calls>\nget_weather(city="Oslo", metric=true, maybe=null)\nget_time()\n</function_calls>',
     None, [("get_weather", {"city": "Oslo", "metric": True, "maybe": None}), ("get_time", {})]),
    ("olmo3", "Sure. <function_calls>\nget_time()\n</function_calls>", "Sure. <function_calls>\nget_time()\n"
     "</function_calls>", []),                                  # only at the start, as vLLM's stream
    ("olmo3", "<function_calls>\nnot a call\n</function_calls>", "<function_calls>\nnot a call\n"
     "</function_calls>", []),
    ("olmo3", '<function_calls>\nget_weather(city="Lima")', None, [("get_weather", {"city": "Lima"})]),   # cut off
    # Nested past what Python's parser takes: text, not a crash.
    ("pythonic", "[get_time(x=" + "[" * 400 + "]" * 400 + ")]", "[get_time(x=" + "[" * 400 + "]" * 400 + ")]", []),
]


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_extract(parser, text, content, calls):
    assert extract(parser, text) == (content, calls)


@pytest.mark.parametrize("parser,text,content,calls", CASES)
@given(cuts=st.lists(st.integers(0, 400), max_size=12))
@settings(max_examples=40, deadline=None)
def test_a_stream_cut_anywhere_gives_the_whole_texts_answer(parser, text, content, calls, cuts):
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0] + points, points + [len(text)])]
    streamed_content, streamed_calls, _ = stream(parser, pieces)
    assert streamed_calls == calls
    # Whitespace before the calls streams as it comes; the whole text's answer drops it.
    assert (streamed_content if streamed_content.strip() else None) == (content if calls else text or None)


def test_content_streams_before_the_calls_and_each_call_goes_out_whole():
    p = PARSERS["mistral"](TOOLS)
    assert p.feed("Checking the weather").content == "Checking the weather"
    assert p.feed(" now.[TOOL").content == " now."                  # a marker's start is held back
    first = p.feed('_CALLS]get_weather[ARGS]{"city": "Ro')
    assert first.content == "" and first.tool_calls == []            # not whole yet
    second = p.feed('me"}[TOOL_CALLS]get_time[ARGS]')
    header, arguments = second.tool_calls
    assert header["function"]["name"] == "get_weather" and arguments["function"]["arguments"] == '{"city": "Rome"}'
    assert [d["function"]["name"] for d in p.feed("{}").tool_calls if "id" in d] == ["get_time"]
    assert p.finish().tool_calls == []
    assert p.called


def test_mistral_ids_are_nine_letters_and_digits_and_its_marker_keeps_special_tokens():
    _, calls = PARSERS["mistral"](TOOLS).extract('[TOOL_CALLS]get_time[ARGS]{}')
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    assert PARSERS["mistral"].keeps_special_tokens
    assert not PARSERS["hermes"].keeps_special_tokens and not PARSERS["llama3_json"].keeps_special_tokens


def test_llama3_waits_through_leading_whitespace_before_deciding():
    p = PARSERS["llama3_json"](TOOLS)
    assert p.feed("\n").content == ""                  # a `{` may still come: held
    assert p.feed('{"name": "get_time"').content == "\n"
    done = p.feed(', "parameters": {}}')
    assert [d["function"]["name"] for d in done.tool_calls if "id" in d] == ["get_time"]


def test_every_vllm_parser_name_is_offered():
    assert {"hermes", "llama3_json", "llama4_json", "mistral", "pythonic", "llama4_pythonic",
            "qwen3_coder", "qwen3_xml", "granite", "phi4_mini_json", "seed_oss", "olmo3"} <= set(PARSERS)


def test_a_mistral_auto_request_keeps_special_tokens_and_others_do_not():
    from aserve.sampling_params import SamplingParams
    from aserve.server.tool_calls import keep_special_tokens_for_parser, plan_tools

    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    for parser, mode, kept in [("mistral", "auto", True), ("hermes", "auto", False), ("mistral", "none", False)]:
        params = SamplingParams()
        keep_special_tokens_for_parser(plan_tools(tools, mode, parser), params)
        assert params.skip_special_tokens is not kept
