"""Tensor parallelism through the engine, on the CPU over gloo with real worker processes:
the same tokens as one rank (and as transformers), for every family and every path a step
can take, and failures that end the engine cleanly instead of hanging."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest

from aserve import OfflineLLM, SamplingParams
from aserve.executor.worker_group import WorkerFailedError
from hf_reference import hf_greedy, random_prompts
from server_fixtures import free_port
from tiny_models import FAMILIES, make_tiny_model, tiny_model_dir

MAX_TOKENS = 24
PROMPT_LENGTHS = [3, 17, 40, 9]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Beyond the tiny models of every family: MQA with tied embeddings (one KV head, so every
# rank keeps a replica), the same for Cohere's per-head k norms (each rank loads the replicated
# head's weights), and GPT-2 with an odd vocabulary (padded to divide over the ranks).
VARIANTS = {"llama-mqa": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
            "cohere-mqa": ("cohere", dict(num_key_value_heads=1)),
            "gpt2-odd-vocab": ("gpt2", dict(vocab_size=509))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name in FAMILIES:
            return tiny_model_dir(name)
        if name not in built:
            family, overrides = VARIANTS[name]
            built[name] = make_tiny_model(family, tmp_path_factory.mktemp(name), **overrides)
        return built[name]

    return get


@pytest.fixture(scope="module")
def tp_llm():
    """One tensor-parallel OfflineLLM at a time (each holds worker processes), by settings."""
    current: dict = {}

    def get(path: str, tp: int, **kwargs) -> OfflineLLM:
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("kv_cache_memory_gb", 0.25)
        key = (path, tp, tuple(sorted(kwargs.items())))
        if current.get("key") != key:
            if "llm" in current:
                current.pop("llm").shutdown()
            current["llm"], current["key"] = OfflineLLM(model=path, tensor_parallel_size=tp, **kwargs), key
        return current["llm"]

    yield get
    if "llm" in current:
        current["llm"].shutdown()


def _greedy_ids(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _hf(path, prompts):
    return [hf_greedy(path, p, MAX_TOKENS) for p in prompts]


@pytest.mark.parametrize("name", FAMILIES + tuple(VARIANTS))
def test_tp2_greedy_equals_transformers_through_preemption_and_chunked_prefill(name, model_dir, tp_llm):
    # 7-token steps chunk every prompt; 14 blocks of 8 tokens cannot hold the 4 requests at
    # once, so some are preempted and recomputed.
    path = model_dir(name)
    llm = tp_llm(path, 2, block_size=8, num_gpu_blocks_override=14, max_num_batched_tokens=7)
    prompts = random_prompts(2, PROMPT_LENGTHS, vocab=500)
    before = llm.engine.scheduler.num_preemptions
    assert _greedy_ids(llm, prompts) == _hf(path, prompts)
    assert llm.engine.scheduler.num_preemptions > before
    assert llm.engine.block_manager.num_free_blocks == 14


@pytest.mark.parametrize("name", ["llama", "llama-mqa", "gpt2-odd-vocab", "opt-postln"])
def test_tp4_greedy_equals_transformers(name, model_dir, tp_llm):
    path = model_dir(name)
    prompts = random_prompts(1, PROMPT_LENGTHS, vocab=500)
    assert _greedy_ids(tp_llm(path, 4), prompts) == _hf(path, prompts)


def test_tp2_sampling_logprobs_n_and_beams_equal_one_rank(model_dir, tp_llm, llm_cache):
    one, two = llm_cache("llama"), tp_llm(model_dir("llama"), 2)
    prompts = random_prompts(5, [6, 21, 13], vocab=500)
    cases = [
        SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=11, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, n=3, best_of=4, seed=5, max_tokens=8, ignore_eos=True),
        SamplingParams(use_beam_search=True, best_of=3, n=2, temperature=0.0, max_tokens=8),
        SamplingParams(temperature=0.0, logprobs=4, prompt_logprobs=3, max_tokens=6, ignore_eos=True),
    ]
    for params in cases:
        a, b = (llm.generate(prompts, params, use_tqdm=False) for llm in (one, two))
        for x, y in zip(a, b):
            assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs], params
            for cx, cy in zip(x.outputs, y.outputs):
                if params.logprobs is not None:
                    _close_logprobs(cx.logprobs, cy.logprobs)
            if params.prompt_logprobs is not None:
                _close_logprobs(x.prompt_logprobs[1:], y.prompt_logprobs[1:])
    assert two.engine.block_manager.num_used_blocks == 0


def _close_logprobs(xs, ys):
    # The shards' partial sums are added in another order than one rank's matmul: float32
    # rounding, about 1e-6 of the logits' size, which these tiny models make large (std 4-8).
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for token in x:
            assert abs(x[token].logprob - y[token].logprob) <= 1e-5 * max(1.0, abs(x[token].logprob))
            assert x[token].rank == y[token].rank


def test_the_sync_and_async_steps_agree_under_tp(model_dir, tp_llm):
    path = model_dir("qwen2")
    prompts = random_prompts(9, [5, 30, 12], vocab=500)
    synchronous = _greedy_ids(tp_llm(path, 2, async_scheduling=False), prompts)
    assert synchronous == _greedy_ids(tp_llm(path, 2), prompts) == _hf(path, prompts)


def test_two_nodes_on_loopback_give_the_same_tokens(model_dir):
    # Node 1 is `python -m aserve --headless` in its own process; node 0 is this engine.
    path, port = model_dir("llama"), free_port()
    node = ["--model", path, "--dtype", "float32", "--kv-cache-memory-gb", "0.25",
            "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port)]
    headless = subprocess.Popen([sys.executable, "-m", "aserve", *node, "--node-rank", "1", "--headless"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        llm = OfflineLLM(model=path, dtype="float32", kv_cache_memory_gb=0.25, tensor_parallel_size=2,
                         nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=port)
        prompts = random_prompts(4, PROMPT_LENGTHS, vocab=500)
        assert _greedy_ids(llm, prompts) == _hf(path, prompts)
        llm.shutdown()
        assert headless.wait(60) == 0   # the head's shutdown ends the other node's ranks
    finally:
        if headless.poll() is None:
            headless.kill()
        output = headless.communicate()[0]
    assert "started ranks [1]" in output


def _kill_first_worker_when_it_appears(deadline_s: float = 60.0) -> threading.Thread:
    existing = {p.pid for p in multiprocessing.active_children()}   # other tests' engines

    def kill() -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            new = [p for p in multiprocessing.active_children() if p.pid not in existing]
            if new:
                os.kill(new[0].pid, 9)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_worker_killed_while_starting_fails_the_engine_at_once(model_dir):
    killer = _kill_first_worker_when_it_appears()
    started = time.monotonic()
    with pytest.raises(WorkerFailedError, match="rank 1 .* failed while starting"):
        OfflineLLM(model=model_dir("llama"), dtype="float32", kv_cache_memory_gb=0.25,
                   tensor_parallel_size=2)
    killer.join()
    assert time.monotonic() - started < 60


def test_a_worker_killed_while_running_makes_generate_raise(model_dir):
    existing = {p.pid for p in multiprocessing.active_children()}
    llm = OfflineLLM(model=model_dir("llama"), dtype="float32", kv_cache_memory_gb=0.25,
                     tensor_parallel_size=2)
    (worker,) = [p for p in multiprocessing.active_children() if p.pid not in existing]
    long_run = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    threading.Timer(1.0, os.kill, (worker.pid, 9)).start()
    with pytest.raises(WorkerFailedError, match="rank 1 .* died"):
        llm.generate(random_prompts(6, [8] * 8, vocab=500), long_run, use_tqdm=False)
    with pytest.raises(WorkerFailedError):   # the engine stays failed
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    llm.shutdown()
    assert not worker.is_alive()


def test_shutdown_leaves_no_worker_process(model_dir):
    existing = {p.pid for p in multiprocessing.active_children()}
    with OfflineLLM(model=model_dir("gpt2"), dtype="float32", kv_cache_memory_gb=0.25,
                    tensor_parallel_size=4) as llm:
        workers = [p for p in multiprocessing.active_children() if p.pid not in existing]
        assert len(workers) == 3
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert not any(p.is_alive() for p in workers)
