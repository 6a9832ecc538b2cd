"""ModelRunner: turns a SchedulerOutput into model inputs, runs the model and samples.

prepare() reads engine state and must run on the engine's thread; execute() touches only the
ModelInput it is given, so the async engine can run it in a worker thread (or, on a GPU,
launch it) while the event loop keeps serving.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from aserve.attention import AttentionMetadata
from aserve.engine.block_manager import BlockManager
from aserve.engine.scheduler import SchedulerOutput
from aserve.outputs import Logprob
from aserve.worker.cuda_graphs import DecodeGraphs
from aserve.worker.input_upload import InputUploader
from aserve.worker.kv_cache import copy_blocks
from aserve.worker.sampler import Sampler, SamplingMetadata, logprobs_for_tokens


@dataclass(frozen=True)
class PromptLogprobRows:
    """Rows whose logits score prompt tokens: row r predicts target_token_ids[r]."""

    num_top: int
    target_token_ids: list[int]


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


@dataclass
class ModelOutput:
    sampled_token_ids: list[int]
    sample_logprobs: Optional[list[Optional[dict[int, Logprob]]]]
    sampled_token_logprobs: list[Optional[float]]
    beam_logprobs: Optional[torch.Tensor]             # [num_beam_rows, V] on the CPU
    prompt_logprobs: list[list[dict[int, Logprob]]]   # one list per PromptLogprobRows group


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_manager: BlockManager,
                 device: torch.device, seed: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = device
        self.sampler = Sampler(seed=seed)
        self.decode_graphs: Optional[DecodeGraphs] = None
        self.uploader = InputUploader(device)

    def capture_decode_graphs(self, max_num_seqs: int, max_seq_len_to_capture: int) -> DecodeGraphs:
        """Capture CUDA graphs of decode steps; later decode steps that fit replay them."""
        graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_num_seqs,
                              max_seq_len_to_capture, self.device)
        graphs.capture()
        self.decode_graphs = graphs
        return graphs

    # ---------------------------------------------------------------- inputs (engine thread)
    def prepare(self, sched: SchedulerOutput, row_plan: "RowPlan",
                placeholder_rows: Optional[dict[int, int]] = None) -> ModelInput:
        # Per-sequence Python only gathers what numpy cannot reach (token ids, table lists);
        # the per-token arrays are built vectorised: at 256 running decodes these loops were
        # a visible share of the host's step time, which bounds the small model's throughput.
        scheduled = sched.scheduled
        starts = np.fromiter((item.start for item in scheduled), dtype=np.int64, count=len(scheduled))
        counts = np.fromiter((item.num_new_tokens for item in scheduled), dtype=np.int64, count=len(scheduled))
        ends = starts + counts
        query_start = np.zeros(len(scheduled) + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start[1:])     # each sequence's first token in the step
        query_lens = counts.tolist()
        seq_lens = ends.tolist()
        if max(query_lens) == 1:         # decode steps: one token per sequence
            input_ids = [item.seq.token_ids[item.start] for item in scheduled]
        else:
            input_ids = [t for item in scheduled
                         for t in item.seq.token_ids[item.start:item.start + item.num_new_tokens]]
        fill_index: list[int] = []
        fill_rows: list[int] = []
        if placeholder_rows:
            next_start = query_start[1:].tolist()
            for i, item in enumerate(scheduled):
                row = placeholder_rows.get(item.seq.seq_id)
                if row is not None and seq_lens[i] == len(item.seq.token_ids):
                    fill_index.append(next_start[i] - 1)   # the sequence's last token: a placeholder
                    fill_rows.append(row)
        tables = [self.block_manager.block_table(item.seq.seq_id) for item in scheduled]
        table_lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        width = int(table_lens.max())
        block_tables = np.zeros((len(tables), width), dtype=np.int32)
        block_tables[np.arange(width) < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(tables), dtype=np.int32, count=int(table_lens.sum()))
        # Token t of sequence i sits at position starts[i] + (t - query_start[i]).
        seq_index = np.repeat(np.arange(len(scheduled)), counts)
        positions_np = starts[seq_index] + np.arange(len(seq_index)) - query_start[seq_index]
        # The cache slot of every token from its sequence's block table.
        slots = (block_tables[seq_index, positions_np // self.block_size].astype(np.int64)
                 * self.block_size + positions_np % self.block_size)
        input_ids_t, positions_t, slots_t, logits_indices_t, fill_index_t, fill_rows_t = self.uploader.upload(
            [np.array(input_ids, dtype=np.int64), positions_np, slots,
             np.array(row_plan.logits_indices, dtype=np.int64), np.array(fill_index, dtype=np.int64),
             np.array(fill_rows, dtype=np.int64)], torch.int64)
        query_start_t, seq_lens_t, block_tables_t = self.uploader.upload(
            [query_start, ends.astype(np.int32), block_tables], torch.int32)
        metadata = AttentionMetadata(
            num_tokens=len(input_ids), query_start_loc=query_start_t, seq_lens=seq_lens_t,
            block_tables=block_tables_t, slot_mapping=slots_t,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return ModelInput(
            input_ids=input_ids_t,
            positions=positions_t,
            attn_metadata=metadata,
            block_copies=sched.block_copies,
            logits_indices=logits_indices_t,
            num_sample_rows=row_plan.num_sample_rows,
            num_beam_rows=row_plan.num_beam_rows,
            sampling_metadata=row_plan.sampling_metadata,
            needs_sampled_logprob=row_plan.needs_sampled_logprob,
            prompt_logprob_groups=row_plan.prompt_logprob_groups,
            fill_index=fill_index_t if fill_index else None,
            fill_rows=fill_rows_t if fill_index else None)

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
        input_ids = model_input.input_ids
        if model_input.fill_index is not None:
            input_ids = input_ids.index_copy(0, model_input.fill_index,
                                             previous.sampled.index_select(0, model_input.fill_rows))
        hidden = self._forward(model_input, input_ids)
        if model_input.logits_indices.numel() == 0:
            return PendingStep.start(torch.empty(0, dtype=torch.long, device=hidden.device))
        logits = self.model.compute_logits(hidden[model_input.logits_indices]).float()
        return PendingStep.start(self.sampler.sample_ids(logits, model_input.sampling_metadata))

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> ModelOutput:
        assert model_input.fill_index is None, "placeholders need launch() and the previous step"
        hidden = self._forward(model_input, model_input.input_ids)
        if model_input.logits_indices.numel() == 0:
            return ModelOutput([], None, [], None, [])
        logits = self.model.compute_logits(hidden[model_input.logits_indices]).float()
        n_sample, n_beam = model_input.num_sample_rows, model_input.num_beam_rows

        sampled, sample_logprobs, sampled_lps = [], None, []
        if n_sample:
            sample_logits = logits[:n_sample]
            out = self.sampler(sample_logits, model_input.sampling_metadata)
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
            lps = torch.log_softmax(logits[row:row + count], dim=-1)
            prompt_logprobs.append(logprobs_for_tokens(lps, group.target_token_ids, group.num_top))
            row += count
        return ModelOutput(sampled, sample_logprobs, sampled_lps, beam_logprobs, prompt_logprobs)


class PendingStep:
    """A launched step's sampled ids: on the device for the next step's placeholders, and on
    their way into pinned host memory for the engine."""

    def __init__(self, sampled: torch.Tensor, host: torch.Tensor, copied) -> None:
        self.sampled = sampled
        self._host = host
        self._copied = copied

    @staticmethod
    def start(sampled: torch.Tensor) -> "PendingStep":
        if sampled.device.type != "cuda":
            return PendingStep(sampled, sampled, None)
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(sampled.device))
        return PendingStep(sampled, host, copied)

    def result(self) -> ModelOutput:
        """Waits for the step; the same shape of output as ModelRunner.execute's."""
        if self._copied is not None:
            self._copied.synchronize()
        return ModelOutput(self._host.tolist(), None, [], None, [])


@torch.inference_mode()
def profile_forward(model, device: torch.device, dtype: torch.dtype, num_tokens: int,
                    num_logit_rows: int, block_size: int) -> None:
    """Run the largest step the scheduler can make (one sequence of num_tokens, logits for
    num_logit_rows rows) so the caller can read the activation peak; a throwaway KV cache."""
    from aserve.worker.kv_cache import allocate_kv_caches

    num_blocks = -(-num_tokens // block_size)
    kv_caches = allocate_kv_caches(model, num_blocks, block_size, dtype, device)
    positions = torch.arange(num_tokens, device=device)
    metadata = AttentionMetadata(
        num_tokens=num_tokens,
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device).unsqueeze(0),
        slot_mapping=positions, max_query_len=num_tokens, max_seq_len=num_tokens,
        query_lens_cpu=[num_tokens], seq_lens_cpu=[num_tokens])
    hidden = model(torch.zeros(num_tokens, dtype=torch.long, device=device), positions, kv_caches, metadata)
    rows = torch.arange(min(num_logit_rows, num_tokens), device=device)
    torch.log_softmax(model.compute_logits(hidden[rows]).float(), dim=-1)


@dataclass(frozen=True)
class RowPlan:
    """Which token positions' logits this step needs, built by the engine with the inputs."""

    logits_indices: list[int]
    num_sample_rows: int
    num_beam_rows: int
    sampling_metadata: Optional[SamplingMetadata]
    needs_sampled_logprob: list[bool]
    prompt_logprob_groups: list[PromptLogprobRows]


def _sampled_token_logprobs(logits: torch.Tensor, sampled: list[int], sample_logprobs,
                            wanted: list[bool]) -> list[Optional[float]]:
    """The raw logprob of each sampled token where a cumulative logprob is kept."""
    result: list[Optional[float]] = [None] * len(sampled)
    missing = []
    for row, want in enumerate(wanted):
        if not want:
            continue
        found = sample_logprobs[row] if sample_logprobs is not None else None
        if found is not None and sampled[row] in found:
            result[row] = found[sampled[row]].logprob
        else:
            missing.append(row)
    if missing:
        rows = torch.tensor(missing, device=logits.device)
        tokens = torch.tensor([sampled[r] for r in missing], device=logits.device)
        picked = logits[rows, tokens] - torch.logsumexp(logits[rows], dim=-1)
        for row, value in zip(missing, picked.tolist()):
            result[row] = value
    return result
