"""`python -m aserve --tensor-parallel-size 2` as a user runs it, on the CPU: it serves, and
when a worker dies or the head is signalled, every process ends and the exit status says how."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from aserve import OfflineLLM, SamplingParams
from server_fixtures import subprocess_server

TP2 = ("--tensor-parallel-size", "2", "--kv-cache-memory-gb", "0.05")


def _children(pid: int, workers_only: bool = True) -> list[int]:
    """The processes pid started (workers_only: its worker ranks, not multiprocessing's
    resource tracker, which spawn starts beside them)."""
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as f:
            found += [int(c) for c in f.read().split()]
    if workers_only:
        found = [c for c in found if "spawn_main" in _cmdline(c)]
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie is dead, only not yet reaped
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "a worker process outlived the head"


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _health_until_exit(url: str, proc: subprocess.Popen) -> set[int]:
    """Every /health status the server gave until its process ended."""
    statuses = set()
    while proc.poll() is None:
        statuses.add(_health(url))
        time.sleep(0.05)
    return statuses


def test_tp2_server_streams_the_tokens_of_one_rank():
    expected = OfflineLLM(kv_cache_memory_gb=0.05).generate(
        ["San Francisco is a"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    with subprocess_server(*TP2) as (url, proc, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        stream = client.completions.create(model=model, prompt="San Francisco is a", max_tokens=12,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream) == expected
        assert len(_children(proc.pid)) == 1


def test_a_killed_worker_fails_streams_turns_health_503_and_exits_nonzero():
    with subprocess_server(*TP2) as (url, proc, log_path):
        (worker,) = _children(proc.pid)
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        stream = client.completions.create(model=client.models.list().data[0].id, prompt="Hi",
                                           max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            for _ in stream:   # the stream ends with an error event, it does not hang
                pass
        statuses = _health_until_exit(url, proc)
        assert 503 in statuses
        assert proc.returncode == 1
        with open(log_path) as f:
            assert "worker rank 1" in f.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_head_ends_every_worker(sig):
    with subprocess_server(*TP2) as (url, proc, _):
        assert len(_children(proc.pid)) == 1
        children = _children(proc.pid, workers_only=False)
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        _wait_gone(children)


def test_workers_exit_when_their_head_is_killed(tmp_path):
    # SIGKILL runs no clean-up in the head: each worker notices its parent is gone by itself.
    script = tmp_path / "head.py"
    script.write_text("import time\nfrom aserve import OfflineLLM\n"
                      "llm = OfflineLLM(kv_cache_memory_gb=0.05, tensor_parallel_size=2)\n"
                      "print('ready', flush=True)\ntime.sleep(120)\n")
    head = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert head.stdout.readline().strip() == "ready"
        (worker,) = _children(head.pid)
        head.kill()
        head.wait(30)
        _wait_gone([worker])
    finally:
        if head.poll() is None:
            head.kill()
