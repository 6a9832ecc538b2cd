"""Start-up as an operator expects: the port is bound before the model loads (a busy port fails
at once, /health answers 503 "loading" until ready), the start log says what runs where, and
each start-up error is one line saying what to do (the traceback only with --debug)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from aserve.server.admission import DEFAULT_MAX_WAITING
from server_fixtures import free_port, subprocess_server
from tiny_models import tiny_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m aserve *args` expected to fail while starting."""
    return subprocess.run([sys.executable, "-m", "aserve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_an_unreachable_hub_says_so_and_how_to_fail_fast():
    # Tests run with HF_HUB_OFFLINE=1 (conftest): the hub cannot be reached, at once.
    result = run_server("--model", "some-org/some-model-not-cached")
    assert_one_line_error(result, "some-org/some-model-not-cached", "hub could not be reached",
                          "HF_HUB_OFFLINE=1", "--model /path/to/model")


def test_a_folder_without_config_json_is_named(tmp_path):
    assert_one_line_error(run_server("--model", str(tmp_path)), str(tmp_path), "no config.json")


def test_a_folder_without_tokenizer_files_suggests_tokenizer_or_skipping_it(tmp_path):
    shutil.copy(os.path.join(tiny_model_dir("llama"), "config.json"), tmp_path / "config.json")
    line = assert_one_line_error(run_server("--model", str(tmp_path), "--load-format", "dummy"),
                                 str(tmp_path), "no tokenizer files", "--tokenizer", "--skip-tokenizer-init")
    assert "sentencepiece" not in line.lower()


@pytest.mark.parametrize("value, words", [("0", ["max_model_len", "at least 1"]),
                                          ("1000000", ["1000000", "at most"])])
def test_a_bad_max_model_len_is_one_line(value, words):
    assert_one_line_error(run_server("--max-model-len", value), *words)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_cuda_is_one_line():
    assert_one_line_error(run_server("--device", "cuda"), "'cuda'", "no CUDA", "--device cpu")


def test_an_unknown_architecture_is_one_line(tmp_path):
    src = tiny_model_dir("llama")
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_server("--model", str(tmp_path)), "FancyNewForCausalLM", "Supported architectures")


def test_a_busy_port_fails_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "aserve", "--host", "127.0.0.1", "--port", str(port)],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
    assert_one_line_error(result, f"port {port}", "already in use", "--port")
    assert "KV cache" not in result.stderr  # nothing was loaded


def test_debug_shows_the_traceback(tmp_path):
    result = run_server("--model", str(tmp_path), "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert any(line.startswith("error: ") and "no config.json" in line for line in result.stderr.splitlines())


def _health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status, {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return 0, {}


def test_the_port_answers_503_loading_until_the_model_is_ready_then_the_log_says_what_runs():
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "aserve", "--port", str(port), "--api-key", "k",
                           "--kv-cache-memory-gb", "0.05"], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        url, seen = f"http://localhost:{port}", []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, body = _health(url)
            seen.append((status, body.get("error", {}).get("code")))
            if status == 200:
                break
            time.sleep(0.02)
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    assert (503, "model_loading") in seen and seen[-1][0] == 200, seen
    assert 0 not in [status for status, _ in seen[seen.index((503, "model_loading")):]]  # bound all along
    for fact in ("dtype float32", "on cpu", "max_model_len 2048", "max_num_seqs 256",
                 "max_num_batched_tokens 2048", f"max waiting requests {DEFAULT_MAX_WAITING}", "API key required: yes",
                 f"http://localhost:{port}"):
        assert fact in log, fact


def test_library_warnings_print_once():
    code = ("from aserve.server.cli import configure_logging\n"
            "configure_logging('info')\n"
            "import logging\n"
            "from huggingface_hub.utils import logging as hub_logging\n"
            "from transformers.utils import logging as transformers_logging\n"
            "hub_logging.get_logger('huggingface_hub.x').warning('hub-warning')\n"
            "transformers_logging.get_logger('transformers.x').warning('transformers-warning')\n"
            "logging.getLogger('aserve.x').warning('aserve-warning')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    for word in ("hub-warning", "transformers-warning", "aserve-warning"):
        assert result.stderr.count(word) == 1, result.stderr


def test_the_access_log_has_a_line_per_request_unless_disabled():
    for extra, expected in (((), 1), (("--disable-log-requests",), 0)):
        with subprocess_server("--kv-cache-memory-gb", "0.05", *extra) as (url, _, log_path):
            body = json.dumps({"prompt": "Hello", "max_tokens": 3, "ignore_eos": True}).encode()
            request = urllib.request.Request(url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request) as r:
                assert r.status == 200
            time.sleep(0.2)
            with open(log_path) as f:
                lines = [line for line in f if '"POST /v1/completions" 200' in line]
        assert len(lines) == expected, lines
        if expected:
            assert "aserve.access" in lines[0] and "prompt_tokens=" in lines[0] and "completion_tokens=3" in lines[0]
            assert " INFO " in lines[0] and "s prompt_tokens" in lines[0]  # the latency in seconds
