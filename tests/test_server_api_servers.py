"""Several API server processes on one port, over one engine process (--api-server-count,
aserve/server/api_servers.py): the connections spread over them, each request's answer is the
engine's as with one server, /v1/responses' store is one whichever process a client reaches,
a signal ends every process, and one that dies takes the server down with exit code 1."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from aserve.engine.engine_ops import Add
from aserve.engine.engine_process import DETACH, STOP, WANT_OUTPUTS, _serve
from aserve.sampling_params import SamplingParams
from aserve.server.api_servers import api_server_count
from server_fixtures import small_engine_args, subprocess_server
from test_tp_server import _children, _wait_gone

SERVER_ARGS = ("--api-server-count", "2", "--device", "cpu", "--num-gpu-blocks-override", "512")


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    """One request on a connection of its own (so that each may reach another process)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _get(url: str, path: str) -> tuple[int, dict]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _access_log_pids(log_path: str, route: str) -> set[int]:
    with open(log_path) as f:
        return {int(m.group(1)) for m in re.finditer(r"\(APIServer pid=(\d+)\) \S+ INFO aserve.access: \S+ \"" +
                                                     re.escape(route), f.read())}


def _api_server_pids(log_path: str, count: int = 2, timeout: float = 60.0) -> set[int]:
    """The API servers' pids once `count` of them serve (each logs its model when it does:
    health answers as soon as the first does)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path) as f:
            pids = {int(p) for p in re.findall(r"\(APIServer pid=(\d+)\) \S+ INFO aserve.server: model ", f.read())}
        if len(pids) >= count or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


@pytest.fixture(scope="module")
def two_servers():
    with subprocess_server(*SERVER_ARGS) as served:
        assert len(_api_server_pids(served[2])) == 2
        yield served


def test_connections_spread_over_the_api_servers_and_each_answer_is_the_engines(two_servers):
    url, proc, log_path = two_servers
    body = {"prompt": "the same prompt", "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    answers = [_post(url, "/v1/completions", body) for _ in range(24)]
    assert {status for status, _ in answers} == {200}
    assert len({answer["choices"][0]["text"] for _, answer in answers}) == 1   # greedy: one answer
    assert {answer["usage"]["completion_tokens"] for _, answer in answers} == {6}
    deadline = time.monotonic() + 10   # the access log's lines are written after the answers
    while len(_access_log_pids(log_path, "POST /v1/completions")) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    # Each new connection is hashed to one listening process: 24 all to one would be 2**-23.
    assert len(_access_log_pids(log_path, "POST /v1/completions")) == 2


def test_concurrent_streams_from_every_api_server_each_get_their_own_tokens(two_servers):
    url, _, _ = two_servers
    results: dict[int, tuple[int, dict]] = {}

    def ask(i: int) -> None:
        results[i] = _post(url, "/v1/completions", {"prompt": f"prompt number {i}", "max_tokens": 5 + i % 4,
                                                    "temperature": 0.0, "ignore_eos": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(16))
    for i, (status, answer) in results.items():
        assert status == 200
        assert answer["usage"]["completion_tokens"] == 5 + i % 4
    # The same prompt alone gives the same greedy text: no request got another's tokens.
    for i in (0, 7, 13):
        assert _post(url, "/v1/completions", {"prompt": f"prompt number {i}", "max_tokens": 5 + i % 4,
                                              "temperature": 0.0, "ignore_eos": True})[1]["choices"][0]["text"] \
            == results[i][1]["choices"][0]["text"]


def _streamed(url: str, body: dict) -> tuple[str, list[int]]:
    """A streamed completion's text and token ids, joined from its chunks."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        text, ids = "", []
        for line in response.read().decode().splitlines():
            if line.startswith("data: {"):
                choice = json.loads(line[len("data: "):])["choices"][0]
                text += choice["text"]
                ids += choice.get("token_ids") or []
        return text, ids
    finally:
        conn.close()


def test_text_made_by_the_api_servers_is_the_engines_text(two_servers):
    """With several API servers each makes its plain streams' text from their token ids (not the
    engine process: server_detokenizer.py): streamed or not, the text the engine makes offline.
    Random ids of the byte-level model leave characters split over tokens, and some open at the end."""
    from aserve import OfflineLLM, SamplingParams
    from hf_reference import random_prompts

    url = two_servers[0]
    prompts = random_prompts(5, [7, 3, 12, 5, 9, 4], vocab=1000)
    llm = OfflineLLM(device="cpu", kv_cache_memory_gb=0.05)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, skip_special_tokens=False)
    want = [(o.outputs[0].text, o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert any("\ufffd" in text for text, _ in want)
    for prompt, (text, ids) in zip(prompts, want):
        body = {"prompt": prompt, "max_tokens": 14, "temperature": 0.0, "ignore_eos": True,
                "skip_special_tokens": False, "return_token_ids": True}
        status, answer = _post(url, "/v1/completions", body)
        assert status == 200 and answer["choices"][0]["text"] == text
        assert _streamed(url, body) == (text, ids)


def test_a_stored_response_reads_back_through_every_api_server(two_servers):
    url, _, log_path = two_servers
    status, created = _post(url, "/v1/responses", {"input": "hello there", "max_output_tokens": 4})
    assert status == 200
    for _ in range(16):
        status, read = _get(url, f"/v1/responses/{created['id']}")
        assert status == 200
        assert read["id"] == created["id"] and read["output"] == created["output"]
    # Both processes answered a GET, the second through the first's store (responses_proxy.py).
    assert len(_access_log_pids(log_path, f"GET /v1/responses/{created['id']}")) == 2
    status, follow_up = _post(url, "/v1/responses", {"input": "and then", "max_output_tokens": 3,
                                                     "previous_response_id": created["id"]})
    assert status == 200 and follow_up["previous_response_id"] == created["id"]
    assert _get(url, "/v1/responses/resp_nothing_like_it")[0] == 404


def test_a_stored_response_streams_through_every_api_server(two_servers):
    url, _, _ = two_servers
    parts = urllib.parse.urlsplit(url)
    for _ in range(6):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        conn.request("POST", "/v1/responses", json.dumps({"input": "stream it", "max_output_tokens": 4,
                                                          "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        events = response.read().decode()
        conn.close()
        assert events.startswith("event: response.created")
        assert re.search(r"event: response\.incomplete\ndata: .*\"max_output_tokens\"", events)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_first_ends_every_api_server_and_the_engine(sig):
    with subprocess_server(*SERVER_ARGS) as (url, proc, log_path):
        assert len(_api_server_pids(log_path)) == 2
        processes = _children(proc.pid)
        assert len(processes) == 2   # the engine process and the second API server
        assert _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        _wait_gone(processes)


def test_an_api_server_that_dies_takes_the_server_down_with_exit_code_1():
    with subprocess_server(*SERVER_ARGS) as (url, proc, log_path):
        (second,) = _api_server_pids(log_path) - {proc.pid}
        processes = _children(proc.pid)
        assert second in processes
        os.kill(second, signal.SIGKILL)
        assert proc.wait(60) == 1
        _wait_gone(processes)


def test_api_servers_refuse_a_port_another_program_shares_with_so_reuseport():
    """They share their port through SO_REUSEPORT, which would let them bind beside another
    process that set it too (another server of the same user): they refuse, as for a busy port."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "aserve", *SERVER_ARGS, "--host", "127.0.0.1",
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    finally:
        holder.close()
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr


def test_one_api_server_unless_asked_for_more_which_need_the_engine_in_its_own_process():
    assert api_server_count(None, None) == 1   # vLLM's default
    assert api_server_count(None, True) == 1
    assert api_server_count(3, None) == 3
    with pytest.raises(ValueError, match="--api-server-count must be at least 1"):
        api_server_count(0, None)
    with pytest.raises(ValueError, match="--no-engine-process"):
        api_server_count(2, False)


class _Pipes:
    """One API server's pipes to an engine that _serve runs in a thread of this process."""

    def __init__(self):
        self.ops_in, self.ops_out = multiprocessing.Pipe(duplex=False)
        self.batches_in, self.batches_out = multiprocessing.Pipe(duplex=False)

    def send(self, *ops) -> None:
        import pickle

        self.ops_out.send([pickle.dumps(op) for op in ops])

    def outputs_until_finished(self, request_id: str, timeout: float = 60.0) -> list:
        deadline = time.monotonic() + timeout
        items = []
        while time.monotonic() < deadline:
            assert self.batches_in.poll(max(0.0, deadline - time.monotonic()))
            kind, batch_items, _, _, _, _ = self.batches_in.recv()
            assert kind == "batch"
            items += batch_items
            if any(item[0] == request_id and item[4] for item in batch_items):   # finished
                return items
            self.send(WANT_OUTPUTS)
        raise AssertionError(f"{request_id} did not finish")


def _serve_in_a_thread(num_clients: int):
    """An engine stepping in a thread of this process for num_clients API servers' pipes."""
    from aserve.engine.engine import Engine
    from aserve.engine.engine_process import _Client

    engine = Engine(small_engine_args())
    engine.defer_outputs = True
    pipes = [_Pipes() for _ in range(num_clients)]
    serving = threading.Thread(target=_serve, args=(engine, [_Client(p.ops_in, p.batches_out) for p in pipes]),
                               daemon=True)
    serving.start()
    return engine, serving, pipes


def test_an_api_server_that_leaves_has_its_requests_aborted_and_the_other_is_served():
    engine, serving, (first, second) = _serve_in_a_thread(2)
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    second.send(Add("second's", [5, 6, 7], long, time.time(), 0), WANT_OUTPUTS)
    first.send(Add("first's", [1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), time.time(), 0),
               WANT_OUTPUTS)
    second.send(DETACH)
    items = first.outputs_until_finished("first's")
    assert {item[0] for item in items} == {"first's"}   # only its own request's outputs
    deadline = time.monotonic() + 30
    while "second's" in engine.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "second's" not in engine.requests   # aborted with its server's leaving
    first.send(STOP)
    serving.join(30)
    assert not serving.is_alive()


def test_an_idle_api_server_hears_nothing_of_the_others_steps():
    """It asked for its next batch and has no request: no empty batch after every step."""
    _, serving, (first, second) = _serve_in_a_thread(2)
    second.send(WANT_OUTPUTS)
    first.send(Add("first's", [1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), time.time(), 0),
               WANT_OUTPUTS)
    first.outputs_until_finished("first's")
    assert not second.batches_in.poll(0.2)
    first.send(STOP)
    serving.join(30)
    assert not serving.is_alive()
