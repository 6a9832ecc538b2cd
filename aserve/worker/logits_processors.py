"""Batched logits processing for the sampler: allowed tokens, bias, min_tokens, bad words,
penalties, top-k/top-p/min-p.

Every function works on the logits' own device with whole-batch tensor ops; the only Python
loops build index lists from the per-request token lists, which live in Python on the engine side.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from aserve.worker.sampler import SamplingMetadata

_NEG_INF = float("-inf")


def apply_logits_processors(logits: torch.Tensor, metadata: "SamplingMetadata") -> torch.Tensor:
    """allowed_token_ids, logit_bias, min_tokens, bad_words, then repetition/frequency/presence
    penalties (vLLM's order).

    Returns a new tensor when anything applies, else `logits` itself: the caller's tensor is never
    modified (the engine may reuse it for prompt logprobs or beams), so callers must not modify
    the result in place without knowing which case they got.
    """
    if not metadata.any_processors:
        return logits
    logits = logits.clone()
    if metadata.any_allowed_token_ids:
        apply_allowed_token_ids(logits, [p.allowed_token_ids for p in metadata.params])
    if metadata.any_logit_bias:
        apply_logit_bias(logits, [p.logit_bias for p in metadata.params])
    if metadata.any_min_tokens:
        apply_min_tokens(logits, [p.min_tokens for p in metadata.params],
                         [p.all_stop_token_ids for p in metadata.params], metadata.output_token_ids)
    if metadata.any_bad_words:
        apply_bad_words(logits, [p.bad_words_token_ids for p in metadata.params], metadata.output_token_ids)
    if metadata.any_penalties:
        params = metadata.params
        rows = [i for i, p in enumerate(params) if p.needs_penalties]
        args = ([metadata.prompt_token_ids[i] for i in rows], [metadata.output_token_ids[i] for i in rows],
                [params[i].repetition_penalty for i in rows], [params[i].frequency_penalty for i in rows],
                [params[i].presence_penalty for i in rows])
        if len(rows) == len(params):
            logits = apply_penalties(logits, *args)
        else:
            # Only penalised rows pay for the [rows, V] count tensors (V may be ~150k).
            index = torch.tensor(rows, device=logits.device)
            logits.index_copy_(0, index, apply_penalties(logits.index_select(0, index), *args))
    return logits


def apply_logit_bias(logits: torch.Tensor, logit_biases: Sequence[Optional[dict[int, float]]]) -> None:
    """Adds each row's bias in place. Ids outside the vocabulary are skipped: validating them
    against the tokenizer is the engine's job at the door, and one bad id must not fail the batch."""
    vocab_size = logits.shape[1]
    rows, cols, values = [], [], []
    for i, bias in enumerate(logit_biases):
        for token_id, value in (bias or {}).items():
            if 0 <= token_id < vocab_size:
                rows.append(i)
                cols.append(token_id)
                values.append(value)
    if rows:
        device = logits.device
        logits.index_put_((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                          torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)


def apply_allowed_token_ids(logits: torch.Tensor, allowed: Sequence[Optional[Sequence[int]]]) -> None:
    """In place: rows with an allowed list keep those logits and get -inf everywhere else.
    Only index lists cross to the device (no [rows, V] mask is built on the host)."""
    vocab_size, device = logits.shape[1], logits.device
    rows = [i for i, ids in enumerate(allowed) if ids is not None]
    keep_rows, keep_cols = [], []
    for i in rows:
        for token_id in allowed[i]:
            if 0 <= token_id < vocab_size:
                keep_rows.append(i)
                keep_cols.append(token_id)
    keep = (torch.tensor(keep_rows, dtype=torch.long, device=device),
            torch.tensor(keep_cols, dtype=torch.long, device=device))
    kept = logits[keep]
    logits[torch.tensor(rows, device=device)] = _NEG_INF
    logits[keep] = kept


def apply_bad_words(logits: torch.Tensor, bad_words_token_ids: Sequence[Sequence[Sequence[int]]],
                    output_token_ids: Sequence[Sequence[int]]) -> None:
    """In place: a word's last token gets -inf whenever the row's output ends with the word's
    other tokens (a one-token word is banned outright), so no bad word is ever completed."""
    vocab_size = logits.shape[1]
    rows, cols = [], []
    for i, (words, output) in enumerate(zip(bad_words_token_ids, output_token_ids)):
        for word in words:
            prefix = len(word) - 1
            if prefix > len(output) or (prefix and list(output[-prefix:]) != list(word[:-1])):
                continue
            if 0 <= word[-1] < vocab_size:
                rows.append(i)
                cols.append(word[-1])
    if rows:
        device = logits.device
        logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = _NEG_INF


def apply_min_tokens(logits: torch.Tensor, min_tokens: Sequence[int], stop_token_ids: Sequence[set[int]],
                     output_token_ids: Sequence[Sequence[int]]) -> None:
    """In place: while a row has fewer than min_tokens outputs, its stop ids (EOS included) get -inf."""
    vocab_size = logits.shape[1]
    rows, cols = [], []
    for i, (minimum, stops, output) in enumerate(zip(min_tokens, stop_token_ids, output_token_ids)):
        if len(output) < minimum:
            for token_id in stops:
                if 0 <= token_id < vocab_size:
                    rows.append(i)
                    cols.append(token_id)
    if rows:
        device = logits.device
        logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = _NEG_INF


def apply_penalties(logits: torch.Tensor, prompt_token_ids: Sequence[Sequence[int]],
                    output_token_ids: Sequence[Sequence[int]], repetition_penalties: Sequence[float],
                    frequency_penalties: Sequence[float], presence_penalties: Sequence[float]) -> torch.Tensor:
    """Returns penalised logits (a new tensor).

    repetition (HF/vLLM): tokens seen in prompt or output: logit > 0 -> logit / p, else logit * p.
    frequency and presence (OpenAI/vLLM): output tokens only: logit -= f * count + pr * (count > 0).
    A neutral penalty (1.0 / 0.0) leaves a row bit-exact, so rows need no masking by kind.
    """
    num_rows, vocab_size = logits.shape
    device, dtype = logits.device, logits.dtype
    output_counts = _token_counts(output_token_ids, vocab_size, device, dtype)
    if any(p != 1.0 for p in repetition_penalties):
        # Prompts are scanned only for rows that use the repetition penalty (they may be long).
        prompts = [ids if p != 1.0 else () for ids, p in zip(prompt_token_ids, repetition_penalties)]
        seen = (_token_counts(prompts, vocab_size, device, dtype) > 0) | (output_counts > 0)
        rep = torch.tensor(repetition_penalties, dtype=dtype, device=device).unsqueeze(1)
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if any(f != 0.0 for f in frequency_penalties):
        freq = torch.tensor(frequency_penalties, dtype=dtype, device=device).unsqueeze(1)
        logits = logits - freq * output_counts
    if any(p != 0.0 for p in presence_penalties):
        presence = torch.tensor(presence_penalties, dtype=dtype, device=device).unsqueeze(1)
        logits = logits - presence * (output_counts > 0).to(dtype)
    return logits


def _token_counts(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """[rows, V] occurrence counts, via one flat index tensor and one scatter_add.

    numpy flattens the Python lists about 10x faster than torch.tensor on nested lists (this runs
    every step over whole prompts). Ids outside the vocabulary go to an extra column V, dropped.
    Counting adds 1.0s, exact in any order, so the GPU's atomic adds stay deterministic.
    """
    num_rows = len(token_ids)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=dtype, device=device)
    lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=num_rows)
    total = int(lengths.sum())
    if total:
        ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=total)
        rows = np.repeat(np.arange(num_rows, dtype=np.int64), lengths)
        flat = torch.from_numpy(rows * (vocab_size + 1) + np.clip(ids, 0, vocab_size)).to(device)
        counts.view(-1).scatter_add_(0, flat, torch.ones(total, dtype=dtype, device=device))
    return counts[:, :vocab_size]


def apply_top_k_top_p(logits: torch.Tensor, top_k: Optional[Sequence[int]],
                      top_p: Optional[Sequence[float]]) -> torch.Tensor:
    """Masks (in place, and returns) tokens outside each row's top-k and then top-p set with -inf.

    top_k -1 and top_p 1.0 mean off. Ties with the k-th logit are kept (a threshold, not a count).
    top_p keeps the smallest prefix of the sorted distribution whose mass reaches p, renormalised
    after top-k; the first token is always kept because the mass before it is 0 < p.
    """
    num_rows, vocab_size = logits.shape
    device = logits.device
    if top_p is None or all(p >= 1.0 for p in top_p):
        if top_k is None:
            return logits
        # Without top-p a partial topk over the largest k is enough: no full-vocabulary sort.
        max_k = min(max(top_k), vocab_size)
        values = logits.topk(max_k, dim=-1).values
        return logits.masked_fill_(logits < _kth_threshold(values, top_k, max_k), _NEG_INF)
    # When every row has a top-k, top-p only ever looks inside the largest max_k logits: a partial
    # topk replaces the full-vocabulary sort (the usual top_k=50, top_p=0.9 case).
    max_k = min(max(top_k), vocab_size) if top_k is not None and all(k > 0 for k in top_k) else vocab_size
    if max_k < vocab_size:
        sorted_logits, order = logits.topk(max_k, dim=-1)
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        threshold = _kth_threshold(sorted_logits, top_k, max_k)
        sorted_logits.masked_fill_(sorted_logits < threshold, _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows with top_p == 1 get a bound no rounding of the cumsum can reach, so they keep everything.
    bound = torch.tensor([p if p < 1.0 else 2.0 for p in top_p], dtype=probs.dtype, device=device)
    sorted_logits.masked_fill_(mass_before >= bound.unsqueeze(1), _NEG_INF)
    if max_k < vocab_size:
        return logits.fill_(_NEG_INF).scatter_(1, order, sorted_logits)
    return logits.scatter_(1, order, sorted_logits)


def _kth_threshold(sorted_desc: torch.Tensor, top_k: Sequence[int], max_k: int) -> torch.Tensor:
    """Per row, the k-th largest logit ([rows, 1]); -inf for rows with top-k off."""
    device = sorted_desc.device
    index = torch.tensor([min(k, max_k) - 1 if k > 0 else 0 for k in top_k], device=device)
    threshold = sorted_desc.gather(1, index.unsqueeze(1))
    off = torch.tensor([k <= 0 for k in top_k], device=device).unsqueeze(1)
    return threshold.masked_fill_(off, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Masks (in place, and returns) tokens with prob < min_p * max prob.

    Done in logit space, prob_i / prob_max = exp(l_i - l_max), so no softmax is needed; min_p 0
    gives a -inf bound and keeps everything.
    """
    bound = torch.tensor(min_p, dtype=logits.dtype, device=logits.device).log().unsqueeze(1)
    threshold = logits.max(dim=-1, keepdim=True).values + bound
    return logits.masked_fill_(logits < threshold, _NEG_INF)
