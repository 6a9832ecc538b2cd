"""The state of one request and of each sequence (sample or beam) it generates.

A request starts with one sequence holding its prompt. When the prompt's logits are first
sampled with best_of > 1 (or a beam search expands), the sequence is forked: children share
the prompt's KV blocks through reference counts, so the prompt is computed once.
"""

from __future__ import annotations

import enum
import itertools
from typing import Optional

import torch

from aserve.logprobs import FlatLogprobs
from aserve.outputs import RequestMetrics
from aserve.sampling_params import RequestOutputKind, SamplingParams

_seq_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# is_finished runs several times per request per step: a module global is read in a third of
# the time an enum member is (the enum's class attribute lookup, ~60 ns on Python 3.11).
_FINISHED = RequestStatus.FINISHED


class Sequence:
    """One token stream: the prompt followed by what this sample or beam generated."""

    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "num_computed_tokens",
                 "cumulative_logprob", "logprobs", "detokenizer", "finish_reason",
                 "stop_reason", "output_index", "matcher", "grammar_after")

    def __init__(self, prompt_token_ids: list[int], detokenizer, want_logprobs: bool) -> None:
        self.seq_id = next(_seq_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.cumulative_logprob = 0.0
        self.logprobs: Optional[FlatLogprobs] = FlatLogprobs() if want_logprobs else None
        self.detokenizer = detokenizer
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.output_index = 0  # the CompletionOutput index this sequence reports as
        # Structured outputs: the grammar's state after this sequence's output (llguidance).
        self.matcher = None
        # A token the grammar waits for before it starts (StructuredOutputsParams.after_token_id):
        # until it is generated, the output is unconstrained and the matcher is not fed.
        self.grammar_after: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def fork(self) -> "Sequence":
        """A copy with a fresh id that continues from the same computed state."""
        child = Sequence.__new__(Sequence)
        child.seq_id = next(_seq_ids)
        child.token_ids = list(self.token_ids)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = None if self.logprobs is None else self.logprobs.copy()
        child.detokenizer = self.detokenizer.fork() if self.detokenizer is not None else None
        child.finish_reason = None
        child.stop_reason = None
        child.output_index = self.output_index
        child.matcher = self.matcher.deep_copy() if self.matcher is not None else None
        child.grammar_after = self.grammar_after
        return child


class Request:
    """A prompt, its sampling parameters and the sequences generated for it."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float, first_sequence: Sequence,
                 generator: Optional[torch.Generator]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_order = 0  # set by the scheduler: a later arrival is preempted first
        self.status = RequestStatus.WAITING
        self.seqs: list[Sequence] = [first_sequence]
        self.generator = generator
        self.prompt_logprobs: Optional[FlatLogprobs] = (
            FlatLogprobs([None]) if params.prompt_logprobs is not None else None)
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.beam_state = None  # BeamSearchState for use_beam_search requests
        # The final answer of a beam search, set when the search ends.
        self.beam_outputs: Optional[list] = None
        self.error: Optional[str] = None
        self.num_preemptions = 0
        # Prompt tokens found in the prefix cache when first admitted (None until then).
        self.num_cached_tokens: Optional[int] = None
        # Structured outputs: the matcher being made for it (the request waits for it).
        self.pending_matcher = None
        # runner="pooling": what the request asked (engine/pooling.py) and, once its prompt has
        # run, its last token's final hidden state.
        self.pooling_params = None
        self.pooled = None
        kind = params.output_kind
        # Whether outputs before the final one are reported: not under FINAL_ONLY; not for a
        # beam search, whose live beams are not prefixes of its answer; and not as deltas of a
        # best_of > n request, whose n best samples are known only at its end.
        self.reports_progress = (kind != RequestOutputKind.FINAL_ONLY and not params.use_beam_search
                                 and not (kind == RequestOutputKind.DELTA and params.best_of > params.n))
        # DELTA: per output index, the (tokens, characters, logprob positions) reported so far,
        # and the prompt logprob positions reported so far.
        self.reported: Optional[dict[int, tuple[int, int, int]]] = (
            {} if kind == RequestOutputKind.DELTA else None)
        self.reported_prompt_positions = 0
        # A plain sample row (row_planner.py's fast path): one sample a step, no beams, no
        # prompt logprobs, no grammar, nothing read from its output history.
        self.plain_sampling = (not params.use_beam_search and params.best_of == 1
                               and params.prompt_logprobs is None and params.structured_outputs is None
                               and not params.reads_output_history)
        self.wants_sample_logprob = params.logprobs is not None or params.best_of > params.n

    @property
    def live_seqs(self) -> list[Sequence]:
        seqs = self.seqs
        if len(seqs) == 1:   # the common case: no new list per request per step
            return seqs if seqs[0].finish_reason is None else []
        return [s for s in seqs if s.finish_reason is None]

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED

    @property
    def needs_fork(self) -> bool:
        """Whether the next sample is the first of a best_of > 1 request (one row, many draws)."""
        return (not self.params.use_beam_search and self.params.best_of > 1
                and len(self.seqs) == 1 and self.seqs[0].num_output_tokens == 0)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are still owed for some prompt positions (never recomputed twice)."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))
