"""RequestFactory: validates a new request against the model and the cache, and builds it.

Everything a request could later fail on is checked here, with a message giving the numbers:
a request the engine accepts always fits, alone, in the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from aserve.config import ModelConfig, SchedulerConfig
from aserve.engine.beam_search import BeamSearchState
from aserve.engine.block_manager import BlockManager
from aserve.engine.detokenizer import IncrementalDetokenizer, prepare_tokenizer
from aserve.engine.request import Request, Sequence
from aserve.sampling_params import SamplingParams


# vLLM's words for a truncate_prompt_tokens past the context (its tests match them exactly).
TRUNCATION_TOO_LARGE = ("truncate_prompt_tokens value is greater than max_model_len. Please request a smaller "
                        "truncation size.")


@dataclass(frozen=True)
class TokenizedPrompt:
    """A text prompt with its token ids, tokenized by the caller (the server tokenizes off its
    event loop, with the same `tokenizer.encode` as the engine would)."""

    text: str
    token_ids: list[int]


class RequestFactory:
    def __init__(self, tokenizer, model_config: ModelConfig, scheduler_config: SchedulerConfig,
                 block_manager: BlockManager, device: torch.device, grammars=None) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars   # GrammarBackend, or None without a tokenizer
        self.model_config = model_config
        self.scheduler_config = scheduler_config
        self.block_manager = block_manager
        self.device = device
        self.eos_token_ids = _eos_token_ids(tokenizer, model_config)
        if tokenizer is not None:
            prepare_tokenizer(tokenizer)

    def create(self, request_id: str, prompt: Union[str, list[int], TokenizedPrompt],
               params: Optional[SamplingParams], arrival_time: float, pooling: bool = False) -> Request:
        """pooling: an embedding request (engine/pooling.py), whose prompt may fill the context,
        since nothing is generated after it."""
        params = (params or SamplingParams()).clone()
        self._check_token_ids(params)
        self._resolve_logprobs(params)
        prompt_text, prompt_ids = self._tokenize(prompt)
        prompt_ids = self._truncate(prompt_ids, params.truncate_prompt_tokens)
        if pooling:
            self._check_input_length(len(prompt_ids))
        else:
            self._check_lengths(len(prompt_ids), params)
        params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        params.all_stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            params.all_stop_token_ids |= self.eos_token_ids
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r}: stop strings need a tokenizer, and this engine "
                             f"has none (skip_tokenizer_init); use stop_token_ids.")
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise ValueError("structured_outputs need a tokenizer, and this engine has none "
                                 "(skip_tokenizer_init).")
            self.grammars.check(params.structured_outputs)
        if params.use_beam_search or self.tokenizer is None or not params.detokenize:
            # Beams are decoded once, when the search ends; no tokenizer or detokenize=False: no text.
            detokenizer = None
        else:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        seq = Sequence(prompt_ids, detokenizer, want_logprobs=params.logprobs is not None)
        request = Request(request_id, prompt_text, prompt_ids, params, arrival_time, seq, generator)
        if params.structured_outputs is not None:
            request.pending_matcher = self.grammars.matcher(params.structured_outputs)
            seq.grammar_after = params.structured_outputs.after_token_id
        if params.use_beam_search:
            eos = set() if params.ignore_eos else (self.eos_token_ids | set(params.stop_token_ids))
            request.beam_state = BeamSearchState(
                beam_width=params.best_of, num_return=params.n, length_penalty=params.length_penalty,
                early_stopping=params.early_stopping, max_tokens=params.max_tokens,
                eos_token_ids=eos, prompt_len=len(prompt_ids))
        return request

    def _resolve_logprobs(self, params: SamplingParams) -> None:
        """-1 asks for the whole vocabulary; any count is bounded by max_logprobs (each one
        costs a top-k column per row and step), as vLLM bounds it."""
        vocab, bound = self.model_config.vocab_size, self.model_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is None:
                continue
            count = vocab if value == -1 else value
            if bound != -1 and count > bound:
                raise ValueError(f"{name} must be at most {bound} (the server's --max-logprobs), got "
                                 f"{value}{' (the whole vocabulary)' if value == -1 else ''}.")
            setattr(params, name, min(count, vocab))

    def _check_token_ids(self, params: SamplingParams) -> None:
        # Ids index the logits' columns: one past the vocabulary would be silently ignored
        # (logit_bias) or could never match (stop_token_ids), so they are refused, as in vLLM.
        vocab = self.model_config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ()),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise ValueError(f"{name} holds token ids outside the vocabulary of {vocab} tokens "
                                 f"(valid ids are 0 to {vocab - 1}): {outside[:5]}.")

    def _tokenize(self, prompt) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, TokenizedPrompt):
            if not prompt.token_ids:
                raise ValueError("prompt is empty: the decoder prompt cannot be empty.")
            return prompt.text, prompt.token_ids
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt must be a list of token ids: this engine has no tokenizer "
                                 "(skip_tokenizer_init).")
            if not prompt:
                raise ValueError("prompt is empty: the decoder prompt cannot be empty.")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids.")
        vocab = self.model_config.vocab_size
        # Plain ints in range, checked in C (type, min and max): a token-by-token loop was ~15 us
        # of a 128-id prompt's add in the engine's thread. The loop names the first bad id.
        if set(map(type, prompt)) == {int} and min(prompt) >= 0 and max(prompt) < vocab:
            return None, list(prompt)
        for token in prompt:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {token!r}.")
        return None, list(prompt)

    def _truncate(self, prompt_ids: list[int], keep: Optional[int]) -> list[int]:
        """The prompt's last `keep` tokens (vLLM truncates on the left, keeping the recent end)."""
        if keep is None:
            return prompt_ids
        max_len = self.model_config.max_model_len
        if keep == -1:
            keep = max_len
        elif keep > max_len:
            raise ValueError(TRUNCATION_TOO_LARGE)
        return prompt_ids[-keep:]

    def _bad_words_token_ids(self, bad_words: Optional[list[str]]) -> list[list[int]]:
        """Each bad word as the model would spell it at the start of a text and after a space
        (byte-level BPE and SentencePiece spell the two differently)."""
        if not bad_words:
            return []
        if self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer, and this engine has none (skip_tokenizer_init).")
        spellings: list[list[int]] = []
        for word in bad_words:
            for text in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in spellings:
                    spellings.append(ids)
        return spellings

    def _check_input_length(self, prompt_len: int) -> None:
        max_len = self.model_config.max_model_len
        if prompt_len > max_len:   # vLLM's words for an embedding input
            raise ValueError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                             f"{prompt_len} tokens in the input for embedding generation. Please reduce the "
                             f"length of the input prompt.")

    def _check_lengths(self, prompt_len: int, params: SamplingParams) -> None:
        max_len = self.model_config.max_model_len
        if prompt_len + 1 > max_len:
            raise ValueError(
                f"The prompt is {prompt_len} tokens long, and this model's maximum context length is "
                f"{max_len} tokens, which leaves no room to generate: shorten the prompt.")
        if params.max_tokens is None:
            params.max_tokens = max_len - prompt_len
        elif prompt_len + params.max_tokens > max_len:
            raise ValueError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the prompt, "
                f"{params.max_tokens} for the completion). Please reduce the length of the prompt "
                f"or the completion (max_tokens).")
        width = params.best_of
        sched = self.scheduler_config
        if width > sched.max_num_seqs or width > sched.max_num_batched_tokens:
            raise ValueError(
                f"best_of={width} needs that many sequences in one step, but max_num_seqs is "
                f"{sched.max_num_seqs} and max_num_batched_tokens is {sched.max_num_batched_tokens}.")
        # Worst case alone in the cache: the prompt once, plus each sample's own blocks for
        # its output (the prompt's partial last block copied on write).
        bm = self.block_manager
        if width == 1:
            needed = bm.blocks_for_tokens(prompt_len + params.max_tokens)
        else:
            needed = bm.blocks_for_tokens(prompt_len) + width * (bm.blocks_for_tokens(params.max_tokens) + 1)
        if needed > bm.num_blocks:
            raise ValueError(
                f"The request needs up to {needed} KV cache blocks of {bm.block_size} tokens "
                f"({prompt_len} prompt tokens, max_tokens={params.max_tokens}, best_of={width}), but "
                f"the cache has only {bm.num_blocks}: lower max_tokens or raise the KV cache size.")


def _eos_token_ids(tokenizer, model_config: ModelConfig) -> set[int]:
    """The tokenizer's EOS and the generation config's EOS ids (models may declare several);
    with no tokenizer, the model config's EOS where the generation config names none."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(model_config.hf_config, "eos_token_id", None)
    try:
        from transformers import GenerationConfig
        eos = GenerationConfig.from_pretrained(model_config.model_path).eos_token_id
    except (OSError, ValueError):
        eos = config_eos
    if eos is None and tokenizer is None:  # nothing else names an EOS: the model config's
        eos = config_eos
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return ids
