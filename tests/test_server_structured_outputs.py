"""Structured outputs and tool calling through a real server on loopback, with the official
openai client, on the built-in random model: its free text never parses, so every parse here
is the grammar's doing."""

from __future__ import annotations

import concurrent.futures
import json
import re

import openai
import pytest
import requests

# The GPU machine's image has no jsonschema; the CPU test command installs it.
jsonschema = pytest.importorskip("jsonschema")

from tests.server_fixtures import ServerThread

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "score", "role", "tags", "address"],
    "additionalProperties": False,
}
WEATHER_PARAMS = {"type": "object",
                  "properties": {"city": {"type": "string", "maxLength": 8},
                                 "unit": {"enum": ["celsius", "fahrenheit"]},
                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                      "parameters": {"type": "object", "properties": {},
                                                     "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# A Hermes-style template: tools, earlier calls (whose arguments must arrive as objects) and
# tool answers all reach it.
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call: {% for t in tools %}{{ t.function.name }} "
    "{{ t.function.parameters | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- for c in m.tool_calls or [] %}{% if c.function.arguments is not mapping %}"
    "{{ raise_exception('arguments must reach the template as an object') }}{% endif %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{%- endfor %}{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    with ServerThread(chat_template=TEMPLATE, tool_call_parser="hermes") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client(timeout=120)


def _post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.url + path, json={"model": server.model_name, **body}, timeout=120)


# ----------------------------------------------------------------------------- response_format
def test_response_format_json_schema_with_the_openai_client(client, server):
    response = client.chat.completions.create(
        model=server.model_name, messages=USER, max_tokens=400, seed=1, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                "strict": True}})
    assert len(response.choices) == 2
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_response_format_json_object_on_completions(client, server):
    # Each choice of the random model closes its object within 200 tokens about half the time:
    # six of them make "none did" unlikely under any noise the sampler draws.
    response = client.completions.create(model=server.model_name, prompt="Some JSON:", max_tokens=200,
                                         seed=2, n=6, extra_body={"response_format": {"type": "json_object"}})
    for choice in response.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
        else:   # cut off: what came out is still a prefix the grammar allowed
            assert choice.finish_reason == "length" and choice.text.lstrip().startswith("{")
    assert any(c.finish_reason == "stop" for c in response.choices)


def test_response_format_text_is_free_text(client, server):
    response = client.chat.completions.create(model=server.model_name, messages=USER, max_tokens=5,
                                              response_format={"type": "text"})
    assert response.choices[0].message.content


# ----------------------------------------------------------------------------- vLLM's fields
def test_guided_regex_choice_and_grammar(client, server):
    regex = r"[a-z]{3}-[0-9]{2,4}"
    out = client.completions.create(model=server.model_name, prompt="A code:", max_tokens=30, seed=3, n=3,
                                    extra_body={"guided_regex": regex})
    assert all(re.fullmatch(regex, c.text) for c in out.choices), [c.text for c in out.choices]
    choices = ["yes", "no", "maybe so"]
    out = client.chat.completions.create(model=server.model_name, messages=USER, max_tokens=10, seed=4,
                                         n=4, extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in out.choices)
    gbnf = 'root ::= "SELECT " col " FROM " table\ncol ::= "id" | "name"\ntable ::= "users" | "t" [0-9]\n'
    out = client.completions.create(model=server.model_name, prompt="SQL:", max_tokens=20, seed=5, n=3,
                                    extra_body={"guided_grammar": gbnf})
    assert all(re.fullmatch(r"SELECT (id|name) FROM (users|t[0-9])", c.text) for c in out.choices)
    grammar = 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: "+" | "*"\nNUM: /[0-9]{1,2}/\n'
    out = client.completions.create(model=server.model_name, prompt="Sum:", max_tokens=60, seed=5, n=3,
                                    extra_body={"guided_grammar": grammar})
    for c in out.choices:
        if c.finish_reason == "stop":
            assert re.fullmatch(r"[0-9()+*]+", c.text) and c.text.count("(") == c.text.count(")"), c.text
    assert any(c.finish_reason == "stop" for c in out.choices)


def test_structured_outputs_object_and_guided_json(server):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4}
    for extra in ({"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
                  {"guided_json": json.dumps(schema)}):
        body = _post(server, "/v1/completions", {"prompt": "Numbers:", "max_tokens": 80, "seed": 6, **extra})
        assert body.status_code == 200, body.text
        choice = body.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["text"]), schema)
    body = _post(server, "/v1/completions", {"prompt": "Numbers:", "max_tokens": 80, "seed": 6,
                                             "structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    assert json.loads(body.json()["choices"][0]["text"]) is not None   # compact JSON: it finishes


def test_the_own_backend_may_be_named_and_fallback_declined(server):
    for extra in ({"guided_choice": ["a", "b"], "guided_decoding_backend": "guidance"},
                  {"structured_outputs": {"choice": ["a", "b"], "disable_fallback": True}}):
        response = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5, **extra})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] in ("a", "b"), response.text


def test_streamed_deltas_concatenate_to_valid_output(client, server):
    stream = client.chat.completions.create(
        model=server.model_name, messages=USER, max_tokens=400, seed=7, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    text, finish = "", None
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    stream = client.completions.create(model=server.model_name, prompt="x", max_tokens=30, seed=8, n=2,
                                       stream=True, extra_body={"guided_regex": r"\d{4}-\d{2}-\d{2}"})
    texts = {0: "", 1: ""}
    for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", t) for t in texts.values()), texts


def test_max_tokens_cuts_a_constrained_output_with_finish_reason_length(client, server):
    response = client.chat.completions.create(
        model=server.model_name, messages=USER, max_tokens=3, seed=9,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith("{")
    assert response.usage.completion_tokens == 3


# ----------------------------------------------------------------------------- tools
def _check_call(call, name=None):
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_choice_gives_a_parsed_call(client, server):
    response = client.chat.completions.create(
        model=server.model_name, messages=USER, tools=TOOLS, max_tokens=300, seed=10, n=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in response.choices:
        # A named call ends with "stop", as OpenAI and vLLM answer ("tool_calls" is for auto/required).
        assert choice.finish_reason == "stop" and choice.message.content == ""   # vLLM's content
        (call,) = choice.message.tool_calls
        _check_call(call, "get_weather")


def test_required_tool_choice_gives_parsed_calls(client, server):
    # The random model may go on adding calls to the array (no maximum, as in vLLM) until
    # max_tokens: such a choice is cut off ("length") with no calls and empty content, as vLLM.
    response = client.chat.completions.create(model=server.model_name, messages=USER, tools=TOOLS,
                                              max_tokens=600, seed=11, n=3, tool_choice="required")
    finished = [c for c in response.choices if c.finish_reason == "tool_calls"]
    assert finished
    for choice in response.choices:
        if choice.finish_reason == "length":
            assert choice.message.content == "" and not choice.message.tool_calls
            continue
        assert choice.message.tool_calls and not choice.message.content
        for call in choice.message.tool_calls:
            _check_call(call)
        assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)


def test_a_required_call_cut_off_by_max_tokens_has_no_calls_and_empty_content(client, server):
    """vLLM's test_max_tokens_with_tool_choice_required, with one token."""
    response = client.chat.completions.create(model=server.model_name, messages=USER, tools=TOOLS,
                                              max_completion_tokens=1, temperature=0, tool_choice="required")
    choice = response.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls and choice.message.content == ""


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_streamed_tool_call_deltas(client, server, tool_choice):
    stream = client.chat.completions.create(model=server.model_name, messages=USER, tools=TOOLS, max_tokens=400,
                                            seed=12, stream=True, tool_choice=tool_choice)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content
        for fragment in delta.tool_calls or []:
            if fragment.index not in calls:   # the first fragment: id, type and name
                assert fragment.id.startswith("chatcmpl-tool-") and fragment.type == "function"
                assert fragment.function.name
                calls[fragment.index] = {"name": fragment.function.name, "arguments": ""}
            else:                             # later ones: argument text only
                assert fragment.id is None and fragment.function.name is None
            calls[fragment.index]["arguments"] += fragment.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == ("tool_calls" if tool_choice == "required" else "stop") and calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_tools_reach_the_template_and_history_with_calls_is_accepted(client, server):
    plain = client.chat.completions.create(model=server.model_name, messages=USER, max_tokens=1)
    with_tools = client.chat.completions.create(model=server.model_name, messages=USER, max_tokens=1,
                                                tools=TOOLS, tool_choice="none")
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert with_tools.choices[0].message.tool_calls in (None, [])
    history = USER + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(model=server.model_name, messages=history, tools=TOOLS,
                                            tool_choice="none", max_tokens=1)
    assert answer.usage.prompt_tokens > with_tools.usage.prompt_tokens + 10


def test_auto_tool_choice_parses_hermes_calls_or_answers_text(client, server):
    # The random model writes no <tool_call> blocks: "auto" answers with its text.
    response = client.chat.completions.create(model=server.model_name, messages=USER, tools=TOOLS,
                                              max_tokens=8, seed=13)
    choice = response.choices[0]
    assert choice.message.content and not choice.message.tool_calls and choice.finish_reason == "length"


def test_auto_tool_choice_finds_hermes_calls_in_the_text(client, server):
    # A regex makes the random model write what a Hermes model writes: text, then a call.
    hermes = r'Let me see\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Rome|Oslo)", ' \
             r'"unit": "celsius", "days": [1-7]\}\}\n</tool_call>'
    response = client.chat.completions.create(model=server.model_name, messages=USER, tools=TOOLS, seed=14,
                                              max_tokens=100, extra_body={"guided_regex": hermes})
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me see.\n"
    _check_call(choice.message.tool_calls[0], "get_weather")
    stream = client.chat.completions.create(model=server.model_name, messages=USER, tools=TOOLS, seed=14,
                                            max_tokens=100, stream=True, extra_body={"guided_regex": hermes})
    content, fragments, finish = "", [], None
    for chunk in stream:
        content += chunk.choices[0].delta.content or ""
        fragments += chunk.choices[0].delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me see.\n" and finish == "tool_calls"
    assert fragments[0].id.startswith("chatcmpl-tool-") and fragments[0].function.name == "get_weather"
    arguments = "".join(f.function.arguments or "" for f in fragments)
    assert json.loads(arguments) == json.loads(choice.message.tool_calls[0].function.arguments)


def test_auto_tool_choice_without_the_flags_is_a_400(server):
    server.call(lambda: setattr(server.state, "tool_call_parser", None))
    try:
        body = _post(server, "/v1/chat/completions", {"messages": USER, "tools": TOOLS})
    finally:
        server.call(lambda: setattr(server.state, "tool_call_parser", "hermes"))
    assert body.status_code == 400 and "--enable-auto-tool-choice" in body.json()["error"]["message"]


def test_a_structural_tag_from_response_format_or_structured_outputs(client, server):
    """vLLM's structural tags on both of its request forms: after each trigger ("e", which the
    random model writes often) the structure follows (an integer, then "!")."""
    tag = {"structures": [{"begin": "e", "schema": {"type": "integer"}, "end": "!"}], "triggers": ["e"]}
    pattern = r"(?:[^e]*e-?(?:0|[1-9][0-9]*)!)*[^e]*"
    for extra in ({"response_format": {"type": "structural_tag", **tag}},
                  {"structured_outputs": {"structural_tag": json.dumps(tag)}}):
        choice = client.chat.completions.create(model=server.model_name, messages=USER, max_tokens=50, seed=21,
                                                temperature=1.0, extra_body=extra).choices[0]
        text = choice.message.content
        kept = text if choice.finish_reason == "stop" else text[:text.rfind("e")]
        assert "e" in text and re.fullmatch(pattern, kept), text


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("path, extra, param, words", [
    ("/v1/completions", {"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("/v1/completions", {"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
     "guided_json", "nonsense"),
    ("/v1/completions", {"guided_grammar": "start: missing_rule"}, "guided_grammar", "missing_rule"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice", "choice"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "one output constraint"),
    ("/v1/completions", {"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "not supported"),
    ("/v1/completions", {"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend",
     "not available"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs",
     "whitespace_pattern"),
    ("/v1/completions", {"guided_choice": ["a"], "use_beam_search": True, "n": 2}, "structured_outputs",
     "beam search"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format", "not usable"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex",
     "cannot be combined"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}],
        "tool_choice": "required"}, "tool_choice", "not usable"),
])
def test_bad_constraints_are_400s_naming_the_field(server, path, extra, param, words):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": USER}
    response = _post(server, path, {**body, "max_tokens": 5, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert _post(server, "/v1/completions", {"prompt": "still", "max_tokens": 2}).status_code == 200


def test_bad_grammar_in_a_stream_is_a_400_before_streaming(server):
    response = _post(server, "/v1/chat/completions", {"messages": USER, "stream": True,
                                                      "guided_grammar": "start: undefined_rule"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_grammar"


# ----------------------------------------------------------------------------- batching
def test_free_requests_batched_with_constrained_ones_are_unchanged(server):
    free = [{"prompt": p, "max_tokens": 24, "temperature": 0.0} for p in ("Hello", "The sea", "Once upon")]
    alone = [_post(server, "/v1/completions", f).json()["choices"][0]["text"] for f in free]
    constrained = [{"prompt": "JSON:", "max_tokens": 300, "seed": s,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}
                   for s in range(4)] + [{"prompt": "x", "max_tokens": 20, "guided_regex": "[a-z]{5,9}"}]
    with concurrent.futures.ThreadPoolExecutor(len(free) + len(constrained)) as pool:
        c_futures = [pool.submit(_post, server, "/v1/completions", c) for c in constrained]
        f_futures = [pool.submit(_post, server, "/v1/completions", f) for f in free]
        mixed = [f.result().json()["choices"][0]["text"] for f in f_futures]
        for future in c_futures[:4]:
            choice = future.result().json()["choices"][0]
            if choice["finish_reason"] == "stop":
                jsonschema.validate(json.loads(choice["text"]), PERSON)
        assert re.fullmatch("[a-z]{5,9}", c_futures[4].result().json()["choices"][0]["text"])
    assert mixed == alone


def test_generate_takes_structured_outputs_and_guided_decoding(server):
    for field in ("structured_outputs", "guided_decoding"):
        body = requests.post(server.url + "/generate", json={"prompt": "Pick:", "max_tokens": 10, "seed": 1,
                                                             field: {"choice": ["red", "green"]}}, timeout=60)
        assert body.status_code == 200, body.text
        assert body.json()["text"][0] in ("Pick:red", "Pick:green")
    bad = requests.post(server.url + "/generate", json={"prompt": "x", "guided_decoding": {"regex": "(("}},
                        timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_decoding"


def test_constrained_requests_added_and_abandoned_from_many_threads_leave_the_engine_clean(server):
    """Grammars compile in the backend's threads while the engine thread steps and the loop
    adds and aborts: clients that leave mid-compile or mid-output leave nothing behind."""
    def schema(i: int) -> dict:   # distinct schemas: each compiles anew
        return {"type": "object", "properties": {f"k{i}": {"type": "integer"}, "s": {"enum": [str(i), "x"]}},
                "required": [f"k{i}", "s"], "additionalProperties": False}

    def one(i: int):
        body = {"prompt": "go", "max_tokens": 60, "seed": i, "guided_json": schema(i), "stream": i % 3 == 0}
        try:   # a third leave at once, a third mid-stream, a third wait for their answer
            response = _post_with_timeout(server, body, 0.05 if i % 3 == 1 else 120)
        except requests.exceptions.Timeout:
            return None
        if body["stream"]:
            next(response.iter_lines())
            response.close()
            return None
        return response.json()["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = [a for a in pool.map(one, range(24)) if a is not None]
    assert answers
    for choice in answers:
        if choice["finish_reason"] == "stop":
            assert set(json.loads(choice["text"])) <= {"s"} | {f"k{i}" for i in range(24)}
    stats = server.wait_until(lambda s: s.num_used_blocks == 0 and s.num_running == 0 and s.num_waiting == 0)
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0), stats
    assert server.call(lambda: server.async_engine.engine._awaiting_grammar) == []
    assert _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5, "guided_choice": ["ok"]}).json()[
        "choices"][0]["text"] == "ok"


def _post_with_timeout(server, body: dict, timeout: float) -> requests.Response:
    return requests.post(server.url + "/v1/completions", json={"model": server.model_name, **body},
                         timeout=timeout, stream=body.get("stream", False))


def test_a_grammar_failing_inside_the_engine_fails_its_request_alone_with_a_400(server):
    grammars = server.async_engine.engine.grammars

    def refuse(params):
        raise ValueError(f"structured_outputs.{params.kind} is not usable: refused for this test")

    grammars._new_matcher = refuse   # the door's check passes; the engine's matcher fails
    try:
        failed = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5, "guided_regex": "[0-9]{3}"})
    finally:
        del grammars._new_matcher
    assert failed.status_code == 400, failed.text
    assert failed.json()["error"]["param"] == "structured_outputs" and "refused" in failed.json()["error"]["message"]
    ok = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5, "guided_regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", ok.json()["choices"][0]["text"])


def test_required_tools_with_refs_to_their_defs_compile(server):
    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tool = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}}, "required": ["to"],
        "$defs": {"Point": point}}}}
    response = _post(server, "/v1/chat/completions", {"messages": USER, "tools": [tool], "tool_choice": "required",
                                                      "max_tokens": 5, "return_token_ids": True})
    assert response.status_code == 200, response.text
    # Cut off at 5 tokens, the choice has no content (as vLLM): its tokens show the constraint.
    text = server.state.tokenizer.decode(response.json()["choices"][0]["token_ids"])
    assert text.lstrip().startswith("[")


def test_the_openai_clients_parse_helper_gets_its_pydantic_model(client, server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=8)
        population: int = Field(ge=0)
        kind: Literal["town", "city"]

    response = client.chat.completions.parse(model=server.model_name, messages=USER, max_tokens=200, seed=15,
                                             response_format=City)
    city = response.choices[0].message.parsed
    assert isinstance(city, City) and len(city.name) <= 8 and city.kind in ("town", "city")


def test_the_parse_helper_gets_strict_pydantic_tool_arguments(client, server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        city: str = Field(max_length=8)
        unit: Literal["celsius", "fahrenheit"]

    response = client.chat.completions.parse(
        model=server.model_name, messages=USER, max_tokens=200, seed=16,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    arguments = response.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(arguments, GetWeather) and arguments.unit in ("celsius", "fahrenheit")


def test_a_grammar_the_requests_other_constraints_contradict_is_a_400(client, server):
    # Found by the long fuzz: the grammar and allowed_token_ids left no token to sample.
    letters = [server.async_engine.engine.tokenizer.convert_tokens_to_ids(c) for c in "abc"]
    body = {"allowed_token_ids": letters, "guided_json": {"type": "object"}}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model_name, prompt="Hi", max_tokens=8, extra_body=body)
    assert "no token satisfies both the grammar" in info.value.message
    stream = client.completions.create(model=server.model_name, prompt="Hi", max_tokens=8, stream=True,
                                       extra_body=body)
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "no token satisfies both the grammar" in str(info.value)


def test_tokenize_counts_a_chat_prompt_with_tools_and_calls(client, server):
    """vLLM's /tokenize takes tools with messages: the count is the chat prompt's."""
    history = USER + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    chat = client.chat.completions.create(model=server.model_name, messages=history, tools=TOOLS,
                                          tool_choice="none", max_tokens=1)
    counted = _post(server, "/tokenize", {"messages": history, "tools": TOOLS}).json()
    assert counted["count"] == chat.usage.prompt_tokens
    assert _post(server, "/tokenize", {"messages": USER}).json()["count"] < counted["count"]
    bad = _post(server, "/tokenize", {"messages": USER, "tools": [{"type": "retrieval"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"
