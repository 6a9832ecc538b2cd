"""A few throwaway requests stepped through the engine as it starts on a GPU, so that the first
real steps with prompt tokens do not pay for loading kernels on first use.

CUDA loads a kernel's module when it is first launched (lazy loading), and cuBLAS picks and
loads kernels per problem shape. The start's own runs cover two kinds of step only: the memory
profile's one prompt step (fresh prompts, the largest step) and the decode graphs' captures.
The first steps that mix decodes with prompts, and the first prompt whose first blocks come
from the prefix cache (its attention reads its context from the cache: index arithmetic on the
GPU that nothing else does), loaded theirs while a served burst waited: on an H100, the first
mixed steps of offline A took 56-93 ms where a later one of the same size took 30
(bench/RESULTS.md, thirty-first session). Here a decode runs beside a fresh prompt, a prompt
with cached context, and rows sampled both greedily and at random, in steps of a few tokens.

The requests use ids no caller can (a leading NUL), and the engine is left as it was: no
requests, its token counters at zero, its prefix cache emptied, its sampler's stream back at
the seed. ASERVE_STEP_WARMUP=0 skips it.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from aserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STEP_WARMUP_ENV = "ASERVE_STEP_WARMUP"
_ID_PREFIX = "\0warm-up-"


def step_warmup_enabled(engine) -> bool:
    """On a GPU (the CPU loads nothing lazily) for a generating engine, unless switched off."""
    setting = os.environ.get(STEP_WARMUP_ENV, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{STEP_WARMUP_ENV} must be 0 or 1, got {setting!r}")
    return setting == "1" and engine.device.type == "cuda" and not engine.pooling


def warm_up_step_kinds(engine) -> float:
    """Run the warm-up requests to their end and leave the engine clean; returns the seconds.
    A warm-up that fails is logged and left: the start goes on, its first steps load as before."""
    started = time.perf_counter()
    try:
        _run_warm_up_requests(engine)
    except Exception:  # noqa: BLE001 - a missed speed-up must never stop a start
        logger.warning("the warm-up of the steps with prompt tokens failed; serving without it",
                       exc_info=True)
        if engine.pipeline is not None:   # a step already launched (async scheduling)
            engine.pipeline.drain()
    _leave_clean(engine)
    return time.perf_counter() - started


_MAX_TOKENS = 4


def _run_warm_up_requests(engine) -> None:
    rng = np.random.RandomState(0)
    vocab, block = engine.model_config.vocab_size, engine.block_manager.block_size
    longest = engine.model_config.max_model_len - _MAX_TOKENS   # every prompt fits the context

    def prompt(length: int) -> list[int]:
        return rng.randint(0, vocab, size=max(1, min(length, longest))).tolist()

    greedy = SamplingParams(temperature=0.0, max_tokens=_MAX_TOKENS, ignore_eos=True, detokenize=False)
    random = SamplingParams(temperature=1.0, max_tokens=_MAX_TOKENS, ignore_eos=True, detokenize=False)
    first = prompt(2 * block + 5)
    engine.add_request(_ID_PREFIX + "0", first, greedy)
    engine.step()   # a prompt step; the first request decodes from here on
    engine.add_request(_ID_PREFIX + "1", prompt(block + 3), random)
    # Its first blocks are the first request's, cached: a prompt with context (the block that
    # holds a prompt's last token is never taken from the cache, so one more token at least).
    cached = first[:(len(first) - 1) // block * block]
    if cached and len(cached) < longest:
        engine.add_request(_ID_PREFIX + "2", cached + prompt(min(7, longest - len(cached))), greedy)
    while engine.has_unfinished_requests():
        engine.step()


def _leave_clean(engine) -> None:
    leftover = [request_id for request_id in engine.requests if request_id.startswith(_ID_PREFIX)]
    engine.abort_request(leftover)
    engine._unreported.clear()
    engine.prompt_tokens_total = engine.generation_tokens_total = 0
    engine.scheduler.num_preemptions = 0
    engine.block_manager.reset_prefix_cache()
    engine.runner.sampler.reset()
