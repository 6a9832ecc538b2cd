"""--reasoning-parser deepseek_r1 (and qwen3, seed_oss, mistral): a reasoning model's thinking apart from its answer, on the
chat and responses routes, streamed or not, against OfflineLLM's raw text of the same prompt.

The model (tiny_models.make_thinking_model) is a random Llama made to close its thinking with
</think> after a few tokens of its greedy answer. A constraint applies to the answer only: the
grammar waits for </think>, so the thinking is the same as without it."""

from __future__ import annotations

import json
import random
import re

import openai
import pytest

from aserve import OfflineLLM, SamplingParams
from aserve.server.reasoning import END, START, ReasoningParser, ReasoningProgress
from server_fixtures import ServerThread, small_engine_args
from tiny_models import THINKING_PROMPT, make_thinking_model

MAX_TOKENS = 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_thinking_model(tmp_path_factory.mktemp("thinking") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(small_engine_args(model=model_dir), state_options={"reasoning_parser": "deepseek_r1"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


@pytest.fixture(scope="module")
def raw(model_dir):
    """OfflineLLM's greedy text of THINKING_PROMPT's chat prompt, thinking and all."""
    llm = OfflineLLM(model=model_dir, device="cpu", dtype="float32", kv_cache_memory_gb=0.05)

    def generate(template_kwargs=None, max_tokens=MAX_TOKENS) -> str:
        tok = llm.get_tokenizer()
        text = tok.apply_chat_template(THINKING_PROMPT, add_generation_prompt=True, tokenize=False,
                                       **(template_kwargs or {}))
        ids = tok(text, add_special_tokens=False).input_ids
        return llm.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens),
                            use_tqdm=False)[0].outputs[0].text

    return generate


def thinking_and_answer(text: str) -> tuple[str, str]:
    reasoning, end, content = text.partition(END)
    assert end, "the test model closes its thinking within MAX_TOKENS"
    assert reasoning and content
    return reasoning, content


# ----------------------------------------------------------------------------- the parser
class _Tokenizer:
    def get_vocab(self):
        return {START: 7, END: 8, "a": 1, "<tool_call>": 9}


PARSER = ReasoningParser("deepseek_r1", _Tokenizer())


@pytest.mark.parametrize("text, reasoning, content", [
    ("abc</think>def", "abc", "def"),
    ("<think>abc</think>def", "abc", "def"),
    ("\n<think>abc</think></think>x", "abc", "</think>x"),
    ("all thinking", "all thinking", ""),
    ("", "", ""),
])
def test_the_split_of_a_finished_output(text, reasoning, content):
    split = PARSER.split(text)
    assert (split.reasoning, split.content) == (reasoning, content)
    assert PARSER.split(text, thinking=False).content == text   # the prompt closed the thinking


def test_streamed_pieces_add_up_to_the_finished_split_wherever_the_text_is_cut():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(["a", "b", "<", "/", "think", ">", START, END, " "]) for _ in range(12))
        progress, reasoning, content = ReasoningProgress(), "", ""
        for cut in sorted(rng.sample(range(len(text) + 1), 4)):   # the text as it grows
            r, c = progress.step(PARSER.split(text[:cut], finished=False))
            reasoning, content = reasoning + r, content + c
        r, c = progress.step(PARSER.split(text, finished=True))
        final = PARSER.split(text)
        assert (reasoning + r, content + c) == (final.reasoning, final.content), text


def test_the_prompt_decides_whether_the_thinking_is_open():
    assert not PARSER.prompt_closed_thinking([1, 7])
    assert PARSER.prompt_closed_thinking([1, 7, 1, 8, 1])
    assert not PARSER.prompt_closed_thinking([1, 8, 7, 1])
    assert not PARSER.prompt_closed_thinking([1, 1])


QWEN3 = ReasoningParser("qwen3", _Tokenizer())
CALL = "<tool_call>\n<function=get_time>\n</function>\n</tool_call>"


@pytest.mark.parametrize("text, thinking, reasoning, content", [
    ("abc</think>def", True, "abc", "def"),
    ("abc", True, "abc", ""),                              # cut off inside the thinking
    ("abc", None, "", "abc"),                              # nothing opened it: a model that does not think
    ("<think>abc</think>def", None, "abc", "def"),         # the model opened it itself
    ("plan it " + CALL, True, "plan it ", CALL),           # a call written inside the thinking ends it
    ("say <tool_call> then stop", True, "say <tool_call> then stop", ""),   # a mention is no call
    ("a</think>b " + CALL, True, "a", "b " + CALL),
])
def test_the_qwen3_split(text, thinking, reasoning, content):
    split = QWEN3.split(text, thinking=thinking)
    assert (split.reasoning, split.content) == (reasoning, content)


@pytest.mark.parametrize("parser", [PARSER, QWEN3], ids=["deepseek_r1", "qwen3"])
@pytest.mark.parametrize("thinking", [True, None])
def test_streamed_pieces_add_up_to_the_finished_split_for_each_parser(parser, thinking):
    rng = random.Random(1)
    pieces = ["a", " ", "\n", "<", "think", ">", START, END, "<tool_call>", "<function=f>", "<func", "tool"]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(10))
        progress, reasoning, content = ReasoningProgress(), "", ""
        for cut in sorted(rng.sample(range(len(text) + 1), 5)):
            r, c = progress.step(parser.split(text[:cut], finished=False, thinking=thinking))
            reasoning, content = reasoning + r, content + c
        r, c = progress.step(parser.split(text, finished=True, thinking=thinking))
        final = parser.split(text, thinking=thinking)
        assert (reasoning + r, content + c) == (final.reasoning, final.content), text


def test_where_neither_tag_is_in_the_prompt_the_parsers_differ():
    assert PARSER.thinking([1, 1]) is True and QWEN3.thinking([1, 1]) is None
    for parser in (PARSER, QWEN3):
        assert parser.thinking([1, 7, 1]) is True and parser.thinking([7, 1, 8, 1]) is False


def test_qwen3_gates_a_constraint_only_when_the_prompt_opened_the_thinking():
    from aserve.structured_output import StructuredOutputsParams

    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+"))
    assert QWEN3.gate(params, [1, 7]).structured_outputs.after_token_id == 8
    assert QWEN3.gate(params, [1, 1]).structured_outputs.after_token_id is None
    assert PARSER.gate(params, [1, 1]).structured_outputs.after_token_id == 8


def test_reasoning_tokens_count_up_to_the_end_of_the_thinking():
    from aserve.server.reasoning import ReasoningView

    opened = ReasoningView(QWEN3, [1, 7])
    assert opened.reasoning_tokens([1, 1, 8, 1], "ab</think>c") == 3     # </think> included
    assert opened.reasoning_tokens([1, 1], "ab") == 2                     # cut off: all of it
    assert opened.reasoning_tokens([1, 9, 1, 1], "a" + CALL) == 1         # ended by a tool call
    assert ReasoningView(QWEN3, [7, 8]).reasoning_tokens([1, 1], "ab") == 0   # the prompt closed it
    assert ReasoningView(QWEN3, [1]).reasoning_tokens([1, 1], "ab") == 0      # nothing opened it
    assert ReasoningView(None, [1]).reasoning_tokens([1, 8], "a</think>") == 0


class _TaggedTokenizer:
    def get_vocab(self):
        return {"<seed:think>": 7, "</seed:think>": 8, "[THINK]": 5, "[/THINK]": 6, "a": 1}


SEED, MISTRAL = ReasoningParser("seed_oss", _TaggedTokenizer()), ReasoningParser("mistral", _TaggedTokenizer())


@pytest.mark.parametrize("parser, text, thinking, reasoning, content", [
    # seed_oss: Seed-OSS's own tags, and as deepseek_r1 an output nothing opened is thinking
    (SEED, "<seed:think>plan</seed:think>answer", None, "plan", "answer"),
    (SEED, "plan</seed:think>answer", True, "plan", "answer"),
    (SEED, "<think>not these</think>", True, "<think>not these</think>", ""),
    # mistral: Magistral's [THINK] tags; thinking only where the output (or prompt) opens it
    (MISTRAL, "[THINK]plan[/THINK]answer", None, "plan", "answer"),
    (MISTRAL, "just an answer", None, "", "just an answer"),
    (MISTRAL, "[THINK]cut off", None, "cut off", ""),
])
def test_the_seed_oss_and_mistral_splits(parser, text, thinking, reasoning, content):
    assert parser.thinking([1, 1]) is (True if parser is SEED else None)
    split = parser.split(text, thinking=thinking)
    assert (split.reasoning, split.content) == (reasoning, content)


@pytest.mark.parametrize("parser", [SEED, MISTRAL], ids=["seed_oss", "mistral"])
def test_the_seed_oss_and_mistral_streams_add_up_to_their_finished_split(parser):
    rng = random.Random(2)
    pieces = ["a", " ", "<seed:", "think>", "<seed:think>", "</seed:think>", "[THINK]", "[/THINK]", "[", "THINK"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(9))
        progress, reasoning, content = ReasoningProgress(), "", ""
        for cut in sorted(rng.sample(range(len(text) + 1), 4)):
            r, c = progress.step(parser.split(text[:cut], finished=False, thinking=parser.thinking([1])))
            reasoning, content = reasoning + r, content + c
        r, c = progress.step(parser.split(text, finished=True, thinking=parser.thinking([1])))
        final = parser.split(text, thinking=parser.thinking([1]))
        assert (reasoning + r, content + c) == (final.reasoning, final.content), text


def test_a_tokenizer_without_the_tags_is_refused_at_start():
    with pytest.raises(ValueError, match="no <think> and </think>"):
        ReasoningParser("deepseek_r1", type("T", (), {"get_vocab": lambda self: {"a": 1}})())
    with pytest.raises(RuntimeError) as info:
        ServerThread(state_options={"reasoning_parser": "deepseek_r1"}).start()
    assert "no <think> and </think>" in str(info.value.__cause__)


# ----------------------------------------------------------------------------- chat
def test_chat_gives_the_thinking_as_reasoning(client, raw):
    reasoning, content = thinking_and_answer(raw())
    resp = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    message = resp.choices[0].message
    assert message.content == content and message.model_extra["reasoning"] == reasoning
    assert resp.usage.completion_tokens == MAX_TOKENS


def test_chat_streams_reasoning_then_content(client, raw):
    reasoning, content = thinking_and_answer(raw())
    chunks = list(client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join(d.model_extra.get("reasoning") or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == (reasoning, content)
    last_reasoning = max(i for i, d in enumerate(deltas) if d.model_extra.get("reasoning"))
    first_content = min(i for i, d in enumerate(deltas) if d.content)
    assert last_reasoning <= first_content


def test_include_reasoning_false_leaves_it_out(client, raw):
    _, content = thinking_and_answer(raw())
    resp = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"include_reasoning": False})
    assert resp.choices[0].message.content == content and resp.choices[0].message.model_extra["reasoning"] is None
    chunks = list(client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, extra_body={"include_reasoning": False}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.model_extra.get("reasoning") for d in deltas)
    assert "".join(d.content or "" for d in deltas) == content


def test_chat_usage_counts_the_thinking_tokens_even_when_it_leaves_them_out(client, server):
    """vLLM's test_reasoning_tokens_in_usage: completion_tokens_details.reasoning_tokens, up to
    and with </think>, also with include_reasoning false; in the stream's usage chunk too."""
    resp = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"include_reasoning": False, "return_token_ids": True})
    ids = resp.choices[0].model_extra["token_ids"]
    expected = ids.index(server.async_engine.engine.tokenizer.convert_tokens_to_ids(END)) + 1
    assert resp.usage.completion_tokens_details.reasoning_tokens == expected < resp.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == expected


def test_separate_reasoning_false_puts_the_thinking_first_in_the_content(client, raw):
    """vLLM's separate_reasoning: false merges the thinking (without its tags) into content."""
    reasoning, content = thinking_and_answer(raw())
    resp = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"separate_reasoning": False})
    message = resp.choices[0].message
    assert message.content == reasoning + content and message.model_extra["reasoning"] is None
    chunks = list(client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, extra_body={"separate_reasoning": False}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.model_extra.get("reasoning") for d in deltas)
    assert "".join(d.content or "" for d in deltas) == reasoning + content


def test_a_cut_off_thinking_is_all_reasoning(client, raw):
    reasoning, _ = thinking_and_answer(raw())
    resp = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=1, temperature=0)
    message = resp.choices[0].message
    assert message.content is None and reasoning.startswith(message.model_extra["reasoning"])
    assert resp.choices[0].finish_reason == "length"


def test_a_constraint_applies_to_the_answer_after_the_thinking(client, raw):
    reasoning, _ = thinking_and_answer(raw())
    resp = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=60, temperature=0,
                                          extra_body={"structured_outputs": {"regex": "[a-z]{4,8}"}})
    message = resp.choices[0].message
    # The thinking is the free model's, token for token: the grammar waited for </think>.
    assert message.model_extra["reasoning"] == reasoning
    assert re.fullmatch("[a-z]{4,8}", message.content) and resp.choices[0].finish_reason == "stop"


def test_a_prompt_that_closed_the_thinking_gets_all_answer_and_the_constraint_at_once(client, raw):
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    text = raw({"enable_thinking": False})
    resp = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body=off)
    assert resp.choices[0].message.content == text and resp.choices[0].message.model_extra["reasoning"] is None
    constrained = client.chat.completions.create(
        model="", messages=THINKING_PROMPT, max_tokens=60, temperature=0,
        extra_body={**off, "structured_outputs": {"regex": "[a-z]{4,8}"}})
    assert re.fullmatch("[a-z]{4,8}", constrained.choices[0].message.content)


# ----------------------------------------------------------------------------- responses
def test_responses_give_a_reasoning_item_then_the_message(client, raw, server):
    reasoning, content = thinking_and_answer(raw())
    resp = client.responses.create(input=THINKING_PROMPT, max_output_tokens=MAX_TOKENS, temperature=0)
    thought, message = resp.output
    assert thought.type == "reasoning" and thought.content[0].type == "reasoning_text"
    assert thought.content[0].text == reasoning and thought.status == "completed"
    assert message.type == "message" and resp.output_text == content and resp.status == "incomplete"
    # The thinking's tokens, </think> included, counted in the output's own ids.
    ids = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]
    expected = ids.index(server.async_engine.engine.tokenizer.convert_tokens_to_ids(END)) + 1
    assert resp.usage.output_tokens_details.reasoning_tokens == expected < resp.usage.output_tokens
    cut = client.responses.create(input=THINKING_PROMPT, max_output_tokens=2, temperature=0)
    assert cut.usage.output_tokens_details.reasoning_tokens == cut.usage.output_tokens == 2


def test_responses_stream_the_reasoning_item_then_the_message(client):
    plain = client.responses.create(input=THINKING_PROMPT, max_output_tokens=MAX_TOKENS, temperature=0)
    events = list(client.responses.create(input=THINKING_PROMPT, max_output_tokens=MAX_TOKENS, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert events[2].item.type == "reasoning" and kinds[-1] == "response.incomplete"
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    content = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert reasoning == plain.output[0].content[0].text and content == plain.output_text
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    done = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.done"]
    assert added == ["reasoning", "message"] and done == [(0, "reasoning"), (1, "message")]
    # Every reasoning event comes before the message's first.
    assert kinds.index("response.output_text.delta") > max(
        i for i, k in enumerate(kinds) if k == "response.reasoning_text.delta")
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]


def test_a_chained_response_does_not_resend_the_thinking(client, server):
    first = client.responses.create(input=THINKING_PROMPT, max_output_tokens=MAX_TOKENS, temperature=0)
    chained = client.responses.create(input="And?", previous_response_id=first.id, max_output_tokens=2)
    tok = server.async_engine.engine.tokenizer
    messages = THINKING_PROMPT + [{"role": "assistant", "content": first.output_text},
                                  {"role": "user", "content": "And?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chained.usage.input_tokens == len(tok(text, add_special_tokens=False).input_ids)


def test_json_from_a_thinking_model_parses(client):
    resp = client.responses.create(input=THINKING_PROMPT, max_output_tokens=200, temperature=0,
                                   text={"format": {"type": "json_schema", "name": "w", "schema": {
                                       "type": "object", "properties": {"w": {"enum": ["x", "y"]}},
                                       "required": ["w"], "additionalProperties": False}}})
    assert resp.output[0].type == "reasoning"
    assert json.loads(resp.output_text)["w"] in ("x", "y")


def test_the_cli_takes_the_flag():
    from aserve.server.cli import make_parser

    assert make_parser().parse_args(["--reasoning-parser", "deepseek_r1"]).reasoning_parser == "deepseek_r1"
    assert make_parser().parse_args(["--reasoning-parser", "qwen3"]).reasoning_parser == "qwen3"
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--reasoning-parser", "nope"])


def test_without_the_flag_the_thinking_stays_in_the_content(model_dir, raw):
    with ServerThread(small_engine_args(model=model_dir)) as srv:
        resp = srv.openai_client().chat.completions.create(model="", messages=THINKING_PROMPT,
                                                           max_tokens=MAX_TOKENS, temperature=0)
    assert resp.choices[0].message.content == raw() and resp.choices[0].message.model_extra["reasoning"] is None


def test_a_request_cannot_set_the_servers_grammar_start():
    from aserve.structured_output import StructuredOutputsParams

    with pytest.raises(ValueError, match="unknown fields: after_token_id"):
        StructuredOutputsParams.from_any({"regex": "a+", "after_token_id": 3})


def test_anthropic_messages_give_a_thinking_block_then_the_text(server, raw):
    import anthropic

    reasoning, content = thinking_and_answer(raw())
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    msg = client.messages.create(model="", max_tokens=MAX_TOKENS, messages=THINKING_PROMPT,
                                 extra_body={"temperature": 0})
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == reasoning and msg.content[1].text == content
    with client.messages.stream(model="", max_tokens=MAX_TOKENS, messages=THINKING_PROMPT,
                                extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == reasoning and final.content[1].text == content


EFFORT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if reasoning_effort is defined %}(effort: {{ reasoning_effort }}){% endif %}assistant:")


def test_reasoning_effort_reaches_the_chat_template():
    """OpenAI's reasoning_effort, as vLLM passes it: the template's `reasoning_effort`."""
    with ServerThread(chat_template=EFFORT_TEMPLATE) as srv:
        client = srv.openai_client()

        def prompt_tokens(**extra) -> int:
            return client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=1,
                                                  **extra).usage.prompt_tokens

        plain = prompt_tokens()
        low, high = prompt_tokens(reasoning_effort="low"), prompt_tokens(reasoning_effort="high")
        assert plain < low and low != high
        with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
            prompt_tokens(reasoning_effort="extreme")


THINKING_SWITCH_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if enable_thinking is defined and not enable_thinking %}no thinking please{% endif %}"
                            "assistant:")


def test_reasoning_effort_none_turns_enable_thinking_off_unless_the_request_says_otherwise():
    """vLLM's mapping: reasoning_effort "none" sets the template's enable_thinking to false;
    an explicit chat_template_kwargs.enable_thinking wins; other efforts leave it alone."""
    with ServerThread(chat_template=THINKING_SWITCH_TEMPLATE) as srv:
        client = srv.openai_client()

        def prompt_tokens(**extra) -> int:
            return client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=1,
                                                  **extra).usage.prompt_tokens

        plain = prompt_tokens()
        assert prompt_tokens(reasoning_effort="none") > plain
        assert prompt_tokens(reasoning_effort="low") == plain
        assert prompt_tokens(reasoning_effort="none", extra_body={"chat_template_kwargs": {"enable_thinking": True}}) \
            == plain


def test_qwen3_on_a_served_model_splits_as_deepseek_r1_after_a_prompt_that_opened_the_thinking(model_dir, raw):
    reasoning, content = thinking_and_answer(raw())
    with ServerThread(small_engine_args(model=model_dir), state_options={"reasoning_parser": "qwen3"}) as srv:
        client = srv.openai_client()
        message = client.chat.completions.create(model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS,
                                                 temperature=0).choices[0].message
        assert (message.model_extra["reasoning"], message.content) == (reasoning, content)
        # Qwen3's enable_thinking=false: the template closes the thinking, all is answer.
        closed = client.chat.completions.create(
            model="", messages=THINKING_PROMPT, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
        assert closed.model_extra["reasoning"] is None
        assert closed.content == raw(template_kwargs={"enable_thinking": False})
