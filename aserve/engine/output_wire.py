"""Outputs as they cross from an engine process to its server (engine_process.py): plain tuples
of what is new, not RequestOutput objects holding everything so far.

Pickling a batch of 512 cumulative RequestOutputs (128-token prompts, 64 tokens out) took
2.2-3.0 ms on the CPU VM and unpickling 4-8 ms; the same batch as tuples of each request's new
tokens 0.15-0.27 ms and 0.26-0.46 ms. So:
- a plain streaming request (one sample, no best_of, no beams) that asked for cumulative
  outputs is run as DELTA in the engine process (as_delta_in_engine), and the server joins its
  deltas back into cumulative outputs (merge_deltas, as a stream does for a slow consumer);
- a request's prompt and prompt ids cross once, with its first output;
- every RequestOutput crosses as a tuple of its fields (encode), other outputs (a pooled
  vector) as themselves;
- where several API servers share the engine process, a plain request's text is made in its
  server (server_detokenizer.py), and the engine process sends only its token ids.
"""

from __future__ import annotations

import copy
from typing import Optional

from aserve.engine.request_stream import joined_logprobs, merge_deltas
from aserve.engine.server_detokenizer import ServerDetokenizers, decodable_here, without_text
from aserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from aserve.sampling_params import RequestOutputKind, SamplingParams


def as_delta_in_engine(params) -> Optional[SamplingParams]:
    """A copy of params that asks the engine for DELTA outputs where the server can join them
    back into the cumulative ones asked for (one sample, no best_of, no beams: each output
    extends the last); None where params stay as they are."""
    if (not isinstance(params, SamplingParams) or params.output_kind != RequestOutputKind.CUMULATIVE
            or params.n != 1 or params.best_of != 1 or params.use_beam_search):
        return None
    delta = copy.copy(params)
    delta.output_kind = RequestOutputKind.DELTA
    return delta


class OutputEncoder:
    """In the engine process: each output as a tuple, its prompt only the first time."""

    def __init__(self):
        self._prompt_sent: set[str] = set()

    def forget(self, request_id: str) -> None:
        """An aborted request: no final output may come to end it here."""
        self._prompt_sent.discard(request_id)

    def encode(self, outputs: list) -> list:
        items = []
        for output in outputs:
            if type(output) is not RequestOutput:
                items.append(output)
                continue
            request_id = output.request_id
            first = request_id not in self._prompt_sent
            if output.finished:
                self._prompt_sent.discard(request_id)
            elif first:
                self._prompt_sent.add(request_id)
            metrics = output.metrics
            items.append((
                request_id, (output.prompt, output.prompt_token_ids) if first else None,
                output.prompt_logprobs,
                [(o.index, o.text, o.token_ids, o.cumulative_logprob, o.logprobs, o.finish_reason, o.stop_reason)
                 for o in output.outputs],
                output.finished, output.error,
                None if metrics is None else (
                    metrics.arrival_time, metrics.first_scheduled_time, metrics.first_token_time,
                    metrics.last_token_time, metrics.finished_time, metrics.num_generation_tokens),
                output.num_cached_tokens))
        return items


class OutputDecoder:
    """In the server: the tuples back into RequestOutputs, deltas joined for the requests whose
    cumulative outputs the engine process ran as DELTA, text made for those decoded here
    (tokenizer: the server's, None for none)."""

    def __init__(self, tokenizer=None):
        self._joined: set[str] = set()            # requests run as DELTA for cumulative outputs
        self._prompts: dict[str, tuple] = {}      # request id -> (prompt, prompt ids)
        self._latest: dict[str, RequestOutput] = {}  # a joined request's cumulative output so far
        self._detokenizers = ServerDetokenizers(tokenizer) if tokenizer is not None else None

    def engine_params(self, request_id: str, params):
        """The params an added request goes to the engine process with: a copy run as DELTA
        where its deltas are joined here, without text where its text is made here; else params."""
        in_engine = as_delta_in_engine(params)
        if in_engine is not None:
            self._joined.add(request_id)
        sent = in_engine or params
        if self._detokenizers is not None and decodable_here(sent, self._detokenizers.tokenizer):
            sent = without_text(sent, fresh_copy=in_engine is not None)
            self._detokenizers.add(request_id, sent)
        return sent

    def forget(self, request_id: str) -> None:
        self._joined.discard(request_id)
        self._prompts.pop(request_id, None)
        self._latest.pop(request_id, None)
        if self._detokenizers is not None:
            self._detokenizers.forget(request_id)

    def decode(self, item, wanted) -> Optional[object]:
        """The output of one item; None for a request nobody waits for any more (wanted(request
        id) is false: aborted, its client gone), whose state is dropped."""
        if type(item) is not tuple:
            return item
        request_id, prompt, prompt_logprobs, samples, finished, error, metrics, cached = item
        if not wanted(request_id):
            self.forget(request_id)
            return None
        if prompt is not None:
            self._prompts[request_id] = prompt
        prompt_text, prompt_ids = self._prompts.get(request_id, (None, []))
        if self._detokenizers is not None and request_id in self._detokenizers:   # one sample
            samples = [self._detokenizers.with_text(request_id, prompt_ids, samples[0], finished)]
        metrics = None if metrics is None else RequestMetrics(*metrics)
        earlier = self._latest.get(request_id) if request_id in self._joined else None
        if (earlier is not None and len(samples) == 1 and len(earlier.outputs) == 1
                and samples[0][0] == earlier.outputs[0].index):
            # merge_deltas of the commonest case, at once (this runs on the server's loop).
            index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason = samples[0]
            before = earlier.outputs[0]
            output = RequestOutput(
                request_id, prompt_text, prompt_ids, joined_logprobs(earlier.prompt_logprobs, prompt_logprobs),
                [CompletionOutput(index, before.text + text, before.token_ids + token_ids, cumulative_logprob,
                                  joined_logprobs(before.logprobs, logprobs), finish_reason, stop_reason)],
                finished, error or earlier.error, metrics, cached)
        else:
            output = RequestOutput(request_id, prompt_text, prompt_ids, prompt_logprobs,
                                   [CompletionOutput(*sample) for sample in samples], finished, error,
                                   metrics, cached)
            if earlier is not None:
                output = merge_deltas(earlier, output)
        if request_id in self._joined:
            self._latest[request_id] = output
        if finished:
            self.forget(request_id)
        return output
