"""Hugging Face transformers as the oracle: greedy generation, beams and logprobs."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate(do_sample=False), never stopping at EOS (our ignore_eos=True)."""
    model = hf_model(path)
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def hf_log_softmax(path: str, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of token_ids, float32, [len, V]."""
    logits = hf_model(path)(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def random_prompts(seed: int, lengths: list[int], vocab: int = 512, low: int = 4) -> list[list[int]]:
    """Random token-id prompts (ids below `low` are reserved for special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=gen).tolist() for n in lengths]
