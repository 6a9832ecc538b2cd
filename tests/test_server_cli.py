"""`python -m aserve`: the command line a user runs, started as a real subprocess."""

from __future__ import annotations

import openai

from aserve.server.cli import engine_args_from, load_chat_template, make_parser
from server_fixtures import subprocess_server

VLLM_FLAGS = ["--model", "--tokenizer", "--served-model-name", "--host", "--port", "--dtype",
              "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
              "--gpu-memory-utilization", "--kv-cache-memory-gb", "--seed", "--api-key",
              "--chat-template", "--enforce-eager", "--tensor-parallel-size", "--log-level"]


def test_help_documents_every_flag():
    text = make_parser().format_help()
    for flag in VLLM_FLAGS:
        assert flag in text, flag


def test_defaults_follow_vllm_and_the_quickstart():
    ns = make_parser().parse_args([])
    assert (ns.host, ns.port, ns.model, ns.block_size, ns.max_num_seqs) == ("localhost", 8000, None, 16, 256)
    assert ns.gpu_memory_utilization == 0.9 and ns.tensor_parallel_size == 1


def test_flags_reach_engine_args():
    ns = make_parser().parse_args(["--model", "m", "--served-model-name", "s", "--max-model-len", "512",
                                   "--block-size", "32", "--max-num-seqs", "8", "--seed", "3",
                                   "--kv-cache-memory-gb", "0.5", "--dtype", "float32", "--enforce-eager"])
    args = engine_args_from(ns)
    assert (args.model, args.served_model_name, args.max_model_len, args.block_size, args.max_num_seqs,
            args.seed, args.kv_cache_memory_gb, args.dtype, args.enforce_eager) == (
        "m", "s", 512, 32, 8, 3, 0.5, "float32", True)


def test_python_m_aserve_serves_a_completion():
    # The README's command, with the built-in model (tests never download one).
    with subprocess_server("--kv-cache-memory-gb", "0.05") as (url, proc, log_path):
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        resp = client.completions.create(model=model, prompt="Hello", max_tokens=4)
        assert resp.choices[0].finish_reason in ("length", "stop")
        assert resp.usage.completion_tokens >= 1
        with open(log_path) as f:
            log = f.read()
    assert f"http://localhost:{url.rsplit(':', 1)[1]}" in log and model in log


def test_chat_template_may_be_a_file_or_inline(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_chat_template(str(path)) == template
    assert load_chat_template("{{ messages[0]['content'] }}\\n") == "{{ messages[0]['content'] }}\n"
    assert load_chat_template(None) is None
