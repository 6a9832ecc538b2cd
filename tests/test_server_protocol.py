"""Request validation at the door (protocol.py), without a server: each bad body is a clear 400."""

from __future__ import annotations

import orjson
import pytest

from aserve.server.errors import APIError, parse_request
from aserve.server.protocol import ChatCompletionRequest, CompletionRequest
from aserve.server.protocol_generate import GenerateRequest


def parse(model_cls, body):
    return parse_request(orjson.dumps(body), model_cls)


def error_of(fn) -> APIError:
    with pytest.raises(APIError) as info:
        fn()
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("prompt, expected", [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_accepts_every_openai_form(prompt, expected):
    assert parse(CompletionRequest, {"prompt": prompt}).prompts() == expected


def test_completion_defaults_follow_openai():
    req = parse(CompletionRequest, {"prompt": "x"})
    params = req.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.n) == (16, 1.0, 1.0, 1)


def test_invalid_json_is_a_400():
    err = error_of(lambda: parse_request(b'{"prompt": ', CompletionRequest))
    assert "JSON" in err.message


def test_a_body_that_is_not_an_object_is_a_400():
    error_of(lambda: parse_request(b'[1, 2]', CompletionRequest))


def test_missing_prompt_names_the_parameter():
    err = error_of(lambda: parse(CompletionRequest, {"model": "m"}))
    assert err.param == "prompt" and "prompt" in err.message


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("max_tokens", "16"), ("n", 1.5), ("stream", "yes"), ("stop", 5),
    ("logit_bias", {"1": "x"}),
])
def test_wrong_types_are_400s_naming_the_field(field, value):
    err = error_of(lambda: parse(CompletionRequest, {"prompt": "x", field: value}))
    assert err.param == field


def test_a_prompt_of_the_wrong_shape_is_a_400():
    err = error_of(lambda: parse(CompletionRequest, {"prompt": [1, "a"]}))
    assert err.param == "prompt"


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0), ("presence_penalty", 3.0),
    ("top_k", -5), ("min_p", 2.0), ("logprobs", -2),
])
def test_out_of_range_values_are_400s_naming_the_field(field, value):
    req = parse(CompletionRequest, {"prompt": "x", field: value})
    err = error_of(req.to_sampling_params)
    assert err.param == field, err.message


def test_suffix_is_refused_not_ignored():
    err = error_of(parse(CompletionRequest, {"prompt": "x", "suffix": "end"}).to_sampling_params)
    assert err.param == "suffix" and "suffix" in err.message


def test_stream_options_need_stream():
    req = parse(CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": True}})
    assert error_of(req.to_sampling_params).param == "stream_options"


def test_echo_with_logprobs_asks_for_prompt_logprobs():
    params = parse(CompletionRequest, {"prompt": "x", "echo": True, "logprobs": 2}).to_sampling_params()
    assert params.logprobs == 2 and params.prompt_logprobs == 2


def test_beam_search_defaults_to_temperature_zero():
    params = parse(CompletionRequest, {"prompt": "x", "use_beam_search": True, "n": 2}).to_sampling_params()
    assert params.use_beam_search and params.temperature == 0.0


def test_vllm_extras_reach_sampling_params():
    params = parse(CompletionRequest, {"prompt": "x", "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
                                       "stop_token_ids": [7], "ignore_eos": True, "min_tokens": 2,
                                       "skip_special_tokens": False}).to_sampling_params()
    assert (params.top_k, params.min_p, params.repetition_penalty, params.stop_token_ids,
            params.ignore_eos, params.min_tokens, params.skip_special_tokens) == (5, 0.1, 1.2, [7], True, 2, False)


def test_chat_logprobs_map_to_top_logprobs():
    req = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}],
                                        "logprobs": True, "top_logprobs": 3})
    assert req.to_sampling_params().logprobs == 3


def test_chat_top_logprobs_need_logprobs():
    req = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3})
    assert error_of(req.to_sampling_params).param == "top_logprobs"


def test_chat_functions_are_refused_not_ignored():
    req = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}],
                                        "functions": [{"name": "f"}]})
    assert error_of(req.to_sampling_params).param == "functions"


def test_chat_malformed_tools_are_refused():
    from aserve.server.tool_calls import plan_tools
    req = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}],
                                        "tools": [{"type": "function"}], "tool_choice": "none"})
    assert error_of(lambda: plan_tools(req.tools, req.tool_choice, None)).param == "tools"


def test_chat_text_parts_are_joined_by_newlines_and_kept_for_parts_templates():
    from aserve.server.content_format import as_template_content

    req = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b", "lang": "en"}]}]})
    conversation = req.conversation()
    assert as_template_content(conversation, "string", None) == [{"role": "user", "content": "a\nb"}]
    assert as_template_content(conversation, "openai", None) == [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b", "lang": "en"}]}]


def test_generate_takes_any_sampling_field():
    req = parse(GenerateRequest, {"prompt": "x", "use_beam_search": True, "n": 4, "temperature": 0})
    params = req.to_sampling_params()
    assert params.use_beam_search and params.n == 4


def test_generate_knows_every_sampling_field():
    from aserve.server.errors import SAMPLING_FIELDS
    assert SAMPLING_FIELDS <= set(GenerateRequest.model_fields)


@pytest.mark.parametrize("field, value", [
    ("skip_special_tokens", 1), ("ignore_eos", "false"), ("use_beam_search", "false"), ("n", "2"),
    ("temperature", "0"), ("stop", [1]), ("stop_token_ids", ["1"]), ("logit_bias", {"1": "x"}),
    ("early_stopping", "sometimes"), ("max_tokens", 1.5), ("stream", "true"),
])
def test_generate_wrong_types_are_400s_naming_the_field(field, value):
    err = error_of(lambda: parse(GenerateRequest, {"prompt": "x", field: value}))
    assert err.param == field, err.message


def test_generate_passes_only_the_fields_it_was_given():
    params = parse(GenerateRequest, {"prompt": "x", "max_tokens": 3}).to_sampling_params()
    assert (params.max_tokens, params.n, params.temperature, params.best_of) == (3, 1, 1.0, 1)


def test_generate_refuses_unknown_fields():
    err = error_of(parse(GenerateRequest, {"prompt": "x", "temprature": 0}).to_sampling_params)
    assert "temprature" in err.message


def test_generate_out_of_range_names_the_field():
    err = error_of(parse(GenerateRequest, {"prompt": "x", "top_p": 0}).to_sampling_params)
    assert err.param == "top_p"


def test_error_body_has_openai_shape():
    body = orjson.loads(APIError(400, "bad", param="n").body())
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
