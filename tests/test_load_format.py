"""load_format (dummy random weights, one weight format only) and skip_tokenizer_init."""

from __future__ import annotations

import pytest
import torch

from aserve import OfflineLLM, SamplingParams
from aserve.config import EngineArgs
from aserve.models import create_model_config, load_model
from aserve.server.cli import engine_args_from, make_parser
from tiny_models import EOS_ID, _config, make_tiny_model, tiny_model_dir

PROMPTS = [[5, 17, 42, 99, 7], [300, 301, 302]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _config_only_dir(tmp_path_factory, family: str) -> str:
    path = tmp_path_factory.mktemp(f"{family}-config-only")
    _config(family, {}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["llama", "opt"])
def config_only(request, tmp_path_factory) -> tuple[str, str]:
    return request.param, _config_only_dir(tmp_path_factory, request.param)


def _engine(model: str, **kwargs) -> OfflineLLM:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("num_gpu_blocks_override", 64)
    return OfflineLLM(model=model, **kwargs)


def _dummy(path: str, seed: int = 0):
    return load_model(create_model_config(EngineArgs(model=path, dtype="float32", load_format="dummy",
                                                     seed=seed)), "cpu")


def test_dummy_weights_from_a_folder_with_only_config_json(config_only):
    family, path = config_only
    llm = _engine(path, load_format="dummy", skip_tokenizer_init=True)
    assert llm.engine.factory.eos_token_ids == {EOS_ID}  # no generation config: config.json's
    params = dict(llm.engine.model.named_parameters())
    assert params and all(p.abs().max().item() <= 1e-3 for p in params.values())
    assert all(p.abs().max().item() > 0 for p in params.values())  # every one was filled
    if family == "opt":  # tied: the LM head is the embedding, filled once
        model = llm.engine.model
        assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.prompt_token_ids == prompt and out.prompt is None
        assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].text == ""


def test_same_seed_same_weights_and_output_other_seed_other_weights(config_only):
    _, path = config_only
    a, b, c = (dict(_dummy(path, seed).named_parameters()) for seed in (0, 0, 1))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not any(torch.equal(a[name], c[name]) for name in a)
    runs = [_engine(path, load_format="dummy", skip_tokenizer_init=True, seed=7).generate(
        PROMPTS, GREEDY, use_tqdm=False) for _ in range(2)]
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]


def test_dummy_ignores_weight_files_that_exist():
    path = tiny_model_dir("qwen2")  # tied, with real (large) weights on disk
    model = _dummy(path)
    assert all(p.abs().max().item() <= 1e-3 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bad_load_format_is_a_value_error():
    with pytest.raises(ValueError, match="load_format"):
        EngineArgs(load_format="npz")


def test_load_format_restricts_the_weight_files(tmp_path):
    safe = tiny_model_dir("llama")
    pt = make_tiny_model("llama", tmp_path / "pt", safe_serialization=False)

    def load(path, fmt):
        return load_model(create_model_config(EngineArgs(model=path, dtype="float32", load_format=fmt)), "cpu")

    expected = load(safe, "auto").state_dict()
    for path, fmt in ((safe, "safetensors"), (pt, "pt"), (pt, "auto")):
        got = load(path, fmt).state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), (path, fmt)
    with pytest.raises(ValueError, match="load_format='pt'.*pytorch_model"):
        load(safe, "pt")
    with pytest.raises(ValueError, match="load_format='safetensors'.*safetensors"):
        load(pt, "safetensors")


def test_skip_tokenizer_init_takes_token_ids_and_gives_no_text():
    path = tiny_model_dir("llama")
    llm = _engine(path, skip_tokenizer_init=True)
    assert llm.get_tokenizer() is None
    assert llm.engine.factory.eos_token_ids == {EOS_ID}  # from the model's configs
    reference = _engine(path).generate(PROMPTS, GREEDY, use_tqdm=False)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                   logprobs=2), use_tqdm=False)
    for ref, out in zip(reference, outputs):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].text == ""
        assert all(lp.decoded_token is None for row in out.outputs[0].logprobs for lp in row.values())
    beams = llm.generate(PROMPTS[:1], SamplingParams(use_beam_search=True, n=2, temperature=0.0,
                                                      max_tokens=4), use_tqdm=False)
    assert len(beams[0].outputs) == 2 and all(c.text == "" for c in beams[0].outputs)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate("Hello", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="stop"):
        llm.generate(PROMPTS, SamplingParams(stop=["x"]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_cli_flags_reach_engine_args():
    args = engine_args_from(make_parser().parse_args(["--load-format", "dummy", "--skip-tokenizer-init"]))
    assert (args.load_format, args.skip_tokenizer_init) == ("dummy", True)
    args = engine_args_from(make_parser().parse_args([]))
    assert (args.load_format, args.skip_tokenizer_init) == ("auto", False)
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--load-format", "npz"])
