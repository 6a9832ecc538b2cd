"""OutputProcessor: applies sampled tokens to sequences, decides when they stop, and reports.

It owns the end of a sequence's life: stop tokens, stop strings, max_tokens and the context
limit finish a sequence and free its blocks at once, so a finished sample never holds memory
while its siblings still run.
"""

from __future__ import annotations

import time
from typing import Optional

from aserve.engine.block_manager import BlockManager
from aserve.engine.beam_search import Beam
from aserve.engine.token_text import token_text_decoder
from aserve.engine.pooling import pooled_output
from aserve.engine.request import Request, Sequence
from aserve.logprobs import FlatLogprobs
from aserve.outputs import CompletionOutput, RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer, block_manager: BlockManager, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        # Token id -> text, for Logprob.decoded_token (None with no tokenizer: no text).
        self._decode = token_text_decoder(tokenizer) if tokenizer is not None else None

    # ---------------------------------------------------------------- sampling requests
    def fork_for_samples(self, request: Request) -> None:
        """First sample of a best_of > 1 request: one sequence becomes best_of sharing blocks."""
        parent = request.seqs[0]
        for index in range(1, request.params.best_of):
            child = parent.fork()
            child.output_index = index
            self.block_manager.fork(parent.seq_id, child.seq_id)
            request.seqs.append(child)

    def append_token(self, request: Request, seq: Sequence, token_id: int,
                     step_logprobs: Optional[FlatLogprobs], row: int, token_logprob: Optional[float]) -> None:
        """step_logprobs: the step's sample logprobs, a position per row; this token's is `row`."""
        params = request.params
        seq.token_ids.append(token_id)
        if seq.matcher is not None:
            if seq.grammar_after is None:
                _advance_grammar(seq.matcher, token_id)
            elif token_id == seq.grammar_after:
                seq.grammar_after = None   # the grammar starts with the next token
        if token_logprob is not None:
            seq.cumulative_logprob += token_logprob
        # A sequence keeps logprobs when its request asks, and then its row always has them (a
        # row whose sampling failed fails its request before its tokens are appended).
        if seq.logprobs is not None and step_logprobs is not None:
            seq.logprobs.append_row(step_logprobs, row, self._decode)
        num_output = len(seq.token_ids) - seq.num_prompt_tokens
        # min_tokens holds back every kind of stop, as vLLM does.
        may_stop = num_output >= params.min_tokens
        detokenizer = seq.detokenizer  # None with no tokenizer (skip_tokenizer_init): no text
        matched = detokenizer.append(token_id, check_stop=may_stop) if detokenizer is not None else None
        if may_stop:
            if token_id in params.all_stop_token_ids:
                # An EOS ends with no stop_reason (as vLLM); a user's stop token is reported.
                stop_reason = token_id if token_id in params.stop_token_ids else None
                self._finish(seq, "stop", stop_reason)
                return
            if matched is not None:
                self._finish(seq, "stop", matched)
                return
        if num_output >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length", None)
        elif seq.matcher is not None and seq.grammar_after is None and seq.matcher.is_stopped():
            self._finish(seq, "stop", None)   # the grammar is complete: it allows nothing more

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.detokenizer is not None:
            seq.detokenizer.finish()
        self.block_manager.free(seq.seq_id)

    def add_prompt_logprobs(self, request: Request, first_position: int,
                            rows: FlatLogprobs) -> None:
        """Rows score prompt tokens first_position+1...; a recomputed prefix is not re-added."""
        known = len(request.prompt_logprobs)
        for offset in range(len(rows)):
            if first_position + 1 + offset == known:
                request.prompt_logprobs.append_row(rows, offset, self._decode)
                known += 1

    # ---------------------------------------------------------------- beam search
    def beam_step(self, request: Request, logprobs) -> None:
        """Advance every live beam of the request by one step of the beam search."""
        state = request.beam_state
        live = request.live_seqs
        beams = [Beam(seq.output_token_ids, seq.cumulative_logprob) for seq in live]
        choices = state.step(beams, logprobs)
        chosen: dict[int, list] = {}
        for choice in choices:
            chosen.setdefault(choice.parent, []).append(choice)
        next_seqs: list[Sequence] = []
        for index, seq in enumerate(live):
            picks = chosen.get(index)
            if not picks:
                self.block_manager.free(seq.seq_id)
                continue
            for pick in picks[1:]:
                child = seq.fork()
                self.block_manager.fork(seq.seq_id, child.seq_id)
                self._extend_beam(child, pick)
                next_seqs.append(child)
            self._extend_beam(seq, picks[0])
            next_seqs.append(seq)
        request.seqs = next_seqs
        too_long = any(s.num_tokens >= self.max_model_len for s in next_seqs)
        if state.is_done or not next_seqs or too_long:
            self.finish_beam_search(request)

    @staticmethod
    def _extend_beam(seq: Sequence, choice) -> None:
        seq.token_ids.append(choice.token_id)
        seq.cumulative_logprob = choice.cum_logprob

    def finish_beam_search(self, request: Request) -> None:
        beams = [Beam(s.output_token_ids, s.cumulative_logprob) for s in request.live_seqs]
        results = request.beam_state.final(beams)
        skip = request.params.skip_special_tokens
        request.beam_outputs = [
            CompletionOutput(index=i, text=self.tokenizer.decode(r.token_ids, skip_special_tokens=skip)
                             if self.tokenizer is not None and request.params.detokenize else "",
                             token_ids=list(r.token_ids), cumulative_logprob=r.cum_logprob,
                             logprobs=None, finish_reason="stop" if r.finished_by_eos else "length")
            for i, r in enumerate(results)]
        for seq in request.seqs:
            seq.finish_reason = "stop"
            self.block_manager.free(seq.seq_id)

    # ---------------------------------------------------------------- reporting
    def finish_pooled(self, request: Request, seq, hidden) -> None:
        """A pooling request's prompt has run: keep its vector and end it."""
        request.pooled = hidden
        seq.finish_reason = "stop"

    def make_output(self, request: Request) -> RequestOutput:
        """The request's output now, as its output_kind asks: cumulative (also FINAL_ONLY's one
        output), or DELTA's new part since its last output (each call is a report)."""
        if request.pooling_params is not None:
            return pooled_output(request)
        seqs = request.seqs
        if len(seqs) == 1 and request.error is None and request.beam_outputs is None:
            if request.reported is not None:
                return self._one_sample_delta(request, seqs[0])
            return self._one_sample_output(request, seqs[0])
        output = self._any_output(request)
        return output if request.reported is None else _as_delta(request, output)

    @staticmethod
    def _any_output(request: Request) -> RequestOutput:
        """make_output of any request: several samples, beams, or an error."""
        seqs = request.seqs
        finished = request.error is not None or all(s.is_finished for s in seqs)
        if request.beam_outputs is not None:
            outputs = request.beam_outputs
        else:
            params = request.params
            if finished and params.best_of > params.n:
                seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
            track = params.logprobs is not None or params.best_of > params.n
            outputs = [
                CompletionOutput(
                    index=index, text=seq.detokenizer.text if seq.detokenizer else "",
                    token_ids=seq.output_token_ids,
                    cumulative_logprob=seq.cumulative_logprob if track else None,
                    logprobs=seq.logprobs.snapshot() if seq.logprobs is not None else None,
                    finish_reason=seq.finish_reason if request.error is None else "abort",
                    stop_reason=seq.stop_reason)
                for index, seq in enumerate(seqs[:params.n])]
        if finished and request.metrics.finished_time is None:
            request.metrics.finished_time = time.monotonic()
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=(request.prompt_logprobs.snapshot()
                             if request.prompt_logprobs is not None else None),
            outputs=outputs, finished=finished, error=request.error, metrics=request.metrics,
            num_cached_tokens=request.num_cached_tokens)

    @staticmethod
    def _one_sample_output(request: Request, seq: Sequence) -> RequestOutput:
        """make_output of the commonest request: one sample, no error, no beams. A streaming
        server makes one per request per batch of steps (256 at saturation), so it builds the
        two objects with positional arguments, in their fields' order: keyword arguments
        made each output ~1 us dearer on the CPU VM."""
        finished = _note_finish(request, seq)
        detokenizer, logprobs = seq.detokenizer, seq.logprobs
        prompt_logprobs = request.prompt_logprobs
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids,
            prompt_logprobs.snapshot() if prompt_logprobs is not None else None,
            [CompletionOutput(
                0, detokenizer.text if detokenizer else "", seq.token_ids[seq.num_prompt_tokens:],
                _tracked_cumulative_logprob(request, seq),
                logprobs.snapshot() if logprobs is not None else None, seq.finish_reason, seq.stop_reason)],
            finished, None, request.metrics, request.num_cached_tokens)

    @staticmethod
    def _one_sample_delta(request: Request, seq: Sequence) -> RequestOutput:
        """_as_delta(request, _one_sample_output(request, seq)), built at once: a server with
        its engine in another process runs every plain stream as DELTA (output_wire.py), and
        the cumulative output made only to be cut cost ~2 us more an output on the CPU VM."""
        finished = _note_finish(request, seq)
        detokenizer, logprobs = seq.detokenizer, seq.logprobs
        reported = request.reported
        tokens, chars, positions = reported.get(0, (0, 0, 0))
        text = detokenizer.text if detokenizer else ""
        start = seq.num_prompt_tokens
        token_ids = seq.token_ids
        sample_logprobs = logprobs.snapshot() if logprobs is not None else None
        reported[0] = (len(token_ids) - start, len(text), len(sample_logprobs) if sample_logprobs is not None else 0)
        if isinstance(sample_logprobs, FlatLogprobs):
            sample_logprobs = sample_logprobs.tail(positions)
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs.snapshot()
            done = request.reported_prompt_positions
            request.reported_prompt_positions = len(prompt_logprobs)
            prompt_logprobs = prompt_logprobs.tail(done) if len(prompt_logprobs) > done else None
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, prompt_logprobs,
            [CompletionOutput(
                0, text[chars:], token_ids[start + tokens:],
                _tracked_cumulative_logprob(request, seq),
                sample_logprobs, seq.finish_reason, seq.stop_reason)],
            finished, None, request.metrics, request.num_cached_tokens)


def _note_finish(request: Request, seq: Sequence) -> bool:
    """Whether the one sample finished; its request's finish time is set the first time."""
    finished = seq.finish_reason is not None
    if finished and request.metrics.finished_time is None:
        request.metrics.finished_time = time.monotonic()
    return finished


def _tracked_cumulative_logprob(request: Request, seq: Sequence) -> Optional[float]:
    """The sample's cumulative logprob where the request shows it (logprobs asked, or best_of)."""
    params = request.params
    return seq.cumulative_logprob if params.logprobs is not None or params.best_of > params.n else None


def _as_delta(request: Request, output: RequestOutput) -> RequestOutput:
    """A cumulative output cut to what the request has not reported yet (vLLM's DELTA): each
    sample's new text, token ids and logprob positions; its cumulative logprob, finish and stop
    reasons as they are; the prompt's logprob positions not sent yet (all in the first output
    unless its prompt is still being computed in chunks), else None."""
    reported = request.reported
    outputs = []
    for out in output.outputs:
        tokens, chars, positions = reported.get(out.index, (0, 0, 0))
        logprobs = out.logprobs
        outputs.append(CompletionOutput(
            out.index, out.text[chars:], out.token_ids[tokens:], out.cumulative_logprob,
            logprobs.tail(positions) if isinstance(logprobs, FlatLogprobs) else logprobs,
            out.finish_reason, out.stop_reason))
        reported[out.index] = (len(out.token_ids), len(out.text),
                               len(logprobs) if logprobs is not None else 0)
    prompt_logprobs = output.prompt_logprobs
    if prompt_logprobs is not None:
        done = request.reported_prompt_positions
        request.reported_prompt_positions = len(prompt_logprobs)
        prompt_logprobs = prompt_logprobs.tail(done) if len(prompt_logprobs) > done else None
    return RequestOutput(output.request_id, output.prompt, output.prompt_token_ids, prompt_logprobs,
                         outputs, output.finished, output.error, output.metrics, output.num_cached_tokens)


class GrammarConflictError(ValueError):
    """A structured-output request sampled a token its grammar refuses. The sampler masks every
    token the grammar refuses, so this happens when the request's other constraints masked
    every token the grammar allows (allowed_token_ids, bad_words, a logit_bias of -100,
    min_tokens holding back the EOS a finished grammar needs): the request's own contradiction."""


def _advance_grammar(matcher, token_id: int) -> None:
    """Feed a sampled token to a structured-output sequence's grammar."""
    if not matcher.consume_token(token_id) or matcher.is_error():
        # "structured_outputs" first: the server answers such a request's error as a 400.
        raise GrammarConflictError(
            "structured_outputs: no token satisfies both the grammar and the request's other "
            "token constraints (allowed_token_ids, bad_words, logit_bias, min_tokens); the "
            "request was ended")
