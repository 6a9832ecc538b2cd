"""Beam search through the engine equals transformers' generate(num_beams=...)."""

from __future__ import annotations

import pytest
import torch

from aserve import SamplingParams
from hf_reference import hf_model, random_prompts
from tiny_models import tiny_model_dir


@torch.inference_mode()
def _hf_beams(path, prompt, beams, n, length_penalty, max_new_tokens):
    model = hf_model(path)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         num_beams=beams, num_return_sequences=n, do_sample=False,
                         length_penalty=length_penalty, early_stopping=False,
                         max_new_tokens=max_new_tokens, pad_token_id=model.config.pad_token_id)
    # Finished beams are padded after their EOS (with pad or EOS ids, by HF's version): cut there.
    eos = model.config.eos_token_id
    return [row[:row.index(eos) + 1] if eos in row else row for row in out[:, len(prompt):].tolist()]


@pytest.mark.parametrize("beams,n,length_penalty", [(4, 4, 1.0), (3, 2, 0.0), (4, 2, 2.0)])
def test_beam_search_equals_transformers(beams, n, length_penalty, llm_cache):
    llm = llm_cache("llama")
    params = SamplingParams(use_beam_search=True, best_of=beams, n=n, temperature=0.0,
                            length_penalty=length_penalty, max_tokens=12)
    for prompt in random_prompts(11, [5, 12]):
        got = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
        assert got == _hf_beams(tiny_model_dir("llama"), prompt, beams, n, length_penalty, 12)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_beam_search_survives_preemption(llm_cache):
    llm = llm_cache("llama", block_size=8, num_gpu_blocks_override=24)
    params = SamplingParams(use_beam_search=True, best_of=4, n=4, temperature=0.0, max_tokens=12)
    prompts = random_prompts(12, [20, 18, 25])
    got = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    for prompt, beams in zip(prompts, got):
        assert beams == _hf_beams(tiny_model_dir("llama"), prompt, 4, 4, 1.0, 12)
