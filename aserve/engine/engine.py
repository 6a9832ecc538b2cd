"""Engine: one step of continuous batching = schedule -> execute (model + sampler) -> process.

The three parts are separate so the async engine can run execute() off the event loop; a
synchronous user calls step(). Requests enter through add_request(), which validates them
against the model and the cache so that nothing the engine accepts can later fail to fit.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from aserve.config import CacheConfig, EngineArgs, SchedulerConfig
from aserve.distributed.group import TensorParallelError
from aserve.executor.model_side import start_model_side
from aserve.engine.block_manager import BlockManager
from aserve.engine.output_processor import GrammarConflictError, OutputProcessor
from aserve.engine.pooling import check_runner_takes, pooling_as_sampling
from aserve.engine.pipeline import StepGen, StepPipeline, can_pipeline, run_step_gen
from aserve.engine.step_warmup import step_warmup_enabled, warm_up_step_kinds
from aserve.engine.request import Request, RequestStatus
from aserve.engine.request_factory import RequestFactory
from aserve.engine.scheduler import Scheduler, SchedulerOutput
from aserve.engine.stats import EngineStats, EngineStatsRecorder, finish_reason_of
from aserve.models.loader import check_tensor_parallel_split, create_model_config, load_tokenizer
from aserve.models.pooling_config import normalizes_by_default
from aserve.outputs import RequestOutput
from aserve.worker.kv_cache import bytes_per_block
from aserve.worker.model_runner import ModelInput, ModelOutput
from aserve.engine.row_planner import RowPlanner
from aserve.engine.step_inputs import build_step_arrays
from aserve.structured_output.backend import GrammarBackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    sched: SchedulerOutput
    model_input: Optional[ModelInput]
    row_spans: list           # per scheduled sequence: RowSpan from the row planner


class Engine:
    """Owns the model, the KV cache and every request; not thread-safe (one driver)."""

    def __init__(self, args: Optional[EngineArgs] = None) -> None:
        started = time.perf_counter()
        args = args or EngineArgs()
        self.args = args
        self.parallel_config = args.parallel_config()
        if self.parallel_config.node_rank != 0:
            raise ValueError("the engine runs on the head node (node_rank 0); other nodes run "
                             "`python -m aserve --headless`, which starts their ranks.")
        self.model_config = create_model_config(args)
        # runner="pooling": embeddings (engine/pooling.py); a model that pools otherwise than by
        # its last token is refused here, before anything is loaded.
        self.pooling = args.runner == "pooling"
        self.normalize_embeddings = self.pooling and normalizes_by_default(self.model_config.model_path)
        check_tensor_parallel_split(self.model_config, self.parallel_config.world_size)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(self.model_config)
        self.device, self.runner, self.workers = start_model_side(
            args, self.model_config, self.parallel_config, args.resolve_device())
        max_len = self.model_config.max_model_len
        self.scheduler_config = SchedulerConfig(
            max_num_batched_tokens=args.resolve_max_num_batched_tokens(self.device),
            max_num_seqs=args.resolve_max_num_seqs(self.device), max_model_len=max_len)
        num_blocks = self.runner.num_blocks
        self.cache_config = CacheConfig(args.block_size, num_blocks, 0)
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self._caching, self._block_size = args.enable_prefix_caching, args.block_size
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.row_planner = RowPlanner()
        self.model = self.runner.model
        block_bytes = bytes_per_block(self.model, args.block_size, self.model_config.dtype)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB%s); maximum concurrency for %d-token "
                    "requests: %.2fx", num_blocks, args.block_size, num_blocks * block_bytes / (1 << 30),
                    " on each rank" if self.workers else "", max_len, num_blocks * args.block_size / max_len)
        graphs = self.runner.decode_graphs
        if graphs is not None:
            logger.info("captured CUDA graphs of decode steps for %d batch sizes (1 to %d, contexts up "
                        "to %d tokens) in %.1f s (%.1f s of it eager warm-up runs)", len(graphs.sizes),
                        graphs.sizes[-1], graphs.max_seq_len, graphs.capture_seconds, graphs.warmup_seconds)
        self.outputs = OutputProcessor(self.tokenizer, self.block_manager, max_len)
        self.requests: dict[str, Request] = {}
        self.grammars = (GrammarBackend(self.tokenizer, self.model_config.vocab_size)
                         if self.tokenizer is not None else None)
        self.factory = RequestFactory(self.tokenizer, self.model_config, self.scheduler_config,
                                      self.block_manager, self.device, self.grammars)
        # Structured-output requests whose grammar matcher is still being made, and those
        # whose matcher failed (reported with the next step's outputs).
        self._awaiting_grammar: list[Request] = []
        self._failed_early: list[tuple[Request, str]] = []
        # Offline use wants only final outputs; building per-step outputs costs time.
        self.stream_outputs = True
        # The server's engine thread keeps stepping while its event loop is busy, and hands over
        # one output per changed request when the loop asks (take_unreported_outputs), not one
        # per step.
        self.defer_outputs = False
        self._unreported: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # Request and step statistics for /metrics (enable_stats); None offline, as in vLLM.
        self.stats: Optional[EngineStatsRecorder] = None
        self._ids = itertools.count()
        # Requests whose sampling reads their token history on the host: while any is here,
        # steps run synchronously (see engine/pipeline.py).
        self._unpipelinable: set[str] = set()
        # A pooling engine runs prompts only, whose rows read nothing back: steps run in turn.
        self.pipeline = StepPipeline(self) if args.async_scheduling and not self.pooling else None
        if step_warmup_enabled(self):
            logger.info("warmed up the steps with prompt tokens in %.2f s", warm_up_step_kinds(self))
        self.startup_seconds = time.perf_counter() - started
        logger.info("engine ready in %.1f s: %s on %s%s, %d KV blocks of %d tokens",
                    self.startup_seconds, self.model_config.model, self.device,
                    f" and {self.parallel_config.world_size - 1} more ranks" if self.workers else "",
                    num_blocks, args.block_size)

    def enable_stats(self) -> EngineStatsRecorder:
        """Record vLLM's request and step statistics from now on (the server's /metrics)."""
        if self.stats is None:
            self.stats = EngineStatsRecorder(self.model_config.max_model_len)
        return self.stats

    def shutdown(self) -> None:
        """End the worker ranks (tensor parallelism); the engine serves no more steps."""
        if self.workers is not None:
            self.workers.shutdown()
        if self.grammars is not None:
            self.grammars.shutdown()

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: Optional[str], prompt: Union[str, list[int]], params,
                    arrival_time: Optional[float] = None) -> str:
        """Queue a request; raises ValueError (naming the problem) if it can never be served."""
        if request_id is None:
            request_id = str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        pooling = check_runner_takes(params, self.pooling, self.model_config.hf_config.hidden_size,
                                     self.normalize_embeddings)
        if pooling is not None:   # the prompt's run is a one-row "sample" that is pooled instead
            params = pooling_as_sampling(pooling)
        request = self.factory.create(request_id, prompt, params,
                                      arrival_time if arrival_time is not None else time.monotonic(),
                                      pooling=pooling is not None)
        request.pooling_params = pooling
        self.requests[request_id] = request
        if not can_pipeline(request):
            self._unpipelinable.add(request_id)
        if request.pending_matcher is not None:
            self._awaiting_grammar.append(request)
        else:
            self.scheduler.add_request(request)
        return request_id

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        """Drop requests and free their blocks at once; unknown or finished ids are ignored."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.pop(request_id, None)
            self._unpipelinable.discard(request_id)
            self._unreported.pop(request_id, None)
            if request is None or request.is_finished:
                continue
            if request in self._awaiting_grammar:
                self._awaiting_grammar.remove(request)
                request.pending_matcher.cancel()
                request.status = RequestStatus.FINISHED
            else:
                self.scheduler.remove_request(request)
            if self.stats is not None:
                self.stats.on_finished(request, "abort", time.monotonic())

    def has_unfinished_requests(self) -> bool:
        in_flight = self.pipeline is not None and self.pipeline.in_flight is not None
        return self.scheduler.num_unfinished > 0 or in_flight or bool(self._awaiting_grammar)

    def all_requests_pipelinable(self) -> bool:
        return not self._unpipelinable

    # ---------------------------------------------------------------- one step
    def schedule(self, placeholder_rows: Optional[dict[int, int]] = None) -> StepPlan:
        """Choose this step's work and build its inputs. placeholder_rows (async scheduling):
        for sequences whose last token is still being sampled, its row in that step's ids."""
        if self._awaiting_grammar:
            self._admit_grammar_ready()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return StepPlan(sched, None, [])
        rows = self.row_planner.plan(sched)
        arrays = build_step_arrays(sched, rows.row_plan, self.block_manager, placeholder_rows)
        return StepPlan(sched, self.runner.model_input(arrays, rows.row_plan), rows.spans)

    def _admit_grammar_ready(self) -> None:
        """Queue the structured-output requests whose matcher is made; fail those whose grammar
        could not be made (their outputs go out with the next step's)."""
        still = []
        for request in self._awaiting_grammar:
            future = request.pending_matcher
            if not future.done():
                still.append(request)
                continue
            request.pending_matcher = None
            try:
                request.seqs[0].matcher = future.result()
            except Exception as exc:
                self._failed_early.append((request, f"structured_outputs: {exc}"))
                continue
            self.scheduler.add_request(request)
        self._awaiting_grammar = still

    def execute(self, plan: StepPlan) -> Optional[ModelOutput]:
        """The model forward and sampling; touches nothing but the plan and the KV cache."""
        if plan.model_input is None:
            return None
        return self.runner.execute(plan.model_input)

    def process(self, plan: StepPlan, output: Optional[ModelOutput],
                computed_already_advanced: bool = False) -> list[RequestOutput]:
        """Apply a step's results. computed_already_advanced: async scheduling counted the
        step's tokens as computed when it scheduled the next step."""
        changed: dict[str, Request] = {}
        tokens_before = self.prompt_tokens_total + self.generation_tokens_total
        while self._failed_early:
            request, message = self._failed_early.pop()
            request.error = message
            request.seqs[0].finish_reason = "abort"
            request.status = RequestStatus.FINISHED
            changed[request.request_id] = request
        now = time.monotonic()
        for item, span in zip(plan.sched.scheduled, plan.row_spans):
            request = item.request
            if request.is_finished:   # aborted while the model ran
                continue
            try:
                self._apply(item, span, output, now, computed_already_advanced)
            except GrammarConflictError as exc:  # the request contradicts itself: no fault here
                logger.info("request %s ended: %s", request.request_id, exc)
                self._fail(request, str(exc))
            except Exception as exc:  # one request's failure must not stop the others
                logger.exception("request %s failed", request.request_id)
                self._fail(request, f"internal error: {exc!r}")
            changed[request.request_id] = request
        if self.stats is not None:
            self.stats.on_step(self.prompt_tokens_total + self.generation_tokens_total - tokens_before, now)
        return self._report(changed.values())

    def fail_step(self, plan: StepPlan, exc: BaseException) -> list[RequestOutput]:
        """execute() raised: end the requests of that step with the error, keep serving.
        With tensor parallelism, a failed collective or a dead worker is raised instead: the
        ranks are out of step and no later step could be trusted."""
        if self.workers is not None:
            failure = self.workers.wait_for_failure(2.0 if isinstance(exc, TensorParallelError) else 0.0)
            if failure is not None:
                raise failure from exc
        if isinstance(exc, TensorParallelError):
            raise exc
        logger.error("model step failed: %r", exc)
        failed = {item.request.request_id: item.request for item in plan.sched.scheduled
                  if not item.request.is_finished}
        for request in failed.values():
            self._fail(request, f"model execution failed: {exc!r}")
        return self._report(failed.values())

    def step(self) -> list[RequestOutput]:
        """One step of continuous batching; with async scheduling, the next step is already
        on the GPU when this returns."""
        return run_step_gen(self.step_gen())

    def step_gen(self) -> StepGen:
        """One step as a generator that yields its model work (callables) and is sent their
        results, for a driver that runs that work elsewhere (the server's worker thread);
        returns the step's outputs. A failure of the model work fails that step's requests."""
        if self.workers is not None:
            self.workers.raise_if_failed()
        if self.pipeline is not None:
            return (yield from self.pipeline.step_gen())
        return (yield from self.sync_step_gen(self.schedule()))

    def sync_step_gen(self, plan: StepPlan) -> StepGen:
        """A scheduled step run synchronously: execute, then process (step_gen's protocol)."""
        if plan.model_input is None:
            return self.process(plan, None)
        try:
            output = yield functools.partial(self.execute, plan)
        except Exception as exc:
            return self.fail_step(plan, exc)
        return self.process(plan, output)

    def _apply(self, item, span, output: ModelOutput, now: float,
               computed_already_advanced: bool = False) -> None:
        request, seq = item.request, item.seq
        if not computed_already_advanced:
            seq.num_computed_tokens += item.num_new_tokens
        if self._caching and seq.num_computed_tokens // self._block_size > item.start // self._block_size:
            # This step filled a block: its KV is computed now, so it may be cached.
            self.block_manager.cache_computed_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        if item.start < seq.num_prompt_tokens:
            self.prompt_tokens_total += max(0, min(seq.num_computed_tokens, seq.num_prompt_tokens) - item.start)
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = now
        if span.prompt_group >= 0:
            self.outputs.add_prompt_logprobs(request, span.prompt_first,
                                           output.prompt_logprobs[span.prompt_group])
        if not item.samples:
            return
        if request.pooling_params is not None:   # the prompt ran to its end: its vector is done
            self.outputs.finish_pooled(request, seq, output.pooled[span.sample_start])
            self.scheduler.remove_request(request)
            return
        if request.beam_state is not None:
            if span.beam_last:  # every beam of the request has its logits: one beam step
                self.outputs.beam_step(request, output.beam_logprobs[span.beam_first:span.beam_row + 1])
                self._count_token(request, now, len(request.live_seqs))
        else:
            first, count = span.sample_start, span.sample_count
            if output.sample_errors:  # sampling failed for this request alone: it fails (process)
                for row in range(first, first + count):
                    if row in output.sample_errors:
                        raise output.sample_errors[row]
            if count == 1:  # the common case, kept cheap: no range, zip or list per request
                self._append_sample(request, seq, first, output)
            else:
                self.outputs.fork_for_samples(request)
                for row, target in zip(range(first, first + count), request.seqs):
                    self._append_sample(request, target, row, output)
                count = len(request.seqs)
            self._count_token(request, now, count)
        if not request.live_seqs:
            self.scheduler.remove_request(request)

    def _append_sample(self, request: Request, seq, row: int, output: ModelOutput) -> None:
        self.outputs.append_token(
            request, seq, output.sampled_token_ids[row], output.sample_logprobs, row,
            output.sampled_token_logprobs[row] if output.sampled_token_logprobs else None)

    def _count_token(self, request: Request, now: float, count: int) -> None:
        self.generation_tokens_total += count
        if self.stats is not None:
            self.stats.on_token(request, now)
        request.metrics.num_generation_tokens += count
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
            # Its prompt is done: the tokens the prefix cache served count as prompt tokens too,
            # as vLLM counts the whole prompt then (prompt_tokens_total, the iteration tokens;
            # the by-source counter tells the two apart).
            self.prompt_tokens_total += request.num_cached_tokens or 0

    def _fail(self, request: Request, message: str) -> None:
        request.error = message
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        if not request.is_finished:  # its blocks' content is not trusted: none stays cached
            self.scheduler.remove_request(request, keep_cached=False)

    def _report(self, requests: Iterable[Request]) -> list[RequestOutput]:
        outputs = []
        for request in requests:
            if request.is_finished:
                self.requests.pop(request.request_id, None)
                self._unpipelinable.discard(request.request_id)
                outputs.append(self.outputs.make_output(request))
                if self.stats is not None:
                    self.stats.on_finished(request, finish_reason_of(request), time.monotonic())
            elif self.stream_outputs and request.reports_progress:
                # (Not a beam search's: its answer is its final beams, as vLLM's, and the live
                # beams of a step are not prefixes of it; nor a FINAL_ONLY request's.)
                if self.defer_outputs:
                    self._unreported[request.request_id] = request
                else:
                    outputs.append(self.outputs.make_output(request))
        return outputs

    def take_unreported_outputs(self) -> list[RequestOutput]:
        """With defer_outputs: the newest output of each unfinished request that changed since
        the last call (a request that finished was reported by its step, as always)."""
        pending, self._unreported = self._unreported, {}
        return [self.outputs.make_output(r) for r in pending.values() if not r.is_finished]

    # ---------------------------------------------------------------- observation
    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_used_blocks=bm.num_used_blocks, num_total_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_cache.query_tokens if bm.prefix_cache else 0,
            prefix_cache_hits=bm.prefix_cache.hit_tokens if bm.prefix_cache else 0)

    def stats_snapshot(self) -> tuple[EngineStats, Optional[EngineStatsRecorder]]:
        """The counts and the recorder at once (an engine in another process sends them)."""
        return self.get_stats(), self.stats

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's reset_prefix_cache; e.g. after a weight change)."""
        self.block_manager.reset_prefix_cache()
        return True

    def get_request_status(self, request_id: str) -> Optional[RequestStatus]:
        request = self.requests.get(request_id)
        return request.status if request is not None else None
