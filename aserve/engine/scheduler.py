"""Continuous batching: each step grants tokens to requests under a token and sequence budget.

There is no prefill or decode phase. A sequence owes the model num_tokens - num_computed_tokens
tokens; a step grants as many as the budget allows (a long prompt is thus chunked over steps)
and samples the sequence when the grant reaches its end. Running requests are served first,
oldest first; when the KV cache runs out of blocks, the most recently arrived running request
is preempted by recompute: its blocks are freed and it waits again, first in line.

With prefix caching, a request that starts (or restarts after a preemption) takes the cached
blocks of its longest cached prefix: its num_computed_tokens starts past them, and nothing
else here knows the difference.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from aserve.config import SchedulerConfig
from aserve.engine.block_manager import BlockManager
from aserve.engine.request import Request, RequestStatus, Sequence


class ScheduledSequence(NamedTuple):
    # A named tuple, not a dataclass: one is made per running sequence per step.
    request: Request
    seq: Sequence
    start: int            # seq.num_computed_tokens when scheduled: the first token computed now
    num_new_tokens: int
    samples: bool         # the grant reaches the sequence's end: its last logits are sampled


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]   # sequences of one request are adjacent
    block_copies: list[tuple[int, int]]  # copy-on-write (src, dst) pairs, done before the model runs
    preempted: list[Request]
    num_batched_tokens: int
    # Every sequence computes one token and samples it: a plain decode step.
    decode_only: bool = False

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []   # sorted by arrival_order
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # ---------------------------------------------------------------- queue
    def add_request(self, request: Request) -> None:
        request.arrival_order = next(self._arrivals)
        self.waiting.append(request)

    def remove_request(self, request: Request, keep_cached: bool = True) -> None:
        """Take a finished or aborted request out of the queues and free all its blocks
        (keep_cached=False: their content is not trusted, e.g. the step computing it failed)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        for seq in request.seqs:
            self.block_manager.free(seq.seq_id, keep_cached)
        request.status = RequestStatus.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        copies: list[tuple[int, int]] = []
        preempted: list[Request] = []

        bm = self.block_manager
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            seqs = request.seqs
            if len(seqs) == 1:
                # The common case, kept cheap: one sequence decoding its next token into a
                # block it already owns alone (15 steps in 16 at block size 16).
                seq = seqs[0]
                start = seq.num_computed_tokens
                if (seq.finish_reason is None and len(seq.token_ids) - start == 1
                        and bm.has_own_slot(seq.seq_id, start)):
                    scheduled.append(ScheduledSequence(request, seq, start, 1, True))
                    budget -= 1
                    index += 1
                    continue
            seqs = request.live_seqs
            grants = self._grants(seqs, budget)
            if not any(grants):
                index += 1
                continue
            while not self._fits(seqs, grants):
                victim = self.running.pop()   # the latest arrival; never one already scheduled
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                budget -= self._take(request, seqs, grants, scheduled, copies)
                index += 1
                continue
            break  # the request preempted itself: nothing later is running either

        # Sequences running or about to (a best_of request runs best_of); each is at least one,
        # so a full running list admits nothing and needs no sum over it, every step of a queue.
        admit = self.waiting and len(self.running) < self.config.max_num_seqs
        width = sum(r.params.best_of for r in self.running) if admit else 0
        while admit and self.waiting and budget > 0 and not preempted:
            request = self.waiting[0]
            if width + request.params.best_of > self.config.max_num_seqs:
                break
            seqs = request.live_seqs
            self._take_cached_prefix(request, seqs)
            grants = self._grants(seqs, budget)
            if not any(grants) or not self._fits(seqs, grants):
                self._give_back_cached_prefix(seqs)   # it tries again next step
                break  # waiting requests never preempt running ones
            if request.num_cached_tokens is None:   # as vLLM: what its first admission found
                request.num_cached_tokens = seqs[0].num_computed_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.metrics.first_scheduled_time is None:   # its queue time ends here
                request.metrics.first_scheduled_time = time.monotonic()
            bisect.insort(self.running, request, key=lambda r: r.arrival_order)
            width += request.params.best_of
            budget -= self._take(request, seqs, grants, scheduled, copies)

        num_tokens = self.config.max_num_batched_tokens - budget
        decode_only = num_tokens == len(scheduled) and all(item.samples for item in scheduled)
        return SchedulerOutput(scheduled, copies, preempted, num_tokens, decode_only)

    def _take_cached_prefix(self, request: Request, seqs: list[Sequence]) -> None:
        """Start each sequence of a request being admitted on its longest cached prefix.
        Prompt logprobs need every prompt position's logits, so such a request computes its
        whole prompt (as in vLLM)."""
        bm = self.block_manager
        if bm.prefix_cache is None or request.prompt_logprobs is not None:
            return
        for seq in seqs:  # a waiting request holds no blocks (a preempted one freed them)
            seq.num_computed_tokens = bm.take_cached_prefix(seq.seq_id, seq.token_ids)

    def _give_back_cached_prefix(self, seqs: list[Sequence]) -> None:
        if self.block_manager.prefix_cache is None:
            return
        for seq in seqs:
            self.block_manager.free(seq.seq_id)
            seq.num_computed_tokens = 0

    @staticmethod
    def _grants(seqs: list[Sequence], budget: int) -> list[int]:
        """Tokens granted to each live sequence of a request.

        The sequences of a multi-sequence request (samples or beams re-computed after a
        preemption) are sampled in the same step, because a beam search step compares them
        all: unless every one can finish its tokens now, each stops one short of its end.
        """
        if len(seqs) == 1:   # the common case, kept cheap: this runs per request per step
            seq = seqs[0]
            return [min(len(seq.token_ids) - seq.num_computed_tokens, budget)]
        remaining = [s.num_tokens - s.num_computed_tokens for s in seqs]
        if sum(remaining) <= budget:
            return remaining
        grants = []
        for owed in remaining:
            grant = min(max(owed - 1, 0), budget)
            grants.append(grant)
            budget -= grant
        return grants

    def _fits(self, seqs: list[Sequence], grants: list[int]) -> bool:
        bm = self.block_manager
        needed = 0
        for seq, grant in zip(seqs, grants):
            if grant:
                needed += bm.num_blocks_needed(seq.seq_id, seq.num_computed_tokens, grant)
        return needed <= bm.num_free_blocks

    def _take(self, request: Request, seqs: list[Sequence], grants: list[int], scheduled: list,
              copies: list) -> int:
        for seq, grant in zip(seqs, grants):
            if not grant:
                continue
            start = seq.num_computed_tokens
            new_copies = self.block_manager.allocate(seq.seq_id, start, grant)
            if new_copies:
                copies.extend(new_copies)
            samples = start + grant == len(seq.token_ids)
            scheduled.append(ScheduledSequence(request, seq, start, grant, samples))
        return sum(grants)

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: forget the KV cache, keep the tokens, wait first in line."""
        for seq in request.seqs:
            self.block_manager.free(seq.seq_id)
            seq.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
