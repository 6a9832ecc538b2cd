"""vLLM's extra fields on the OpenAI routes, through the official `openai` client (extra_body)
on a real server, streamed and not (issue 14): each one honoured as vLLM honours it, or refused."""

from __future__ import annotations

import json
import math

import openai
import pytest

from server_fixtures import ServerThread, module_server_and_client, small_engine_args

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Hello there!"}]


server, client = module_server_and_client()


def complete(client, server, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.completions.create(model=server.model_name, prompt=kwargs.pop("prompt", PROMPT), **kwargs)


def chat(client, server, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=server.model_name, messages=kwargs.pop("messages", MESSAGES),
                                          **kwargs)


def bad_request(fn) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        fn()
    return info.value.body


def special_ids(server) -> tuple[int, int]:
    return tuple(server.state.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))


# ----------------------------------------------------------------------------- logprobs
def test_completion_top_logprobs_put_the_sampled_token_first_then_by_probability(client, server):
    resp = complete(client, server, max_tokens=24, temperature=2.0, seed=11, logprobs=3)
    lps = resp.choices[0].logprobs
    sampled_not_likeliest = 0
    for token, top in zip(lps.tokens, lps.top_logprobs):
        keys, values = list(top), list(top.values())
        assert keys[0] == token
        assert values[1:] == sorted(values[1:], reverse=True)
        sampled_not_likeliest += values[0] < max(values)
    assert sampled_not_likeliest, "at temperature 2 some sampled token must not be the likeliest"


def check_prompt_logprobs(prompt_logprobs, prompt_ids, k):
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(prompt_ids)
    for token_id, entry in zip(prompt_ids[1:], prompt_logprobs[1:]):
        assert str(token_id) in entry and k <= len(entry) <= k + 1
        for value in entry.values():
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert value["logprob"] <= 0 and value["rank"] >= 1 and isinstance(value["decoded_token"], str)


def test_completion_prompt_logprobs_come_on_the_choice_as_vllm_shapes_them(client, server):
    resp = complete(client, server, max_tokens=2, extra_body={"prompt_logprobs": 2})
    prompt_ids = server.state.tokenizer.encode(PROMPT)
    check_prompt_logprobs(resp.choices[0].model_extra["prompt_logprobs"], prompt_ids, 2)


def test_chat_prompt_logprobs_come_on_the_response(client, server):
    resp = chat(client, server, max_tokens=2, extra_body={"prompt_logprobs": 1})
    prompt_ids = tokenize(client, messages=MESSAGES)["tokens"]
    check_prompt_logprobs(resp.model_extra["prompt_logprobs"], prompt_ids, 1)


@pytest.mark.parametrize("body", [{"prompt_logprobs": -1}, {"prompt_logprobs": -2},
                                  {"prompt_logprobs": 1, "stream": True}])
def test_prompt_logprobs_past_the_bound_or_streamed_are_refused(server, client, body):
    """-1 (the whole vocabulary) is past the default --max-logprobs of 20, as in vLLM."""
    stream = body.pop("stream", False)
    for call in (lambda: complete(client, server, stream=stream, extra_body=body),
                 lambda: chat(client, server, stream=stream, extra_body=body)):
        assert bad_request(call)["param"] == "prompt_logprobs"


def test_prompt_logprobs_minus_one_gives_the_whole_vocabulary_where_max_logprobs_allows(tmp_path):
    """vLLM's test_chat_echo with --max-logprobs -1: every prompt position gets every token."""
    from server_fixtures import ServerThread, small_engine_args

    with ServerThread(small_engine_args(max_logprobs=-1)) as srv:
        resp = chat(srv.openai_client(), srv, max_tokens=1, extra_body={"prompt_logprobs": -1})
        positions = resp.model_extra["prompt_logprobs"]
        assert positions[0] is None and len(positions) > 2
        assert all(len(p) >= srv.state.vocab_size for p in positions[1:])


def test_prompt_logprobs_temperature_flattens_the_prompts_distribution(client, server):
    """vLLM's test: the prompt ends with the greedy token after its start; the hotter the
    prompt's logprobs, the less likely that argmax token looks."""
    start = [31, 7, 99, 12]
    greedy = complete(client, server, prompt=start, max_tokens=1, temperature=0,
                      extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"][0]
    last = []
    for t in (0.1, 1.0, 5):
        resp = complete(client, server, prompt=start + [greedy], max_tokens=1, temperature=0,
                        extra_body={"prompt_logprobs": 0, "prompt_logprobs_temperature": t})
        position = resp.choices[0].model_extra["prompt_logprobs"][-1]
        last.append(position[str(greedy)]["logprob"])
    assert last[0] > last[1] > last[2]
    assert bad_request(lambda: complete(client, server, extra_body={"prompt_logprobs": 0,
                                                                    "prompt_logprobs_temperature": 0}))["param"] \
        == "prompt_logprobs_temperature"


def test_streamed_echo_with_logprobs_0_still_gets_the_prompt_s_logprobs(client, server):
    chunks = list(complete(client, server, max_tokens=2, echo=True, logprobs=0, stream=True,
                           extra_body={"prompt_logprobs": 0}))
    tokens = [t for c in chunks for choice in c.choices if choice.logprobs for t in choice.logprobs.tokens]
    assert len(tokens) == len(server.state.tokenizer.encode(PROMPT)) + 2


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_returns_the_prompt_alone_to_score_it(client, server, stream):
    resp = complete(client, server, max_tokens=0, echo=True, logprobs=1, stream=stream)
    choices = [c for r in (resp if stream else [resp]) for c in r.choices]
    assert "".join(c.text for c in choices) == PROMPT
    tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
    token_logprobs = [lp for c in choices if c.logprobs for lp in c.logprobs.token_logprobs]
    assert len(tokens) == len(server.state.tokenizer.encode(PROMPT))
    assert token_logprobs[0] is None and all(lp <= 0 for lp in token_logprobs[1:])
    assert bad_request(lambda: complete(client, server, max_tokens=0))["param"] == "max_tokens"


def test_logprobs_minus_one_beyond_max_logprobs_is_a_400_naming_the_flag(client, server):
    assert "max-logprobs" in bad_request(lambda: complete(client, server, logprobs=-1))["message"]
    assert "max-logprobs" in bad_request(lambda: chat(client, server, logprobs=True, top_logprobs=-1))["message"]
    assert "max-logprobs" in bad_request(lambda: complete(client, server, logprobs=21))["message"]


def test_logprobs_minus_one_is_the_whole_vocabulary_when_max_logprobs_allows():
    with ServerThread(small_engine_args(max_logprobs=-1)) as s:
        c = openai.OpenAI(base_url=s.openai_base_url, api_key="EMPTY", max_retries=0, timeout=60)
        resp = c.chat.completions.create(model="", messages=MESSAGES, max_tokens=2, logprobs=True,
                                         top_logprobs=-1)
        vocab_size = s.state.vocab_size
        assert all(len(t.top_logprobs) == vocab_size for t in resp.choices[0].logprobs.content)
        stream = c.completions.create(model="", prompt=PROMPT, max_tokens=2, logprobs=-1, stream=True)
        tops = [top for chunk in stream for c in chunk.choices if c.logprobs for top in c.logprobs.top_logprobs]
        assert tops and all(len(top) > vocab_size // 2 for top in tops)  # texts may coincide


@pytest.mark.parametrize("stream", [False, True])
def test_return_tokens_as_token_ids_names_tokens_by_id(client, server, stream):
    body = {"return_tokens_as_token_ids": True}
    resp = complete(client, server, logprobs=2, stream=stream, extra_body=body)
    chunks = list(resp) if stream else [resp]
    tokens = [t for r in chunks for c in r.choices if c.logprobs for t in c.logprobs.tokens]
    tops = [k for r in chunks for c in r.choices if c.logprobs for top in c.logprobs.top_logprobs for k in top]
    assert tokens and all(t.startswith("token_id:") and t[9:].isdigit() for t in tokens + tops)
    resp = chat(client, server, logprobs=True, top_logprobs=2, stream=stream, extra_body=body)
    chunks = list(resp) if stream else [resp]
    content = [t for r in chunks for c in r.choices if c.logprobs for t in c.logprobs.content]
    assert content and all(t.token.startswith("token_id:") for t in content)
    assert all(top.token.startswith("token_id:") for t in content for top in t.top_logprobs)
    assert bytes(content[0].bytes).decode() == content[0].token


def test_the_server_flag_makes_token_ids_the_default_and_a_request_may_say_no(client, server):
    server.state.return_tokens_as_token_ids = True
    try:
        by_id = complete(client, server, logprobs=0)
        by_text = complete(client, server, logprobs=0, extra_body={"return_tokens_as_token_ids": False})
    finally:
        server.state.return_tokens_as_token_ids = False
    assert all(t.startswith("token_id:") for t in by_id.choices[0].logprobs.tokens)
    assert not any(t.startswith("token_id:") for t in by_text.choices[0].logprobs.tokens)


def test_cli_flags_reach_the_engine_and_the_server():
    from aserve.server.cli import engine_args_from, make_parser
    ns = make_parser().parse_args(["--max-logprobs", "-1", "--return-tokens-as-token-ids"])
    assert engine_args_from(ns).max_logprobs == -1 and ns.return_tokens_as_token_ids


# ----------------------------------------------------------------------------- usage
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_continuous_usage_stats_put_usage_on_every_chunk(client, server, route):
    options = {"include_usage": True, "continuous_usage_stats": True}
    call = complete if route == "completions" else chat
    chunks = list(call(client, server, max_tokens=6, stream=True, stream_options=options,
                       extra_body={"ignore_eos": True}))
    assert all(chunk.usage is not None for chunk in chunks)
    counts = [chunk.usage.completion_tokens for chunk in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 6
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 6
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


@pytest.mark.parametrize("options", [{}, {"continuous_usage_stats": True}, {"include_usage": False,
                                                                         "continuous_usage_stats": True}, None])
def test_without_include_usage_true_a_stream_has_no_usage(client, server, options):
    """OpenAI's default, and newer vLLM's (its test_completion_stream_options: {} gives none)."""
    extra = {} if options is None else {"stream_options": options}
    for call in (complete, chat):
        assert all(c.usage is None for c in call(client, server, stream=True, **extra))


def test_without_continuous_usage_only_the_last_chunk_has_usage(client, server):
    chunks = list(complete(client, server, stream=True, stream_options={"include_usage": True}))
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]


# ----------------------------------------------------------------------------- sampling extras
@pytest.mark.parametrize("stream", [False, True])
def test_allowed_token_ids_on_both_routes(client, server, stream):
    start, end = special_ids(server)
    body = {"allowed_token_ids": [start], "skip_special_tokens": False, "ignore_eos": True}
    resp = complete(client, server, max_tokens=3, stream=stream, extra_body=body)
    text = "".join(c.text for r in (resp if stream else [resp]) for c in r.choices)
    assert text.replace(" ", "") == "<|im_start|>" * 3
    resp = chat(client, server, max_tokens=3, stream=stream, extra_body=body)
    text = "".join((c.delta.content or "") if stream else c.message.content
                   for r in (resp if stream else [resp]) for c in r.choices)
    assert text.replace(" ", "") == "<|im_start|>" * 3


def test_skip_and_space_special_tokens(client, server):
    start, _ = special_ids(server)
    base = {"allowed_token_ids": [start], "ignore_eos": True}
    skipped = complete(client, server, max_tokens=3, extra_body=base)
    assert skipped.choices[0].text == ""
    tight = complete(client, server, max_tokens=3, extra_body={
        **base, "skip_special_tokens": False, "spaces_between_special_tokens": False})
    assert tight.choices[0].text == "<|im_start|>" * 3


def test_bad_words_are_never_generated(client, server):
    free = complete(client, server, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    word = free.choices[0].text.split()[1]
    for call in (complete, chat):
        resp = call(client, server, max_tokens=12, temperature=0, extra_body={"ignore_eos": True, "bad_words": [word]})
        text = resp.choices[0].text if call is complete else resp.choices[0].message.content
        assert word not in text.split(), (word, text)


def test_min_tokens_holds_back_eos(client, server):
    eos = server.state.tokenizer.eos_token_id
    resp = complete(client, server, max_tokens=10, temperature=0, logit_bias={str(eos): 100},
                    extra_body={"min_tokens": 5})
    assert resp.usage.completion_tokens >= 5


def test_include_stop_str_in_output(client, server):
    free = complete(client, server, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    cut = complete(client, server, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    kept = complete(client, server, max_tokens=16, temperature=0, stop=[stop],
                    extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == cut.choices[0].text + stop


def test_truncate_prompt_tokens_keeps_the_end_of_the_prompt(client, server):
    ids = [i % 500 + 10 for i in range(server.state.max_model_len + 50)]  # longer than the context
    resp = complete(client, server, prompt=ids, max_tokens=2, temperature=0,
                    extra_body={"truncate_prompt_tokens": 7})
    same = complete(client, server, prompt=ids[-7:], max_tokens=2, temperature=0)
    assert resp.usage.prompt_tokens == 7 and resp.choices[0].text == same.choices[0].text
    chat_resp = chat(client, server, max_tokens=2, extra_body={"truncate_prompt_tokens": 3})
    assert chat_resp.usage.prompt_tokens == 3


@pytest.mark.parametrize("side, kept", [("right", slice(None, 4)), ("left", slice(-4, None)), (None, slice(-4, None))])
def test_truncation_side_picks_which_end_of_the_prompt_stays(client, server, side, kept):
    """vLLM's truncation_side: "right" keeps the first tokens, "left" (and none) the last; for
    token ids, a text prompt and chat messages alike."""
    ids = list(range(10, 18))
    extra = {"return_token_ids": True, "truncate_prompt_tokens": 4}
    if side is not None:
        extra["truncation_side"] = side
    resp = complete(client, server, prompt=ids, max_tokens=1, temperature=0, extra_body=extra)
    assert resp.choices[0].prompt_token_ids == ids[kept]
    text = "one two three four five six seven eight"
    full = server.state.tokenizer(text).input_ids
    resp = complete(client, server, prompt=text, max_tokens=1, temperature=0, extra_body=extra)
    assert resp.choices[0].prompt_token_ids == full[kept]
    whole = chat(client, server, max_tokens=1, extra_body={"return_token_ids": True}).prompt_token_ids
    chat_resp = chat(client, server, max_tokens=1, extra_body=extra)
    assert chat_resp.usage.prompt_tokens == 4 and chat_resp.prompt_token_ids == whole[kept]


def test_a_truncation_side_that_is_neither_end_is_a_400(client, server):
    body = bad_request(lambda: complete(client, server, prompt=[10, 11, 12], max_tokens=1, extra_body={
        "truncate_prompt_tokens": 2, "truncation_side": "middle"}))
    assert body["param"] == "truncation_side"


def test_truncation_cuts_a_huge_id_list_before_validating_it_and_bounds_keep(client, server):
    ids = [i % 500 + 10 for i in range(300_000)]
    resp = complete(client, server, prompt=[ids, ids[:20]], max_tokens=1, extra_body={"truncate_prompt_tokens": 4})
    assert resp.usage.prompt_tokens == 8
    body = bad_request(lambda: complete(client, server, prompt=ids[:20], extra_body={
        "truncate_prompt_tokens": server.state.max_model_len + 1}))
    assert body["param"] == "truncate_prompt_tokens"


def test_generate_truncates_too(server):
    import urllib.request
    ids = [i % 500 + 10 for i in range(server.state.max_model_len + 10)]
    request = urllib.request.Request(server.url + "/generate", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": ids, "max_tokens": 1,
                                                      "truncate_prompt_tokens": 5}).encode())
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200 and len(json.loads(resp.read())["text"]) == 1


def test_add_special_tokens_false_drops_bos_from_a_completion_prompt(client, server):
    with_bos = complete(client, server, max_tokens=1).usage.prompt_tokens
    without = complete(client, server, max_tokens=1, extra_body={"add_special_tokens": False}).usage.prompt_tokens
    assert without == with_bos - 1


# ----------------------------------------------------------------------------- refused, ignored
@pytest.mark.parametrize("field, value", [
    ("priority", 1), ("logits_processors", ["my.Processor"]), ("prompt_embeds", "AAAA"),
    ("cache_salt", "salt"), ("kv_transfer_params", {"a": 1}), ("vllm_xargs", {"a": 1}),
    ("mm_processor_kwargs", {"a": 1}), ("truncate_prompt_tokens", 0), ("thinking_token_budget", 100),
    ("thinking_token_budget", -2), ("thinking_token_budget", 0.6),
])
def test_vllm_fields_not_implemented_are_refused_by_name(client, server, field, value):
    for call in (complete, chat):
        assert bad_request(lambda: call(client, server, extra_body={field: value}))["param"] == field


def test_an_unlimited_thinking_budget_is_no_budget(client, server):
    """vLLM's thinking_token_budget -1 means unlimited: the same as leaving it out."""
    for call in (complete, chat):
        assert call(client, server, max_tokens=2, extra_body={"thinking_token_budget": -1}).choices


def test_request_id_names_the_response(client, server):
    assert complete(client, server, extra_body={"request_id": "abc-1"}).id == "cmpl-abc-1"
    assert chat(client, server, extra_body={"request_id": "abc-2"}).id == "chatcmpl-abc-2"
    streamed = list(complete(client, server, stream=True, extra_body={"request_id": "abc-3"}))
    assert {chunk.id for chunk in streamed} == {"cmpl-abc-3"}


def test_their_neutral_values_and_unknown_fields_are_accepted(client, server):
    body = {"priority": 0, "logits_processors": [], "vllm_xargs": {}, "not_a_vllm_field": 1}
    assert complete(client, server, extra_body=body).choices and chat(client, server, extra_body=body).choices


# ----------------------------------------------------------------------------- chat extras
def test_echo_returns_the_last_message_when_its_role_is_the_reply_s(client, server):
    messages = MESSAGES + [{"role": "assistant", "content": "Paris is"}]
    body = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}
    plain = chat(client, server, messages=messages, temperature=0,
                 extra_body={"add_generation_prompt": False, "continue_final_message": True})
    echoed = chat(client, server, messages=messages, temperature=0, extra_body=body)
    assert echoed.choices[0].message.role == "assistant"
    assert echoed.choices[0].message.content == "Paris is" + plain.choices[0].message.content
    streamed = chat(client, server, messages=messages, temperature=0, stream=True, extra_body=body)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        echoed.choices[0].message.content
    not_same_role = chat(client, server, temperature=0, extra_body={"echo": True})  # user's message, assistant replies
    assert not not_same_role.choices[0].message.content.startswith(MESSAGES[-1]["content"])


def tokenize(client, **body):
    # /tokenize is beside /v1, not under it: the client's own http session, with its base URL's root.
    resp = client._client.post(str(client.base_url).rstrip("/").removesuffix("/v1") + "/tokenize", json=body)
    if resp.status_code == 400:
        raise openai.BadRequestError(resp.json()["error"]["message"], response=resp, body=resp.json()["error"])
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_continue_final_message_leaves_the_last_message_open(client):
    messages = MESSAGES + [{"role": "assistant", "content": "Paris is"}]
    open_ids = tokenize(client, messages=messages, add_generation_prompt=False, continue_final_message=True)["tokens"]
    closed = tokenize(client, messages=messages, add_generation_prompt=False)["tokens"]
    assert closed[:len(open_ids)] == open_ids and len(closed) > len(open_ids)


def test_continue_final_message_with_add_generation_prompt_is_refused(client, server):
    body = {"continue_final_message": True}  # add_generation_prompt defaults to true
    assert bad_request(lambda: chat(client, server, extra_body=body))["param"] == "continue_final_message"
    with pytest.raises(openai.BadRequestError):
        tokenize(client, messages=MESSAGES, continue_final_message=True)


@pytest.fixture
def trusted(server):
    """The server as --trust-request-chat-template starts it."""
    server.state.trust_request_chat_template = True
    yield
    server.state.trust_request_chat_template = False


def test_a_request_chat_template_needs_the_operator_s_trust(client, server):
    template = "{{ messages[0]['content'] }}"
    for body in ({"chat_template": template}, {"chat_template_kwargs": {"chat_template": template}}):
        error = bad_request(lambda: chat(client, server, extra_body=body))
        assert "--trust-request-chat-template" in error["message"] and error["param"] == "chat_template"
    with pytest.raises(openai.BadRequestError):
        tokenize(client, messages=MESSAGES, chat_template=template)
    from aserve.server.cli import make_parser
    assert make_parser().parse_args(["--trust-request-chat-template"]).trust_request_chat_template


def test_add_generation_prompt_false_and_a_request_chat_template(client, server, trusted):
    with_prompt = tokenize(client, messages=MESSAGES)["tokens"]
    without = tokenize(client, messages=MESSAGES, add_generation_prompt=False)["tokens"]
    assert with_prompt[:len(without)] == without and len(with_prompt) > len(without)
    template = "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}|{{ flavour }}]{% endfor %}"
    resp = chat(client, server, max_tokens=1, extra_body={
        "chat_template": template, "chat_template_kwargs": {"flavour": "mint"}})
    expected = len(server.state.tokenizer("[user|Hello there!|mint]", add_special_tokens=False).input_ids)
    assert resp.usage.prompt_tokens == expected


def test_documents_reach_the_template(client, server, trusted):
    template = "{% for d in documents %}<{{ d['title'] }}:{{ d['text'] }}>{% endfor %}{{ messages[-1]['content'] }}"
    documents = [{"title": "t1", "text": "alpha"}, {"title": "t2", "text": "beta"}]
    body = {"chat_template": template, "documents": documents}
    resp = chat(client, server, max_tokens=1, extra_body=body)
    expected = len(server.state.tokenizer("<t1:alpha><t2:beta>Hello there!", add_special_tokens=False).input_ids)
    assert resp.usage.prompt_tokens == expected


def test_a_broken_request_template_is_a_400(client, server, trusted):
    assert bad_request(lambda: chat(client, server, extra_body={"chat_template": "{% for %}"}))


# ----------------------------------------------------------------------------- /tokenize
def test_tokenize_messages_add_bos_only_when_asked(client, server):
    bos = server.state.tokenizer.bos_token_id
    plain = tokenize(client, messages=MESSAGES)["tokens"]
    with_bos = tokenize(client, messages=MESSAGES, add_special_tokens=True)["tokens"]
    assert plain[0] != bos and with_bos == [bos] + plain


def test_tokenize_returns_token_strings_when_asked(client, server):
    answer = tokenize(client, prompt=PROMPT, return_token_strs=True)
    assert answer["token_strs"] == server.state.tokenizer.convert_ids_to_tokens(answer["tokens"])
    assert tokenize(client, prompt=PROMPT).get("token_strs") is None
    chat_answer = tokenize(client, messages=MESSAGES, return_token_strs=True)
    assert len(chat_answer["token_strs"]) == chat_answer["count"]


def test_prompt_logprobs_values_are_finite_json(client, server):
    resp = complete(client, server, max_tokens=1, extra_body={"prompt_logprobs": 0})
    raw = json.dumps(resp.choices[0].model_extra["prompt_logprobs"])
    assert "Infinity" not in raw and all(
        math.isfinite(v["logprob"]) for e in resp.choices[0].model_extra["prompt_logprobs"][1:] for v in e.values())
