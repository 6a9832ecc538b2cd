"""Serving benchmark: replay N requests against any OpenAI-compatible server and report latency.

Requests arrive as a Poisson process at --request-rate per second (inf: all at once), each a
streamed /v1/completions (or /v1/chat/completions) call. Reported: request and token
throughput, time to first token (TTFT), time per output token after the first (TPOT), and
inter-token latency (ITL, the gap between streamed chunks), at mean / p50 / p90 / p99.

It speaks plain OpenAI, so it runs unchanged against aserve, vLLM or any compatible URL:
    python -m aserve --model facebook/opt-125m &
    python bench/serving.py --base-url http://localhost:8000 --num-prompts 1000 --request-rate 10
--random-token-ids V sends each prompt as --input-len random token ids below V (OpenAI's
prompt-as-ids form): exact lengths and no shared prefix, the offline workloads' prompts (the
default, English words, repeats words, which a prefix cache partly reuses).
vLLM's `ignore_eos` extra (fixed output lengths) is sent only with --ignore-eos.
One Python process parses every streamed chunk, so at tens of thousands of chunks a second the
client itself can set the pace: "Client CPU (cores busy)" near 1.0 a process says so, and
--processes N shares the requests (and the rate) over N client processes. All at once, one
process starts every request before any of its connections is up (~0.2 s for 1000 on the
development VM): --warm-connections opens them beforehand, as a pool of keep-alive connections
would hold them.
Token counts come from the final usage chunk (stream_options.include_usage); a server that
sends none is measured in chunks instead (--no-usage to stop asking). --no-stream sends
non-streaming requests: throughput and whole-request latency (as TTFT) only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import aiohttp

_WORDS = ("the of and to in is was for on that with as by at from his her an be this are which it "
          "time year people way day man thing woman life child world school state family student "
          "group country problem hand part place case week company system program question work "
          "government number night point home water room mother area money story fact month lot").split()


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)


def make_prompt(rng: random.Random, length: int, vocab: Optional[int] = None):
    if vocab:  # token ids, as bench/workloads.py draws them
        return [rng.randrange(100, vocab) for _ in range(length)]
    return " ".join(rng.choice(_WORDS) for _ in range(length))


async def one_request(session: aiohttp.ClientSession, args, model: str, prompt: str) -> Result:
    body: dict = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature,
                  "stream": not args.no_stream}
    if args.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if not args.no_usage and not args.no_stream:
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.no_stream:
        return await _one_whole_request(session, args, body)
    result, chunks = Result(), 0
    start = last = time.perf_counter()
    try:
        async with session.post(args.base_url.rstrip("/") + args.endpoint, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                if not any(_carries_tokens(c) for c in event.get("choices") or []):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last, chunks = now, chunks + 1
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = chunks > 0
        if not result.ok:
            result.error = "no output"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.error = repr(exc)
    return result


async def _one_whole_request(session: aiohttp.ClientSession, args, body: dict) -> Result:
    """--no-stream: one JSON answer; its latency stands for the TTFT too (no token comes sooner)."""
    result = Result()
    start = time.perf_counter()
    try:
        async with session.post(args.base_url.rstrip("/") + args.endpoint, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            answer = await resp.json()
        result.latency = result.ttft = time.perf_counter() - start
        usage = answer.get("usage") or {}
        result.prompt_tokens = usage.get("prompt_tokens", 0)
        result.output_tokens = usage.get("completion_tokens", 0)
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no output"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.error = repr(exc)
    return result


def _session(args) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)


async def _served_model(args) -> str:
    """The first model of the server's /v1/models."""
    async with _session(args) as session:
        async with session.get(args.base_url.rstrip("/") + "/v1/models") as resp:
            resp.raise_for_status()
            return (await resp.json())["data"][0]["id"]


async def _open_connections(session: aiohttp.ClientSession, args, count: int) -> None:
    """--warm-connections: `count` keep-alive connections opened (one /v1/models call each, all
    at once, so none is reused) and left in the session's pool before the clock starts."""
    async def touch() -> None:
        async with session.get(args.base_url.rstrip("/") + "/v1/models") as resp:
            await resp.read()

    await asyncio.gather(*(touch() for _ in range(count)))


async def _send_all(args, model: str, prompts: list, rate: float, rng: random.Random,
                    ready=None) -> tuple[list[Result], float, float, float]:
    """Every prompt as its own request, all at once or as a Poisson process at `rate` a second.
    Returns the results, the wall-clock times (time.time) of the first send and of the last
    answer, and the client's CPU seconds in between. `ready` (a coroutine function) is awaited
    just before the clock starts (the other client processes' barrier)."""
    async with _session(args) as session:
        if args.warm_connections:
            await _open_connections(session, args, min(len(prompts), args.max_concurrency or len(prompts)))
        if ready is not None:
            await ready()
        start, cpu = time.time(), time.process_time()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(session, args, model, prompt)))
            # Each request goes out as it is made: aiohttp writes a body from a task of its own,
            # so 1000 requests made before the loop turns went out only once all were made
            # (the first ~80 ms after the start on the development VM).
            await asyncio.sleep(0 if rate == float("inf") else rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        # The clock stops at the last answer, before the session closes its connections (vLLM's
        # benchmark measures the same span).
        return results, start, time.time(), time.process_time() - cpu


def _client_process(args, model: str, prompts: list, rate: float, seed: int, barrier, queue) -> None:
    """One of --processes clients: its share of the prompts, at its share of the rate (N Poisson
    processes at rate/N make one at the rate), started with the others at the barrier (after
    its connections are open, with --warm-connections)."""
    async def at_barrier() -> None:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)

    results, start, end, cpu = asyncio.run(_send_all(args, model, prompts, rate, random.Random(seed), at_barrier))
    queue.put(([dataclasses.asdict(r) for r in results], start, end, cpu))


def run(args) -> dict:
    model = args.model or asyncio.run(_served_model(args))
    rng = random.Random(args.seed)
    prompts = [make_prompt(rng, args.input_len, args.random_token_ids) for _ in range(args.num_prompts)]
    print(f"Benchmarking {model} at {args.base_url}: {args.num_prompts} requests, "
          f"rate {args.request_rate}/s, ~{args.input_len} words in, {args.output_len} tokens out"
          + (f", from {args.processes} client processes" if args.processes > 1 else "")
          + (", over connections opened beforehand" if args.warm_connections else ""), flush=True)
    if args.processes == 1:
        results, start, end, cpu = asyncio.run(_send_all(args, model, prompts, args.request_rate, rng))
        duration = end - start
    else:
        # Processes of their own (spawned: no event loop or session forked), each with its own
        # share; the run lasts from the common start to the last process's end.
        n = args.processes
        context = multiprocessing.get_context("spawn")
        barrier, queue = context.Barrier(n + 1), context.Queue()
        workers = [context.Process(target=_client_process, daemon=True, args=(
            args, model, prompts[i::n], args.request_rate / n, args.seed * 1000 + i, barrier, queue)) for i in range(n)]
        for worker in workers:
            worker.start()
        barrier.wait()
        start = time.time()
        finished = []
        while len(finished) < n:
            try:
                finished.append(queue.get(timeout=1.0))
            except Exception:   # queue.Empty: make sure no client process died instead of reporting
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise SystemExit(f"a client process failed (exit status {dead[0]})") from None
        for worker in workers:
            worker.join()
        results = [Result(**r) for rows, *_ in finished for r in rows]
        duration, cpu = max(end for _, _, end, _ in finished) - start, sum(c for *_, c in finished)
    summary = summarize(args, model, results, duration)
    summary["client"].update(processes=args.processes, cpu_s=cpu, warm_connections=args.warm_connections)
    return summary


def _carries_tokens(choice: dict) -> bool:
    """Whether a streamed choice is tokens arriving, text or not: a token that completes no
    character yet, or a server without a tokenizer, still streams its tokens. A chat's first
    chunk, which only names the role, is not."""
    if "text" in choice:
        return True
    delta = choice.get("delta") or {}
    return "role" not in delta and ("content" in delta or "tool_calls" in delta)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    s = sorted(values)

    def pct(p: float) -> float:  # linear interpolation, as numpy's default
        k = (len(s) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"mean": sum(s) / len(s), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(args, model: str, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "model": model, "base_url": args.base_url, "endpoint": args.endpoint,
        "num_prompts": args.num_prompts, "request_rate": args.request_rate,
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": {k: v * 1000 for k, v in percentiles([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v * 1000 for k, v in percentiles(tpots).items()},
        "itl_ms": {k: v * 1000 for k, v in percentiles([x for r in ok for x in r.itls]).items()},
        "client": {"python": platform.python_version(), "aiohttp": aiohttp.__version__,
                   "host": platform.node()},
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    return summary


def print_summary(s: dict) -> None:
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20)
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_token_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    # The client's own CPU a second of the run: near 1.0 a process, the client may be what limits.
    rows.append(("Client CPU (cores busy)", f"{s['client']['cpu_s'] / s['duration_s']:.2f}"))
    for name, value in rows:
        print(f"{name:<40}{value:>15}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                       ("itl_ms", "Inter-token Latency")):
        print(f"{'-' * 15}{title:^35}{'-' * 15}")
        for stat in ("mean", "p50", "p90", "p99"):
            print(f"{stat.upper() + ' (ms)':<40}{s[key][stat]:>15.2f}")
    if s["errors"]:
        print("Errors:", *s["errors"], sep="\n  ")
    print("=" * 66)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://localhost:8000", help="server root (no /v1)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="default: the first model of /v1/models")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s; inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (per process)")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the requests (and the rate), for servers that one "
                        "Python client cannot keep up with")
    p.add_argument("--warm-connections", action="store_true",
                   help="open a keep-alive connection per request in flight before the clock starts (as "
                        "a gateway's or the openai client's pool would hold them), so that the run does "
                        "not time the client's own burst of TCP connects")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (or token ids)")
    p.add_argument("--random-token-ids", type=int, default=None, metavar="VOCAB",
                   help="prompts of random token ids below VOCAB (completions only)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos (fixed output length)")
    p.add_argument("--no-usage", action="store_true", help="do not ask for the usage chunk")
    p.add_argument("--no-stream", action="store_true",
                   help="non-streaming requests (one JSON answer each; no TPOT or ITL)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    if args.random_token_ids and args.endpoint.endswith("chat/completions"):
        p.error("--random-token-ids sends token-id prompts, which only /v1/completions takes")
    if args.processes < 1:
        p.error("--processes must be at least 1")
    summary = run(args)
    print_summary(summary)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(summary, f, indent=2)
    sys.exit(0 if summary["completed"] else 1)


if __name__ == "__main__":
    main()
