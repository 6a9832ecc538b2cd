"""OfflineLLM: batch generation in a script, driving the engine's steps synchronously."""

from __future__ import annotations

import time
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from aserve.config import EngineArgs
from aserve.engine.engine import Engine
from aserve.engine.gc_policy import fewer_collections
from aserve.offline_inputs import (BeamSearchOutput, BeamSearchSequence, PromptInput, as_prompt_list,
                                   chat_prompt_ids, is_conversation)
from aserve.outputs import EmbeddingRequestOutput, RequestOutput
from aserve.pooling_params import PoolingParams
from aserve.sampling_params import BeamSearchParams, SamplingParams


class OfflineLLM:
    """vLLM's `LLM` for batch jobs: `OfflineLLM(model=...).generate(prompts, SamplingParams())`.

    model: a local Hugging Face folder or a hub id; None uses the built-in default model.
    Other keyword arguments are EngineArgs fields (dtype, max_model_len, block_size,
    tensor_parallel_size, ...). With tensor_parallel_size > 1 the other ranks run in worker
    processes until shutdown() (or the end of a `with` block, or of the program).
    """

    def __init__(self, model: Optional[str] = None, **kwargs) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise ValueError(f"unknown engine arguments: {', '.join(sorted(unknown))}.")
        self.engine = Engine(EngineArgs(model=model, **kwargs))
        self.engine.stream_outputs = False
        self._counter = 0

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the model's generation config's defaults (temperature,
        top_p, top_k, min_p, repetition_penalty, max_tokens), the rest SamplingParams' own."""
        return SamplingParams(**self.engine.model_config.sampling_defaults)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (e.g. after changing the weights); True."""
        return self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        """End the worker processes of a tensor-parallel engine; no generate() after this."""
        self.engine.shutdown()

    def __enter__(self) -> "OfflineLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts: Union[PromptInput, Sequence[PromptInput]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; returns RequestOutputs in the prompts' order.

        A prompt is a string, a list of token ids, or vLLM's {"prompt": text} or
        {"prompt_token_ids": ids}. An invalid prompt or parameter raises ValueError naming
        the prompt's index before any work starts, and leaves the engine as it was.
        """
        prompts = as_prompt_list(prompts)
        if sampling_params is None:   # as vLLM: the model's own defaults (its generation config)
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params must be one SamplingParams or one per prompt: got "
                             f"{len(sampling_params)} for {len(prompts)} prompts.")
        with fewer_collections():   # engine/gc_policy.py: ~4% of a run's time, freeing nothing
            ids = self._add_all(prompts, sampling_params)
            finished = self._run(len(ids), use_tqdm)
        return [_with_logprob_lists(finished[i]) for i in ids]

    def chat(self, messages, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: Optional[dict] = None) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation (a list of {"role", "content"} messages) or a list
        of conversations, each rendered with the chat template (the tokenizer's, or
        chat_template) and generated for; one RequestOutput per conversation."""
        conversations = [messages] if is_conversation(messages) else list(messages)
        prompts = [chat_prompt_ids(self.engine.tokenizer, c, chat_template, add_generation_prompt,
                                   continue_final_message, chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def embed(self, prompts: Union[PromptInput, Sequence[PromptInput]], *,
              truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
              pooling_params: Union[PoolingParams, Sequence[PoolingParams], None] = None,
              ) -> list[EmbeddingRequestOutput]:
        """vLLM's LLM.embed, on an engine built with runner="pooling": one vector per prompt
        (its last token's final hidden state, L2-normalised; aserve/pooling_params.py), in the
        prompts' order, as `output.outputs.embedding`."""
        prompts = as_prompt_list(prompts)
        if pooling_params is None:
            pooling_params = PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens)
        if isinstance(pooling_params, PoolingParams):
            pooling_params = [pooling_params] * len(prompts)
        elif len(pooling_params) != len(prompts):
            raise ValueError(f"pooling_params must be one PoolingParams or one per prompt: got "
                             f"{len(pooling_params)} for {len(prompts)} prompts.")
        ids = self._add_all(prompts, pooling_params)
        finished = self._run(len(ids), use_tqdm)
        return [finished[i] for i in ids]

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: params.beam_width beams per prompt, best first; each
        sequence's tokens and text include its prompt."""
        results = self.generate(as_prompt_list(prompts), params.to_sampling_params(), use_tqdm=use_tqdm)
        tokenizer = self.engine.tokenizer
        outputs = []
        for result in results:
            sequences = []
            for beam in result.outputs:
                tokens = list(result.prompt_token_ids) + list(beam.token_ids)
                text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
                sequences.append(BeamSearchSequence(tokens, beam.cumulative_logprob or 0.0, text,
                                                    beam.finish_reason, beam.stop_reason))
            outputs.append(BeamSearchOutput(sequences))
        return outputs

    def _add_all(self, prompts, sampling_params) -> list[str]:
        ids: list[str] = []
        try:
            for index, (prompt, params) in enumerate(zip(prompts, sampling_params)):
                request_id = f"offline-{self._counter}"
                self._counter += 1
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as exc:
                    raise ValueError(f"prompt {index}: {exc}") from exc
                ids.append(request_id)
        except BaseException:
            self.engine.abort_request(ids)
            raise
        return ids

    def _run(self, num_requests: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=num_requests, desc="Processed prompts", dynamic_ncols=True,
                   disable=not use_tqdm)
        start = time.perf_counter()
        prompt_tokens = output_tokens = 0
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if not output.finished:
                        continue
                    finished[output.request_id] = output
                    prompt_tokens += len(output.prompt_token_ids)
                    if isinstance(output, RequestOutput):   # an embedding has no output tokens
                        output_tokens += sum(len(c.token_ids) for c in output.outputs)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"input: {prompt_tokens / elapsed:.1f} toks/s, "
                                        f"output: {output_tokens / elapsed:.1f} toks/s")
                    bar.update(1)
        finally:
            bar.close()
        return finished


def _with_logprob_lists(output: RequestOutput) -> RequestOutput:
    """The engine keeps logprobs flat (aserve/logprobs.py); a script gets vLLM's default types,
    list[dict[int, Logprob]], made once when its request has finished."""
    if output.prompt_logprobs is not None:
        output.prompt_logprobs = list(output.prompt_logprobs)
    for completion in output.outputs:
        if completion.logprobs is not None:
            completion.logprobs = list(completion.logprobs)
    return output
