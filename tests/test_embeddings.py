"""runner="pooling": OfflineLLM.embed gives each prompt's last-token final hidden state,
L2-normalised, as transformers' base model computes it; through chunked prefill, the prefix
cache and tensor parallelism; dimensions and normalize; the runner refuses the wrong requests."""

from __future__ import annotations

import pytest
import torch

from aserve import OfflineLLM, PoolingParams, SamplingParams
from hf_reference import random_prompts
from tiny_models import tiny_model_dir

PROMPT_LENGTHS = [3, 17, 40, 9]


def hf_embedding(family: str, prompt: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir(family), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([prompt])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=0)


def embed(llm: OfflineLLM, prompts, **params) -> list[torch.Tensor]:
    outputs = llm.embed(prompts, pooling_params=PoolingParams(**params) if params else None, use_tqdm=False)
    assert all(o.finished and o.error is None for o in outputs)
    return [torch.tensor(o.outputs.embedding) for o in outputs]


@pytest.fixture(scope="module")
def pooling_llm():
    made: dict = {}

    def get(family: str, **kwargs) -> OfflineLLM:
        key = (family, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = OfflineLLM(model=tiny_model_dir(family), runner="pooling", dtype="float32",
                                   kv_cache_memory_gb=0.05, **kwargs)
        return made[key]

    return get


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
def test_embeddings_are_the_last_tokens_normalised_hidden_state(family, pooling_llm):
    prompts = random_prompts(1, PROMPT_LENGTHS)
    for got, prompt in zip(embed(pooling_llm(family), prompts), prompts):
        torch.testing.assert_close(got, hf_embedding(family, prompt), atol=1e-5, rtol=0)


def test_chunked_prefill_and_the_prefix_cache_give_the_same_vectors(pooling_llm):
    prompts = random_prompts(2, [60, 45])
    whole = embed(pooling_llm("llama"), prompts)
    chunked_llm = pooling_llm("llama", max_num_batched_tokens=16)
    for _ in range(2):   # the second time, the prompts' full blocks come from the prefix cache
        for a, b in zip(whole, embed(chunked_llm, prompts)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert chunked_llm.engine.get_stats().prefix_cache_hits > 0


def test_dimensions_cut_the_vector_before_normalising_and_normalize_false_keeps_its_length(pooling_llm):
    llm = pooling_llm("llama")
    prompt = random_prompts(3, [12])
    raw, = embed(llm, prompt, normalize=False)
    assert abs(raw.norm().item() - 1.0) > 1e-3
    short, = embed(llm, prompt, dimensions=16)
    torch.testing.assert_close(short, torch.nn.functional.normalize(raw[:16], dim=0), atol=1e-6, rtol=0)
    too_many = llm.engine.model_config.hf_config.hidden_size + 1   # 65, or 257 for a GPU's wider tiny model
    with pytest.raises(ValueError, match=f"dimensions {too_many} is more than"):
        llm.embed(prompt, pooling_params=PoolingParams(dimensions=too_many), use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)


def test_each_runner_refuses_the_other_kind_of_request(pooling_llm, llm_cache):
    with pytest.raises(ValueError, match="generates no text"):
        pooling_llm("llama").generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="runner='pooling'"):
        llm_cache("llama").embed([[5, 6]], use_tqdm=False)
    with pytest.raises(ValueError, match="runner must be one of"):
        OfflineLLM(model=tiny_model_dir("llama"), runner="score")


def test_tensor_parallel_embeddings_equal_one_ranks():
    prompts = random_prompts(4, PROMPT_LENGTHS)
    with OfflineLLM(model=tiny_model_dir("qwen3"), runner="pooling", dtype="float32", kv_cache_memory_gb=0.05,
                    tensor_parallel_size=2) as llm:
        split = embed(llm, prompts)
    for got, prompt in zip(split, prompts):
        torch.testing.assert_close(got, hf_embedding("qwen3", prompt), atol=1e-5, rtol=0)


def test_an_input_may_fill_the_context_but_not_pass_it(pooling_llm):
    llm = pooling_llm("llama", max_model_len=32)
    full = random_prompts(5, [32])
    got, = embed(llm, full)
    torch.testing.assert_close(got, hf_embedding("llama", full[0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="33 tokens in the input for embedding"):
        llm.embed(random_prompts(6, [33]), use_tqdm=False)


def _sentence_transformers_files(path, pooling: dict, normalize: bool) -> None:
    import json

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **pooling}))


def test_the_models_sentence_transformers_config_decides_normalising_and_other_poolings_are_refused(tmp_path):
    import shutil

    last = tmp_path / "last"
    shutil.copytree(tiny_model_dir("llama"), last)
    _sentence_transformers_files(last, {"pooling_mode_lasttoken": True}, normalize=False)
    llm = OfflineLLM(model=str(last), runner="pooling", dtype="float32", kv_cache_memory_gb=0.05)
    vector, = embed(llm, [[5, 6, 7]])
    assert abs(vector.norm().item() - 1.0) > 1e-3            # no Normalize module: as the model says
    normalized, = embed(llm, [[5, 6, 7]], normalize=True)      # a request may still ask
    torch.testing.assert_close(normalized, torch.nn.functional.normalize(vector, dim=0), atol=1e-6, rtol=0)
    mean = tmp_path / "mean"
    shutil.copytree(tiny_model_dir("llama"), mean)
    _sentence_transformers_files(mean, {"pooling_mode_mean_tokens": True}, normalize=True)
    with pytest.raises(ValueError, match="pools by mean_tokens"):
        OfflineLLM(model=str(mean), runner="pooling", dtype="float32", kv_cache_memory_gb=0.05)
