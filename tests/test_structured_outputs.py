"""Structured outputs through the engine, on the built-in random model: exactly the model
whose free text never parses, so every parse here is the grammar's doing."""

from __future__ import annotations

import json
import re

import pytest

# The GPU machine's image has no jsonschema; the CPU test command installs it.
jsonschema = pytest.importorskip("jsonschema")

from aserve import OfflineLLM, SamplingParams  # noqa: E402
from aserve.structured_output import GuidedDecodingParams, StructuredOutputsParams as S  # noqa: E402

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
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
PROMPTS = ["Hello", "Write JSON about a person:", "The capital of France is"]


@pytest.fixture(scope="module")
def llm():
    return OfflineLLM(kv_cache_memory_gb=0.05)


def _sample(seed: int, so: S, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 300)
    return SamplingParams(temperature=1.0, seed=seed, structured_outputs=so, **kw)


def _texts(llm, params) -> list:
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_json_schema_outputs_parse_and_validate(llm):
    for seed in range(3):
        for out in _texts(llm, _sample(seed, S(json=PERSON, disable_any_whitespace=True))):
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), PERSON)


def test_properties_come_in_the_schemas_order(llm):
    # As OpenAI's structured outputs: keys in the order the schema declares them (the schema
    # was once re-serialized with sorted keys, which reordered the output).
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    for out in _texts(llm, _sample(5, S(json=schema, disable_any_whitespace=True), max_tokens=60)):
        assert out.finish_reason == "stop", out.text
        assert list(json.loads(out.text)) == ["zeta", "alpha"], out.text


def test_a_json_schema_given_as_text_and_any_json_object(llm):
    for out in _texts(llm, _sample(4, S(json=json.dumps({"type": "array", "items": {"type": "integer"},
                                                          "minItems": 1, "maxItems": 4}),
                                        disable_any_whitespace=True))):
        value = json.loads(out.text)
        assert isinstance(value, list) and 1 <= len(value) <= 4 and all(isinstance(v, int) for v in value)
    for out in _texts(llm, _sample(5, S(json_object=True, disable_any_whitespace=True), max_tokens=40)):
        if out.finish_reason == "stop":   # a random model may write one long object
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.text.startswith("{")


def test_regex_choice_and_grammars(llm):
    for out in _texts(llm, _sample(1, S(regex=r"[0-9]{3}-[a-z]{2}"))):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", out.text), out.text
    choices = ["yes", "no", "it depends"]
    for out in _texts(llm, _sample(2, S(choice=choices))):
        assert out.text in choices
    gbnf = 'root ::= "(" digit+ (op "(" digit+ ")")* ")"\ndigit ::= [0-9]\nop ::= "+" | "*"'
    for out in _texts(llm, _sample(3, S(grammar=gbnf), max_tokens=60)):
        if out.finish_reason == "stop":
            assert re.fullmatch(r"\(\d+(?:[+*]\(\d+\))*\)", out.text), out.text
    lark = 'start: "[" NUMBER ("," NUMBER)~0..3 "]"\nNUMBER: /[0-9]{1,3}/'
    for out in _texts(llm, _sample(4, S(grammar=lark))):
        assert re.fullmatch(r"\[\d{1,3}(?:,\d{1,3}){0,3}\]", out.text), out.text


def test_a_structural_tag_constrains_what_follows_each_trigger_and_leaves_the_rest_free(llm):
    """vLLM's structural tag: the random model writes "e" often; each one must go on as the
    structure that begins with it (here: an integer, then "!"), the text between is free."""
    tag = {"structures": [{"begin": "e", "schema": {"type": "integer"}, "end": "!"}], "triggers": ["e"]}
    outs = _texts(llm, _sample(5, S(structural_tag=tag), max_tokens=60))
    assert sum(out.text.count("e") for out in outs) >= 3, "the test needs triggers in the text"
    for out in outs:
        text = out.text if out.finish_reason == "stop" else out.text[:out.text.rfind("e")]
        assert re.fullmatch(r"(?:[^e]*e-?(?:0|[1-9][0-9]*)!)*[^e]*", text), out.text
    # The same as JSON text, as vLLM's structured_outputs.structural_tag takes it.
    assert S(structural_tag=json.dumps(tag)).spec == S(structural_tag=tag).spec


@pytest.mark.parametrize("tag, words", [
    ({"structures": [{"begin": "<f>", "schema": {}, "end": ""}], "triggers": ["<g"]}, "starts with none"),
    ({"structures": [], "triggers": ["<f"]}, "non-empty list"),
    ({"structures": [{"begin": "<f>", "end": ""}], "triggers": ["<f"]}, r"structures\[0\]"),
    ({"type": "structural_tag", "format": {"type": "triggered_tags"}}, "'format' form"),
    ("{not json", "not valid JSON"),
])
def test_a_malformed_structural_tag_is_a_value_error_naming_it(tag, words):
    with pytest.raises(ValueError, match=words):
        S(structural_tag=tag)


def test_every_sample_of_n_follows_the_grammar(llm):
    params = SamplingParams(n=4, best_of=4, temperature=1.0, seed=7, max_tokens=20,
                            structured_outputs=S(regex=r"(cat|dog|bird)s? [0-9]"))
    for result in llm.generate(PROMPTS[:2], params, use_tqdm=False):
        assert len(result.outputs) == 4
        for out in result.outputs:
            assert re.fullmatch(r"(cat|dog|bird)s? [0-9]", out.text), out.text


def test_max_tokens_cuts_a_constrained_output_with_length(llm):
    out = _texts(llm, _sample(8, S(json={"type": "string"}), max_tokens=3))[0]
    assert out.finish_reason == "length" and out.text.startswith('"') and len(out.token_ids) == 3


def test_free_requests_beside_constrained_ones_are_unchanged(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    mixed = llm.generate(PROMPTS * 2, [greedy] * 3 + [_sample(9, S(choice=["a", "b"]))] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert all(o.outputs[0].text in ("a", "b") for o in mixed[3:])


def test_preempted_constrained_requests_still_follow_their_grammar():
    llm = OfflineLLM(num_gpu_blocks_override=12, block_size=8)
    params = _sample(11, S(regex=r"[a-z]{20,30}\."), max_tokens=40)
    outs = llm.generate(["one two three four five six"] * 4, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for o in outs:
        assert re.fullmatch(r"[a-z]{20,30}\.", o.outputs[0].text), o.outputs[0].text


def test_logprobs_of_constrained_tokens_are_the_models(llm):
    out = _texts(llm, _sample(12, S(choice=["yes", "no"]), logprobs=2))[0]
    assert out.logprobs and all(out.token_ids[i] in entry for i, entry in enumerate(out.logprobs))


@pytest.mark.parametrize("so, field", [
    (dict(json={"type": "nonsense"}), "json"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="root ::= ("), "grammar"),
])
def test_an_unusable_constraint_is_refused_at_the_door_naming_it(llm, so, field):
    with pytest.raises(ValueError, match=f"structured_outputs.{field}"):
        llm.generate(["x"], SamplingParams(structured_outputs=S(**so)), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_bad_structured_outputs_fields_are_value_errors():
    with pytest.raises(ValueError, match="exactly one"):
        S(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        S()
    with pytest.raises(ValueError, match="choice"):
        S(choice=[])
    with pytest.raises(ValueError, match="structural_tag"):
        S(structural_tag="{}")
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(use_beam_search=True, best_of=2, temperature=0.0, structured_outputs=S(regex="a"))
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(structured_outputs={"jsn": {}})


def test_guided_decoding_is_vllms_earlier_name(llm):
    params = SamplingParams(temperature=0.0, max_tokens=10, guided_decoding=GuidedDecodingParams(choice=["x", "y"]))
    assert params.structured_outputs.kind == "choice"
    assert _texts(llm, params)[0].text in ("x", "y")
    params = SamplingParams(temperature=0.0, max_tokens=10, structured_outputs={"regex": "[xy]z"})
    assert _texts(llm, params)[0].text in ("xz", "yz")


def test_an_engine_without_a_tokenizer_refuses_structured_outputs():
    llm = OfflineLLM(kv_cache_memory_gb=0.05, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate([[5, 6, 7]], SamplingParams(structured_outputs=S(regex="a")), use_tqdm=False)


def test_a_grammar_the_requests_other_constraints_contradict_ends_that_request_alone(llm):
    # allowed_token_ids leave no token the JSON grammar allows first ("{"): the request ends with
    # a clear error (no internal error, no traceback), and the free request beside it is served.
    tokenizer = llm.get_tokenizer()
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "abc"]
    contradicted = SamplingParams(temperature=0.0, max_tokens=8, allowed_token_ids=letters,
                                  structured_outputs=S(json_object=True))
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    bad, good = llm.generate(["Hello", "Hello"], [contradicted, free], use_tqdm=False)
    assert bad.finished and bad.error.startswith("structured_outputs: no token satisfies both")
    assert good.error is None and len(good.outputs[0].token_ids) == 8
