"""Which logits a step needs and for what: sampled rows, beam rows and prompt-logprob rows.

The model computes logits only for these token positions (the lm_head over every prompt
token would dominate a prefill). The spans tell the engine which rows belong to which
scheduled sequence when it applies the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from aserve.engine.scheduler import SchedulerOutput
from aserve.worker.model_runner import PromptLogprobRows, RowPlan
from aserve.worker.sampler import SamplingMetadata


@dataclass(slots=True)
class RowSpan:
    """The rows of one scheduled sequence (-1: none)."""

    sample_start: int = -1
    sample_count: int = 0     # best_of on the first sample of a best_of > 1 request, else 1
    beam_first: int = -1      # first beam row of the sequence's request
    beam_row: int = -1
    beam_last: bool = False   # the request's last beam: the beam step runs after it
    prompt_group: int = -1
    prompt_first: int = -1    # position whose logits score prompt token prompt_first + 1


@dataclass(frozen=True)
class PlannedRows:
    row_plan: RowPlan
    spans: list[RowSpan]
    # Nothing in it changes from step to step while the same sequences keep decoding.
    reusable: bool = False


class RowPlanner:
    """plan_rows, remembering the last plan of a plain decode step: the next step usually
    decodes the same sequences, and then its plan is the same. Planning row by row was a
    third of the engine's host time per step at 256 running requests."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._planned: Optional[PlannedRows] = None

    def plan(self, sched: SchedulerOutput) -> PlannedRows:
        key = tuple([item.seq.seq_id for item in sched.scheduled]) if sched.decode_only else None
        if key is not None and key == self._key:
            return self._planned
        planned = plan_rows(sched)
        self._key, self._planned = (key, planned) if planned.reusable else (None, None)
        return planned


# The output ids of a row whose sampling reads none (no penalties, min_tokens or bad_words).
_NO_OUTPUT_IDS: list[int] = []


def plan_rows(sched: SchedulerOutput) -> PlannedRows:
    sample_idx: list[int] = []
    beam_idx: list[int] = []
    prompt_idx: list[int] = []
    groups: list[PromptLogprobRows] = []
    params, generators, prompt_ids, output_ids, wants_lp, matchers = [], [], [], [], [], []
    spans: list[RowSpan] = []
    beam_first: dict[str, int] = {}
    offset = 0
    scheduled = sched.scheduled
    # Reusable: a decode step whose rows read nothing that changes per step (no output ids
    # for penalties or min_tokens, no forks, beams or prompt logprobs).
    reusable = sched.decode_only
    for i, item in enumerate(scheduled):
        request, seq, n = item.request, item.seq, item.num_new_tokens
        if request.plain_sampling:   # most rows: the general path's checks, known at creation
            if item.samples:
                spans.append(RowSpan(len(sample_idx), 1))
                sample_idx.append(offset + n - 1)
                params.append(request.params)
                generators.append(request.generator)
                prompt_ids.append(request.prompt_token_ids)
                output_ids.append(_NO_OUTPUT_IDS)
                wants_lp.append(request.wants_sample_logprob)
                matchers.append(None)
            else:
                spans.append(RowSpan())
            offset += n
            continue
        span = RowSpan()
        if request.wants_prompt_logprobs:
            reusable = False
            # Position p's logits score prompt token p + 1; rows already recorded are skipped.
            first = max(item.start, len(request.prompt_logprobs) - 1)
            stop = min(item.start + n, seq.num_prompt_tokens - 1)
            if first < stop:
                span.prompt_group, span.prompt_first = len(groups), first
                groups.append(PromptLogprobRows(request.params.prompt_logprobs,
                                                request.prompt_token_ids[first + 1:stop + 1],
                                                request.params.prompt_logprobs_temperature or 1.0))
                prompt_idx.extend(range(offset + first - item.start, offset + stop - item.start))
        if item.samples:
            last = offset + n - 1
            if request.beam_state is not None:
                reusable = False
                span.beam_first = beam_first.setdefault(request.request_id, len(beam_idx))
                span.beam_row = len(beam_idx)
                span.beam_last = i + 1 == len(scheduled) or scheduled[i + 1].request is not request
                beam_idx.append(last)
            else:
                p = request.params
                count = p.best_of if request.needs_fork else 1
                if count > 1 or p.reads_output_history or seq.matcher is not None:
                    reusable = False
                span.sample_start, span.sample_count = len(sample_idx), count
                sample_idx.extend([last] * count)
                # Output ids are only copied where penalties, min_tokens or bad_words read them.
                outputs = seq.output_token_ids if p.reads_output_history else []
                for _ in range(count):
                    params.append(p)
                    generators.append(request.generator)
                    prompt_ids.append(request.prompt_token_ids)
                    output_ids.append(outputs)
                    wants_lp.append(request.wants_sample_logprob)
                    matchers.append(seq.matcher if seq.grammar_after is None else None)
        spans.append(span)
        offset += n
    constrained = any(m is not None for m in matchers)
    metadata = (SamplingMetadata.build(params, generators, prompt_ids, output_ids,
                                       matchers if constrained else None)
                if params else None)
    row_plan = RowPlan(
        logits_indices=sample_idx + beam_idx + prompt_idx,
        num_sample_rows=len(sample_idx), num_beam_rows=len(beam_idx),
        sampling_metadata=metadata, needs_sampled_logprob=wants_lp,
        prompt_logprob_groups=groups)
    return PlannedRows(row_plan, spans, reusable)
