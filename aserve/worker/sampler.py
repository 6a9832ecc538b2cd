"""The sampler: one batched step from logits [N, V] to one token id (and logprobs) per row.

Order (vLLM's): allowed_token_ids, logit_bias, min_tokens, bad_words, penalties -> greedy rows take the argmax; random rows
divide by temperature, apply top-k, top-p, min-p and sample by the Gumbel-max trick
(worker/gumbel.py), their noise hashed from a key drawn from the row's own generator, so seeded
requests reproduce in any batch. Without top-k, top-p and min-p a step's rows, greedy and random
alike, are sampled in one pass over the logits in the model's dtype (one kernel on a GPU).
Returned logprobs describe the raw model distribution (log_softmax before any processing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from aserve.cuda.host_copy import to_device
from aserve.logprobs import FlatLogprobs
from aserve.sampling_params import SamplingParams
from aserve.structured_output.bitmask import masked_logits
from aserve.worker.gumbel import greedy_ids, sample_gumbel_max
from aserve.worker.logits_processors import apply_logits_processors, apply_min_p, apply_top_k_top_p


@dataclass(frozen=True)
class SamplingMetadata:
    """Per-row sampling inputs of one step, plus batch flags that let the sampler skip work.

    The flags are derived in __post_init__, so direct construction and build() agree.
    """

    params: list[SamplingParams]
    generators: list[Optional[torch.Generator]]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    # Per row: the grammar matcher of a structured-output sequence, else None.
    matchers: Optional[list] = None
    all_greedy: bool = field(init=False)
    all_random: bool = field(init=False)
    any_penalties: bool = field(init=False)
    any_logit_bias: bool = field(init=False)
    any_min_tokens: bool = field(init=False)
    any_allowed_token_ids: bool = field(init=False)
    any_bad_words: bool = field(init=False)
    any_processors: bool = field(init=False)  # any of the five above: apply_logits_processors works
    # The next three only look at random rows: greedy rows never use them.
    any_top_k: bool = field(init=False)
    any_top_p: bool = field(init=False)
    any_min_p: bool = field(init=False)
    max_num_logprobs: Optional[int] = field(init=False)  # None: no row asks, skip log_softmax
    grammar_rows: list[int] = field(init=False)           # rows with a matcher
    random_rows: list[int] = field(init=False)            # rows that are not greedy
    # Per-row tensors on a device, made at their first use (see _on): (name, device) -> tensor.
    _device_tensors: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = self.params
        assert len(self.generators) == len(params) == len(self.prompt_token_ids) == len(self.output_token_ids)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        random = [params[i] for i in random_rows]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        flags = dict(
            all_greedy=not random,
            all_random=len(random) == len(params),
            any_penalties=any(p.needs_penalties for p in params),
            any_logit_bias=any(p.logit_bias for p in params),
            any_min_tokens=any(p.all_stop_token_ids and len(out) < p.min_tokens
                               for p, out in zip(params, self.output_token_ids)),
            any_allowed_token_ids=any(p.allowed_token_ids is not None for p in params),
            any_bad_words=any(p.bad_words_token_ids for p in params),
            any_top_k=any(p.top_k > 0 for p in random),
            any_top_p=any(p.top_p < 1.0 for p in random),
            any_min_p=any(p.min_p > 0.0 for p in random),
            max_num_logprobs=max(asked) if asked else None,
            grammar_rows=[i for i, m in enumerate(self.matchers) if m is not None] if self.matchers else [],
            random_rows=random_rows,
            _device_tensors={},
        )
        flags["any_processors"] = (flags["any_penalties"] or flags["any_logit_bias"] or flags["any_min_tokens"]
                                   or flags["any_allowed_token_ids"] or flags["any_bad_words"])
        for name, value in flags.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    # The rows' sampling inputs as device tensors. A decode step's metadata serves every step
    # while the same sequences decode (engine/row_planner.py reuses the step's plan), so each is
    # built and copied to the device once, not per step.
    def temperatures(self, device: torch.device) -> torch.Tensor:
        """float32 [rows]: each row's temperature, 0 for a greedy row."""
        return self._on("temperatures", device, torch.float32,
                        lambda: [0.0 if p.is_greedy else p.temperature for p in self.params])

    def random_row_index(self, device: torch.device) -> torch.Tensor:
        """int64: the random (not greedy) rows."""
        return self._on("random_rows", device, torch.long, lambda: self.random_rows)

    def random_temperatures(self, device: torch.device) -> torch.Tensor:
        """float32: the random rows' temperatures, in random_rows' order."""
        return self._on("random_temperatures", device, torch.float32,
                        lambda: [self.params[i].temperature for i in self.random_rows])

    def _on(self, name: str, device: torch.device, dtype: torch.dtype, values) -> torch.Tensor:
        tensor = self._device_tensors.get((name, device))
        if tensor is None:
            tensor = self._device_tensors[(name, device)] = to_device(values(), dtype, device)
        return tensor

    @staticmethod
    def build(params: list[SamplingParams], generators: list[Optional[torch.Generator]],
              prompt_token_ids: list[list[int]], output_token_ids: list[list[int]],
              matchers: Optional[list] = None) -> "SamplingMetadata":
        return SamplingMetadata(params, generators, prompt_token_ids, output_token_ids, matchers)


@dataclass
class SamplerOutput:
    """One token per row; logprobs one position per row (None for rows that did not ask; None
    if none asked)."""

    sampled_token_ids: list[int]
    logprobs: Optional[FlatLogprobs]


class Sampler:
    """Turns a step's logits into token ids; stateless except for the generator of unseeded rows."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[tuple[str, int], torch.Generator] = {}  # one per device, made lazily

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        num_rows = logits.shape[0]
        assert num_rows == len(metadata.params)
        if num_rows == 0:
            return SamplerOutput([], None)
        logits = logits.float()  # same tensor when already float32: nothing below writes into it
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        sampled = self._sample_processed(logits, metadata)
        if raw_logprobs is None:
            return SamplerOutput(sampled.tolist(), None)
        packed = _pack_logprobs(raw_logprobs, sampled, min(metadata.max_num_logprobs, logits.shape[1]))
        host = packed.cpu().numpy()  # the step's single device -> host transfer
        return SamplerOutput(host[:, 0].astype(np.int64).tolist(),
                             _unpack_logprobs(host, [p.logprobs for p in metadata.params]))

    def sample_ids(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """The sampled ids as a device tensor, nothing copied to the host (async scheduling:
        the next step is launched before these ids are read). logits may be in the model's
        dtype: the one-pass sampling reads them as they are."""
        assert metadata.max_num_logprobs is None
        return self._sample_processed(logits, metadata)

    def _sample_processed(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        if metadata.grammar_rows or metadata.any_processors:
            logits = logits.float()   # the processors work in float32 (a copy: the caller's stays)
        processed = apply_logits_processors(logits, metadata)
        if metadata.grammar_rows:  # a new tensor: the caller's raw logits stay as they are
            rows = metadata.grammar_rows
            processed = masked_logits(processed, rows, [metadata.matchers[i] for i in rows])
        if metadata.all_greedy:
            return greedy_ids(processed)  # the common fast path: no noise
        return self._sample(processed, metadata)

    def _sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        params, generators = metadata.params, metadata.generators
        device = logits.device
        random_rows = None if metadata.all_random else metadata.random_rows
        if not (metadata.any_top_k or metadata.any_top_p or metadata.any_min_p):
            # Greedy rows (temperature 0) and random rows in one pass over the logits.
            if random_rows is None:
                keys = self._row_keys(generators, device)
            else:
                keys = torch.zeros(len(params), dtype=torch.long, device=device)
                keys[metadata.random_row_index(device)] = self._row_keys(
                    [generators[i] for i in random_rows], device)
            return sample_gumbel_max(logits, metadata.temperatures(device), keys)
        logits = logits.float()
        greedy = None
        if random_rows is not None:
            # Only random rows go through temperature, filtering and noise.
            greedy = greedy_ids(logits)
            index = metadata.random_row_index(device)
            logits = logits.index_select(0, index)
            params = [params[i] for i in random_rows]
            generators = [generators[i] for i in random_rows]
            temperature = metadata.random_temperatures(device)
        else:
            temperature = metadata.temperatures(device)
        logits = logits / temperature.unsqueeze(1)  # a new tensor: the filters below may write in place
        if metadata.any_top_k or metadata.any_top_p:
            logits = apply_top_k_top_p(logits, [p.top_k for p in params] if metadata.any_top_k else None,
                                       [p.top_p for p in params] if metadata.any_top_p else None)
        if metadata.any_min_p:
            logits = apply_min_p(logits, [p.min_p for p in params])
        ones = torch.ones(len(params), dtype=torch.float32, device=device)  # already divided by T
        sampled = sample_gumbel_max(logits, ones, self._row_keys(generators, device))
        if greedy is None:
            return sampled
        return greedy.index_copy_(0, index, sampled)

    def _row_keys(self, generators: Sequence[Optional[torch.Generator]], device: torch.device) -> torch.Tensor:
        """int64 [rows]: each row's noise key, drawn from its generator (the sampler's own for
        None). Seeded rows draw in row order, so n>1 rows sharing one generator draw in turn,
        and each draw is one value of its own stream whatever the batch around it."""
        keys = torch.empty(len(generators), dtype=torch.long, device=device)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if len(unseeded) == len(generators):
            return keys.random_(generator=self._generator(device))
        if unseeded:
            draws = torch.empty(len(unseeded), dtype=torch.long, device=device).random_(generator=self._generator(device))
            keys[to_device(unseeded, torch.long, device)] = draws
        for i, g in enumerate(generators):
            if g is None:
                continue
            if _same_device(g.device, device):
                keys[i:i + 1].random_(generator=g)
            else:
                keys[i:i + 1].copy_(torch.empty(1, dtype=torch.long, device=g.device).random_(generator=g))
        return keys

    def reset(self) -> None:
        """Start the unseeded rows' stream again from the seed (after the start's warm-up steps,
        aserve/engine/step_warmup.py: a warmed engine samples what a fresh one does)."""
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        key = (device.type, device.index if device.index is not None else 0)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[key] = generator
        return generator


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def logprobs_for_tokens(logprobs: torch.Tensor, token_ids: list[int],
                        num_top: Union[int, Sequence[int]]) -> FlatLogprobs:
    """Per row i of log_softmax-ed logprobs [N, V], one position: the top num_top tokens plus
    token_ids[i].

    Each Logprob has rank = 1 + the number of tokens with a strictly greater logprob, so a
    dict holds num_top or num_top + 1 entries. num_top may also be a list, one count per row.
    Used for sample logprobs and for prompt logprobs (token_ids = the next prompt tokens).
    """
    num_rows, vocab_size = logprobs.shape
    tops = [num_top] * num_rows if isinstance(num_top, int) else list(num_top)
    assert len(token_ids) == num_rows == len(tops)
    if num_rows == 0:
        return FlatLogprobs()
    tokens = torch.tensor(token_ids, dtype=torch.long, device=logprobs.device)
    packed = _pack_logprobs(logprobs.float(), tokens, min(max(tops), vocab_size))
    return _unpack_logprobs(packed.cpu().numpy(), tops)


def _pack_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> torch.Tensor:
    """[N, 3 + 3 * num_top] float64: token id, its logprob, its rank, then top ids, logprobs, ranks.

    One float64 tensor so the host gets everything in one transfer; ids and ranks (< 2**53) and
    float32 logprobs are exact in float64.
    """
    chosen = token_ids.unsqueeze(1)
    chosen_logprob = logprobs.gather(1, chosen)
    chosen_rank = (logprobs > chosen_logprob).sum(dim=-1, keepdim=True) + 1
    columns = [chosen, chosen_logprob, chosen_rank]
    if num_top > 0:
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
        # Any token above the j-th top value is itself among the top j, so counting within the
        # [N, k, k] comparison gives the same rank as counting over the whole vocabulary.
        top_ranks = (top_logprobs.unsqueeze(1) > top_logprobs.unsqueeze(2)).sum(dim=-1) + 1
        columns += [top_ids, top_logprobs, top_ranks]
    return torch.cat([c.to(torch.float64) for c in columns], dim=1)


def _unpack_logprobs(packed: np.ndarray, num_tops: Sequence[Optional[int]]) -> FlatLogprobs:
    """One position per row of _pack_logprobs' output (on the host): the row's top k tokens (at
    most the packed num_top) in rank order, then its token unless among them; None for a row
    whose k is None. Built column-wise, with no object per candidate."""
    width = (packed.shape[1] - 3) // 3
    absent = np.array([k is None for k in num_tops], dtype=bool)
    num_kept = np.array([0 if k is None else min(k, width) for k in num_tops], dtype=np.int64)
    token = packed[:, 0]
    # Per row: the top ids, logprobs and ranks, then the row's token as a last column.
    token_ids = np.concatenate([packed[:, 3:3 + width], packed[:, 0:1]], axis=1)
    logprobs = np.concatenate([packed[:, 3 + width:3 + 2 * width], packed[:, 1:2]], axis=1)
    ranks = np.concatenate([packed[:, 3 + 2 * width:3 + 3 * width], packed[:, 2:3]], axis=1)
    in_top = np.arange(width)[None, :] < num_kept[:, None]
    token_in_top = ((token_ids[:, :width] == token[:, None]) & in_top).any(axis=1)
    keep = np.concatenate([in_top, (~absent & ~token_in_top)[:, None]], axis=1)  # absent rows: nothing
    # A boolean mask reads row by row: each row's candidates stay together and in order.
    return FlatLogprobs.from_columns(np.cumsum(keep.sum(axis=1)), absent, token_ids[keep].astype(np.int64),
                                     logprobs[keep], ranks[keep].astype(np.int64))
