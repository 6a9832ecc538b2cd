"""The model's generation_config.json as the sampling defaults of what a request leaves unset
(vLLM's --generation-config auto, its default), offline and on every chat-like route."""

from __future__ import annotations

import json

import anthropic
import pytest

from aserve import OfflineLLM, SamplingParams
from aserve.models.generation_config import sampling_defaults
from server_fixtures import ServerThread, small_engine_args
from tiny_models import make_tiny_model

# top_k 1 makes sampling greedy whatever the temperature: a request that leaves top_k unset
# answers as greedy decoding does exactly when the model's default reached it.
MODEL_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_k": 1, "max_new_tokens": 5}
MESSAGES = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import GenerationConfig

    path = make_tiny_model("llama", tmp_path_factory.mktemp("genconfig") / "model")
    GenerationConfig(**MODEL_DEFAULTS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def offline(model_dir):
    return OfflineLLM(model=model_dir, device="cpu", dtype="float32", kv_cache_memory_gb=0.05)


def greedy_chat(offline, max_tokens: int) -> str:
    tok = offline.get_tokenizer()
    ids = tok(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids
    return offline.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0].outputs[0].text


def test_the_defaults_are_the_files_sampling_fields(model_dir, tmp_path):
    assert sampling_defaults("auto", model_dir) == {"temperature": 0.7, "top_k": 1, "max_tokens": 5}
    assert sampling_defaults("vllm", model_dir) == {}
    assert sampling_defaults("auto", model_dir, {"top_p": 0.9, "top_k": 3}) == {
        "temperature": 0.7, "top_k": 3, "top_p": 0.9, "max_tokens": 5}
    assert sampling_defaults("auto", str(tmp_path)) == {}   # no file: the API's own
    with pytest.raises(ValueError, match="unknown fields"):
        sampling_defaults("auto", model_dir, {"beam_width": 2})
    with pytest.raises(ValueError, match="bad sampling default"):
        sampling_defaults("vllm", model_dir, {"temperature": -1})
    with pytest.raises(ValueError, match="--generation-config"):
        sampling_defaults(str(tmp_path / "missing"), model_dir)


def test_offline_generate_without_params_uses_them(offline, model_dir):
    defaults = offline.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.7, 1, 5)
    prompt = "The capital of France is"
    plain = offline.generate([prompt], use_tqdm=False)[0].outputs[0]
    greedy = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert plain.token_ids == greedy.token_ids
    ignored = OfflineLLM(model=model_dir, device="cpu", dtype="float32", kv_cache_memory_gb=0.05,
                         generation_config="vllm")
    assert ignored.get_default_sampling_params() == SamplingParams()


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(small_engine_args(model=model_dir)) as s:
        yield s


def test_chat_takes_the_models_defaults_for_what_it_leaves_unset(server, offline):
    client = server.openai_client()
    resp = client.chat.completions.create(model="", messages=MESSAGES)
    assert resp.choices[0].message.content == greedy_chat(offline, 5)   # top_k 1, max_tokens 5
    assert resp.usage.completion_tokens == 5
    longer = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=8)
    assert longer.usage.completion_tokens == 8 and longer.choices[0].message.content == greedy_chat(offline, 8)


def test_responses_and_messages_take_them_too(server, offline):
    resp = server.openai_client().responses.create(input=MESSAGES)
    assert resp.output_text == greedy_chat(offline, 5) and resp.temperature == 0.7
    msg = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0).messages.create(
        model="", max_tokens=5, messages=MESSAGES)
    assert msg.content[0].text == greedy_chat(offline, 5)


def test_a_request_own_values_win(server):
    client = server.openai_client()
    seen = {client.completions.create(model="", prompt="Hello", max_tokens=12, temperature=1.0, seed=seed,
                                      extra_body={"top_k": -1}).choices[0].text for seed in range(4)}
    assert len(seen) > 1   # sampled for real: the model's top_k 1 did not apply


def test_the_cli_takes_the_flags():
    from aserve.server.cli import engine_args_from, parse_args

    args = engine_args_from(parse_args(["--generation-config", "vllm", "--override-generation-config",
                                        json.dumps({"temperature": 0.5})]))
    assert (args.generation_config, args.override_generation_config) == ("vllm", {"temperature": 0.5})
    with pytest.raises(SystemExit):
        parse_args(["--override-generation-config", "[1, 2]"])
