"""ModelRunner: a step's model inputs on the device, the model, and sampling.

Rank 0 turns each step's host arrays (engine/step_inputs.py) into a ModelInput on the engine's
thread; execute() and launch() touch only the ModelInput they are given, so the async engine
can run them in a worker thread (or, on a GPU, launch them) while the event loop keeps serving.
With tensor parallelism every rank holds a ModelRunner over its shard: rank 0 sends each step's
arrays to the others before running it, and they run the same forward (worker_step), so the
collectives inside line up; only rank 0 samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from aserve.attention import AttentionMetadata
from aserve.distributed import SINGLE_RANK, TensorParallelGroup
from aserve.distributed.group import TensorParallelError
from aserve.logprobs import FlatLogprobs
from aserve.worker.cuda_graphs import DecodeGraphs
from aserve.worker.input_upload import InputUploader
from aserve.worker.kv_cache import copy_blocks
from aserve.worker.sampler import Sampler, SamplerOutput, SamplingMetadata, logprobs_for_tokens
from aserve.worker.step_arrays import STEP_EXECUTE, STEP_LAUNCH, StepArrays


@dataclass(frozen=True)
class PromptLogprobRows:
    """Rows whose logits score prompt tokens: row r predicts target_token_ids[r]."""

    num_top: int
    target_token_ids: list[int]
    temperature: float = 1.0   # the request's prompt_logprobs_temperature


@dataclass(frozen=True)
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    block_copies: list[tuple[int, int]]
    # Token indices whose logits are needed, in this order: sampled rows, beam rows, prompt rows.
    logits_indices: torch.Tensor
    num_sample_rows: int
    num_beam_rows: int
    sampling_metadata: Optional[SamplingMetadata]
    needs_sampled_logprob: list[bool]        # per sample row: cumulative logprob wanted
    prompt_logprob_groups: list[PromptLogprobRows]
    # Async scheduling: input_ids[fill_index] are placeholders for the previous step's
    # sampled ids[fill_rows], copied in on the device at launch.
    fill_index: Optional[torch.Tensor] = None
    fill_rows: Optional[torch.Tensor] = None
    # The host arrays these tensors were made from: what rank 0 sends to the other ranks.
    arrays: Optional[StepArrays] = None
    # A decode step's usual shape, which saves it a gather each: every token's logits are
    # needed, in token order (logits_indices is 0..n-1), and every input token is the previous
    # step's sampled id of the same row (fill_index and fill_rows are 0..n-1).
    logits_all_tokens: bool = False
    fills_all_tokens: bool = False

    def logits_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states whose logits the step needs."""
        return hidden if self.logits_all_tokens else hidden[self.logits_indices]

    def filled_input_ids(self, previous_sampled: torch.Tensor) -> torch.Tensor:
        """input_ids with the placeholders replaced by the previous step's sampled ids."""
        if self.fills_all_tokens and previous_sampled.numel() == self.input_ids.numel():
            return previous_sampled   # read only: the forward never writes its input ids
        return self.input_ids.index_copy(0, self.fill_index, previous_sampled.index_select(0, self.fill_rows))


@dataclass
class ModelOutput:
    sampled_token_ids: list[int]
    sample_logprobs: Optional[FlatLogprobs]           # one position per sample row
    sampled_token_logprobs: list[Optional[float]]
    beam_logprobs: Optional[torch.Tensor]             # [num_beam_rows, V] on the CPU
    prompt_logprobs: list[FlatLogprobs]               # one per PromptLogprobRows group, a position per row
    # Sample rows whose sampling failed (their ids are placeholders): only their requests fail.
    sample_errors: dict[int, Exception] = field(default_factory=dict)
    # A pooling runner's: each sample row's final hidden state [rows, hidden], float32 on the
    # CPU (the rows are the prompts' last tokens); nothing is sampled.
    pooled: Optional[torch.Tensor] = None


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, device: torch.device,
                 seed: int, group: TensorParallelGroup = SINGLE_RANK, pooling: bool = False) -> None:
        self.model = model
        self.pooling = pooling   # runner="pooling": hidden states out, no logits, no sampling
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.num_blocks = kv_caches[0].shape[1] if kv_caches else 0
        self.device = device
        self.group = group
        self.sampler = Sampler(seed=seed)
        self.decode_graphs: Optional[DecodeGraphs] = None
        self.uploader = InputUploader(device)
        # Rank 0 of several: send_step(kind, arrays) hands each step to the other ranks.
        self.send_step: Optional[Callable[[int, StepArrays], None]] = None
        # Ranks 1..N-1: the previous launched step's sampled ids, broadcast by rank 0.
        self._last_sampled: Optional[torch.Tensor] = None

    def capture_decode_graphs(self, max_num_seqs: int, max_seq_len_to_capture: int) -> DecodeGraphs:
        """Capture CUDA graphs of decode steps; later decode steps that fit replay them."""
        graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_num_seqs,
                              max_seq_len_to_capture, self.device, self.group)
        graphs.capture()
        self.decode_graphs = graphs
        return graphs

    # ---------------------------------------------------------------- inputs (engine thread)
    def model_input(self, arrays: StepArrays, row_plan: Optional["RowPlan"] = None) -> ModelInput:
        """The step's tensors on the device (one upload); row_plan says what rank 0
        samples (None on the other ranks, which only run the forward)."""
        device_int64, device_int32 = self.uploader.upload(arrays.int64, arrays.int32)
        input_ids, positions, slots, logits_indices, fill_index, fill_rows = arrays.int64_views(device_int64)
        query_start, seq_lens, block_tables = arrays.int32_views(device_int32)
        host_query_start, host_seq_lens, _ = arrays.int32_views(arrays.int32)
        _, _, _, host_logits_indices, host_fill_index, host_fill_rows = arrays.int64_views(arrays.int64)
        metadata = AttentionMetadata(
            num_tokens=arrays.num_tokens, query_start_loc=query_start, seq_lens=seq_lens,
            block_tables=block_tables, slot_mapping=slots, max_query_len=arrays.max_query_len,
            max_seq_len=arrays.max_seq_len,
            query_lens_cpu=([1] * arrays.num_seqs if arrays.max_query_len == 1
                            else np.diff(host_query_start).tolist()),
            seq_lens_cpu=host_seq_lens.tolist())
        return ModelInput(
            input_ids=input_ids,
            positions=positions,
            attn_metadata=metadata,
            block_copies=arrays.block_copies() if arrays.num_copies else [],
            logits_indices=logits_indices,
            num_sample_rows=row_plan.num_sample_rows if row_plan else arrays.num_logits,
            num_beam_rows=row_plan.num_beam_rows if row_plan else 0,
            sampling_metadata=row_plan.sampling_metadata if row_plan else None,
            needs_sampled_logprob=row_plan.needs_sampled_logprob if row_plan else [],
            prompt_logprob_groups=row_plan.prompt_logprob_groups if row_plan else [],
            fill_index=fill_index,
            fill_rows=fill_rows,
            arrays=arrays,
            logits_all_tokens=arrays.num_logits == arrays.num_tokens and _is_arange(host_logits_indices),
            fills_all_tokens=(arrays.num_fills == arrays.num_tokens and _is_arange(host_fill_index)
                              and _is_arange(host_fill_rows)))

    # ---------------------------------------------------------------- execution (any thread)
    def _forward(self, model_input: ModelInput, input_ids: torch.Tensor) -> torch.Tensor:
        copy_blocks(self.kv_caches, model_input.block_copies)
        metadata = model_input.attn_metadata
        if self.decode_graphs is not None and self.decode_graphs.can_run(metadata):
            return self.decode_graphs.run(input_ids, model_input.positions, metadata)
        return self.model(input_ids, model_input.positions, self.kv_caches, metadata)

    @torch.inference_mode()
    def launch(self, model_input: ModelInput, previous: Optional["PendingStep"]) -> "PendingStep":
        """Async scheduling: enqueue the forward and the sampling of a step whose rows only
        sample (engine/pipeline.py checks), taking placeholder ids from the previous step's
        device tensor; returns at once, with the ids on their way to the host."""
        assert model_input.num_beam_rows == 0 and not model_input.prompt_logprob_groups
        self._send(STEP_LAUNCH, model_input)
        input_ids = model_input.input_ids
        if model_input.fill_index is not None:
            input_ids = model_input.filled_input_ids(previous.sampled)
        with self._collectives():
            hidden = self._forward(model_input, input_ids)
            if model_input.logits_indices.numel() == 0:
                return PendingStep.start(torch.empty(0, dtype=torch.long, device=hidden.device))
            # In the model's dtype: the sampler's one-pass path reads it as it is.
            logits = self.model.compute_logits(model_input.logits_rows(hidden))
        error, row_errors = None, {}
        try:
            try:
                sampled = self.sampler.sample_ids(logits, model_input.sampling_metadata)
            except Exception:
                rows, row_errors = _sample_rows_apart(logits, model_input.sampling_metadata,
                                                      self.sampler.sample_ids)
                failed = torch.zeros(1, dtype=torch.long, device=logits.device)
                sampled = torch.cat([ids if ids is not None else failed for ids in rows])
        except Exception as exc:  # the other ranks wait for ids all the same: send zeros
            sampled, error = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device), exc
        with self._collectives():
            self.group.broadcast(sampled)   # the next step's placeholders, on every rank
        if error is not None:
            raise error
        return PendingStep.start(sampled, row_errors)

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> ModelOutput:
        assert model_input.fill_index is None, "placeholders need launch() and the previous step"
        self._send(STEP_EXECUTE, model_input)
        with self._collectives():
            hidden = self._forward(model_input, model_input.input_ids)
            if model_input.logits_indices.numel() == 0:
                return ModelOutput([], None, [], None, [])
            if self.pooling:
                rows = model_input.logits_rows(hidden)
                return ModelOutput([0] * rows.shape[0], None, [], None, [], pooled=rows.float().cpu())
            logits = self.model.compute_logits(model_input.logits_rows(hidden)).float()
        n_sample, n_beam = model_input.num_sample_rows, model_input.num_beam_rows

        sampled, sample_logprobs, sampled_lps, row_errors = [], None, [], {}
        if n_sample:
            sample_logits = logits[:n_sample]
            metadata = model_input.sampling_metadata
            try:
                out = self.sampler(sample_logits, metadata)
            except Exception:
                rows, row_errors = _sample_rows_apart(sample_logits, metadata, self.sampler)
                out = SamplerOutput([r.sampled_token_ids[0] if r else 0 for r in rows],
                                    _joined_row_logprobs(rows) if metadata.max_num_logprobs is not None else None)
            sampled, sample_logprobs = out.sampled_token_ids, out.logprobs
            sampled_lps = _sampled_token_logprobs(sample_logits, sampled, sample_logprobs,
                                                  model_input.needs_sampled_logprob)
        beam_logprobs = None
        if n_beam:
            beam_logprobs = torch.log_softmax(logits[n_sample:n_sample + n_beam], dim=-1).cpu()
        prompt_logprobs = []
        row = n_sample + n_beam
        for group in model_input.prompt_logprob_groups:
            count = len(group.target_token_ids)
            scores = logits[row:row + count]
            lps = torch.log_softmax(scores if group.temperature == 1.0 else scores.float() / group.temperature, dim=-1)
            prompt_logprobs.append(logprobs_for_tokens(lps, group.target_token_ids, group.num_top))
            row += count
        return ModelOutput(sampled, sample_logprobs, sampled_lps, beam_logprobs, prompt_logprobs, row_errors)

    @torch.inference_mode()
    def worker_step(self, kind: int, model_input: ModelInput) -> None:
        """Ranks 1..N-1: rank 0's step on this shard, joining every collective rank 0 makes
        (the forward's, the logits gather, and for launched steps the sampled-id broadcast)."""
        input_ids = model_input.input_ids
        if model_input.fill_index is not None:
            input_ids = model_input.filled_input_ids(self._last_sampled)
        hidden = self._forward(model_input, input_ids)
        rows = model_input.logits_indices.numel()
        if rows and not self.pooling:   # rank 0 pools without the LM head's gather
            self.model.compute_logits(model_input.logits_rows(hidden))
        if kind == STEP_LAUNCH:
            sampled = torch.empty(rows, dtype=torch.long, device=self.device)
            if rows:
                self.group.broadcast(sampled)
            self._last_sampled = sampled

    def _send(self, kind: int, model_input: ModelInput) -> None:
        if self.send_step is not None:
            self.send_step(kind, model_input.arrays)

    @contextlib.contextmanager
    def _collectives(self):
        """A failure among collectives leaves the ranks out of step: nothing after it can be
        trusted, so it is raised as TensorParallelError, which stops the engine."""
        if not self.group.is_parallel:
            yield
            return
        try:
            yield
        except TensorParallelError:
            raise
        except Exception as exc:
            raise TensorParallelError(f"a tensor-parallel step failed: {exc}") from exc


class PendingStep:
    """A launched step's sampled ids: on the device for the next step's placeholders, and on
    their way into pinned host memory for the engine."""

    def __init__(self, sampled: torch.Tensor, host: torch.Tensor, copied,
                 row_errors: Optional[dict[int, Exception]] = None) -> None:
        self.sampled = sampled
        self._host = host
        self._copied = copied
        self._row_errors = row_errors or {}

    @staticmethod
    def start(sampled: torch.Tensor, row_errors: Optional[dict[int, Exception]] = None) -> "PendingStep":
        if sampled.device.type != "cuda":
            return PendingStep(sampled, sampled, None, row_errors)
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(sampled.device))
        return PendingStep(sampled, host, copied, row_errors)

    def result(self) -> ModelOutput:
        """Waits for the step; the same shape of output as ModelRunner.execute's."""
        if self._copied is not None:
            self._copied.synchronize()
        return ModelOutput(self._host.tolist(), None, [], None, [], self._row_errors)


_ARANGE = np.arange(0)


def _is_arange(values: np.ndarray) -> bool:
    """Whether values is 0, 1, ..., len - 1."""
    global _ARANGE
    n = len(values)
    if n > len(_ARANGE):
        _ARANGE = np.arange(max(n, 2 * len(_ARANGE)), dtype=np.int64)
    return bool((values == _ARANGE[:n]).all())


@dataclass(frozen=True)
class RowPlan:
    """Which token positions' logits this step needs, built by the engine with the inputs."""

    logits_indices: list[int]
    num_sample_rows: int
    num_beam_rows: int
    sampling_metadata: Optional[SamplingMetadata]
    needs_sampled_logprob: list[bool]
    prompt_logprob_groups: list[PromptLogprobRows]


def _sample_rows_apart(logits: torch.Tensor, metadata: SamplingMetadata, sample):
    """The batch's sampling failed: sample each row alone, so that the fault is tied to the
    rows (requests) that cause it. Returns each row's `sample(row_logits, row_metadata)` (None
    where it failed) and each failed row's error; raises when every row fails (then nothing
    ties the fault to a request, and the step fails as a whole)."""
    results, errors = [], {}
    for row in range(logits.shape[0]):
        one = SamplingMetadata.build([metadata.params[row]], [metadata.generators[row]],
                                     [metadata.prompt_token_ids[row]], [metadata.output_token_ids[row]],
                                     [metadata.matchers[row]] if metadata.matchers else None)
        try:
            results.append(sample(logits[row:row + 1], one))
        except Exception as exc:
            errors[row] = exc
            results.append(None)
    if len(errors) == len(results):
        raise next(iter(errors.values()))
    return results, errors


def _joined_row_logprobs(rows: list[Optional[SamplerOutput]]) -> FlatLogprobs:
    """The rows sampled apart as one step's logprobs: a failed row's position is None."""
    joined = FlatLogprobs()
    for r in rows:
        if r is not None and r.logprobs is not None:
            joined.append_row(r.logprobs, 0)
        else:
            joined.append(None)
    return joined


def _sampled_token_logprobs(logits: torch.Tensor, sampled: list[int], sample_logprobs: Optional[FlatLogprobs],
                            wanted: list[bool]) -> list[Optional[float]]:
    """The raw logprob of each sampled token where a cumulative logprob is kept."""
    result: list[Optional[float]] = [None] * len(sampled)
    missing = []
    for row, want in enumerate(wanted):
        if not want:
            continue
        found = sample_logprobs.logprob_of(row, sampled[row]) if sample_logprobs is not None else None
        if found is not None:
            result[row] = found
        else:
            missing.append(row)
    if missing:
        rows = torch.tensor(missing, device=logits.device)
        tokens = torch.tensor([sampled[r] for r in missing], device=logits.device)
        picked = logits[rows, tokens] - torch.logsumexp(logits[rows], dim=-1)
        for row, value in zip(missing, picked.tolist()):
            result[row] = value
    return result
