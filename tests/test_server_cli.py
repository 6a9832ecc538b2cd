"""`python -m aserve`: the command line a user runs, started as a real subprocess."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.request

import openai
import pytest

import aserve
from aserve.config import EngineArgs
from aserve.server.cli import engine_args_from, load_chat_template, make_parser, parse_args
from aserve.server.vllm_flags import IGNORED_VLLM_FLAGS, warn_ignored_vllm_flags
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
    assert (ns.host, ns.port, ns.model, ns.block_size) == ("localhost", 8000, None, 16)
    # The step sizes follow the device (EngineArgs.resolve_*): None here, and the server's own.
    assert ns.max_num_seqs is None and ns.max_num_batched_tokens is None
    assert engine_args_from(ns).usage_context == "api_server"
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


# ----------------------------------------------------------------------------- a vLLM user's CLI
def hub_cache_with_two_revisions(root) -> str:
    """A Hugging Face cache (as --download-dir) holding `acme/tiny` at two revisions: main, a
    tiny Llama of 512 positions, and the tag v2, the same model with 256."""
    from tiny_models import make_tiny_model

    repo = root / "models--acme--tiny"
    for ref, commit, positions in (("main", "a" * 40, 512), ("v2", "b" * 40, 256)):
        make_tiny_model("llama", repo / "snapshots" / commit, max_position_embeddings=positions)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return str(root)


def test_every_engine_args_field_has_its_flag():
    dests = {action.dest for action in make_parser()._actions}
    assert EngineArgs.field_names() <= dests, EngineArgs.field_names() - dests


def test_new_flags_reach_engine_args():
    ns = parse_args(["--revision", "r1", "--tokenizer-revision", "t1", "--download-dir", "/d",
                     "--no-async-scheduling", "--max-seq-len-to-capture", "1024",
                     "--num-gpu-blocks-override", "64", "--no-enable-prefix-caching"])
    args = engine_args_from(ns)
    assert (args.revision, args.tokenizer_revision, args.download_dir, args.async_scheduling,
            args.max_seq_len_to_capture, args.num_gpu_blocks_override, args.enable_prefix_caching) == (
        "r1", "t1", "/d", False, 1024, 64, False)
    defaults = engine_args_from(parse_args([]))
    assert defaults.async_scheduling and defaults.enable_prefix_caching
    assert defaults.max_seq_len_to_capture == EngineArgs().max_seq_len_to_capture


def test_serve_takes_the_model_as_its_first_argument():
    ns = parse_args(["serve", "facebook/opt-125m", "--port", "9000"])
    assert (ns.model, ns.port) == ("facebook/opt-125m", 9000)
    assert parse_args(["serve", "--model", "m"]).model == "m"   # --model still works after serve
    with pytest.raises(SystemExit) as exc:
        parse_args(["serve", "a", "--model", "b"])
    assert exc.value.code == 2


def test_version_flag_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"aserve {aserve.__version__}"


def test_help_shows_the_real_defaults():
    text = " ".join(make_parser().format_help().split())
    assert ("default: 8192 on a GPU (vLLM's API server's; 16384 on one of 70 GiB or more with the engine in its "
            "own process, the default on CUDA, as offline), 2048 on CPU") in text
    assert ("default: 256 (512 on a GPU of 70 GiB or more, with the engine in its own process, the default "
            "on CUDA, as offline)") in text   # max_num_seqs
    assert "usage-context" not in text   # not a vLLM flag: hidden
    assert "(default: on)" in text and "--async-scheduling, --no-async-scheduling" in text
    assert "(default: 8192)" in text   # max_seq_len_to_capture


def test_vllm_flags_without_meaning_are_accepted_with_one_warning_each(caplog):
    ns = parse_args(["--swap-space", "4", "--enable-chunked-prefill", "--no-enable-chunked-prefill",
                     "-O3", "--uvicorn-log-level=info", "--swap-space", "8"])
    with caplog.at_level(logging.WARNING, logger="aserve.server"):
        warn_ignored_vllm_flags(ns)
    warned = [r.getMessage().split()[0] for r in caplog.records]
    assert warned == ["--swap-space", "--enable-chunked-prefill", "--no-enable-chunked-prefill", "-O",
                      "--uvicorn-log-level"]
    assert all("ignored" in r.getMessage() for r in caplog.records)


def test_unknown_unsafe_and_bad_flags_are_still_refused():
    for argv in (["--no-such-flag"], ["--ssl-keyfile", "k.pem"], ["--pipeline-parallel-size", "2"],
                 ["--metrics-prefix", "no spaces"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2, argv
    assert "--ssl-keyfile" not in IGNORED_VLLM_FLAGS and "--quantization" not in IGNORED_VLLM_FLAGS


def test_revision_and_download_dir_choose_the_snapshot(tmp_path):
    from aserve.models.loader import create_model_config

    cache = hub_cache_with_two_revisions(tmp_path)
    main = create_model_config(EngineArgs(model="acme/tiny", download_dir=cache, device="cpu"))
    v2 = create_model_config(EngineArgs(model="acme/tiny", revision="v2", download_dir=cache, device="cpu"))
    assert (main.max_model_len, v2.max_model_len) == (512, 256)
    assert v2.tokenizer_path == v2.model_path and v2.model_path.endswith("b" * 40)
    tok = create_model_config(EngineArgs(model="acme/tiny", tokenizer_revision="v2", download_dir=cache,
                                         device="cpu"))
    assert tok.model_path.endswith("a" * 40) and tok.tokenizer_path.endswith("b" * 40)


def test_aserve_serve_model_with_vllm_flags(tmp_path):
    # `python -m aserve serve MODEL` as `vllm serve MODEL`, with a vLLM launch script's flags.
    cache = hub_cache_with_two_revisions(tmp_path)
    with subprocess_server("serve", "acme/tiny", "--revision", "v2", "--download-dir", cache,
                           "--kv-cache-memory-gb", "0.05", "--swap-space", "4",
                           "--enable-chunked-prefill", "--disable-log-stats", "--metrics-prefix", "vllm",
                           "--enable-server-load-tracking", "--enable-tokenizer-info-endpoint",
                           "--enable-request-id-headers",
                           env={"HF_HUB_OFFLINE": "1"}) as (url, proc, log_path):
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        model = client.models.list().data[0]
        assert model.id == "acme/tiny" and model.model_extra["max_model_len"] == 256
        raw = client.completions.with_raw_response.create(model=model.id, prompt="Hi", max_tokens=2)
        assert raw.parse().usage.completion_tokens and raw.headers["X-Request-Id"]
        for path in ("/load", "/tokenizer_info"):
            with urllib.request.urlopen(url + path, timeout=10) as resp:
                assert resp.status == 200, path
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            assert b"\nvllm:request_success_total{" in resp.read()
        with open(log_path) as f:
            log = f.read()
    assert log.count("--swap-space is a vLLM flag") == 1 and log.count("--enable-chunked-prefill is") == 1


def test_console_script_is_declared():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")) as f:
        assert 'aserve = "aserve.__main__:main"' in f.read()


def test_max_stored_responses_reaches_the_server():
    """--max-stored-responses 0: /v1/responses serves, but keeps nothing (store ignored, as
    vLLM by default); a negative bound is refused before anything loads."""
    with subprocess_server("--kv-cache-memory-gb", "0.05", "--max-stored-responses", "0") as (url, proc, log_path):
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        resp = client.responses.create(input="Hello", max_output_tokens=3)
        assert resp.store is False and resp.usage.output_tokens == 3
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(resp.id)
    refused = subprocess.run([sys.executable, "-m", "aserve", "--max-stored-responses", "-1"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "--max-stored-responses must be at least 0" in refused.stderr


def test_several_served_model_names_are_all_answered():
    """vLLM's --served-model-name a b: requests may name either, /v1/models lists both, and
    answers name the first."""
    with subprocess_server("--kv-cache-memory-gb", "0.05", "--served-model-name", "first", "second") as (url, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["first", "second"]
        assert client.models.retrieve("second").id == "second"
        resp = client.completions.create(model="second", prompt="Hello", max_tokens=2)
        assert resp.model == "first"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="third", prompt="Hello", max_tokens=2)
    assert engine_args_from(make_parser().parse_args(["--served-model-name", "a", "b"])).served_model_name == "a"


def test_response_role_data_parallel_size_and_the_grammar_backend_flags():
    from aserve.server.cli import main
    from server_fixtures import ServerThread

    ns = parse_args(["--response-role", "bot", "--guided-decoding-backend", "xgrammar", "--data-parallel-size", "1"])
    assert ns.response_role == "bot" and ns.data_parallel_size == 1
    with pytest.raises(SystemExit, match="one server per replica"):
        main(["--data-parallel-size", "2"])
    with ServerThread(state_options={"response_role": "bot"}) as srv:
        client = srv.openai_client()
        reply = client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert reply.choices[0].message.role == "bot"
        first = next(iter(client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=2, stream=True)))
        assert first.choices[0].delta.role == "bot"


def test_a_log_config_file_is_applied_after_the_defaults(tmp_path):
    import json
    import logging

    from aserve.server.cli import configure_logging, make_parser

    log = tmp_path / "out.log"
    config = {"version": 1, "disable_existing_loggers": False,
              "formatters": {"plain": {"format": "CFG %(levelname)s %(message)s"}},
              "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log), "formatter": "plain"}},
              "loggers": {"aserve.log_config_test": {"handlers": ["file"], "level": "DEBUG", "propagate": False}}}
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    assert make_parser().parse_args(["--log-config-file", str(path)]).log_config_file == str(path)
    saved_level = logging.getLogger("aserve").level
    configure_logging("warning", str(path))
    logger = logging.getLogger("aserve.log_config_test")
    try:
        logger.debug("hello from the test")
        for handler in logger.handlers:
            handler.flush()
        assert log.read_text() == "CFG DEBUG hello from the test\n"
    finally:
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
        logging.getLogger("aserve").setLevel(saved_level)
    for bad, words in [("missing.json", "No such file"), ("bad.json", "not a logging configuration")]:
        if bad == "bad.json":
            (tmp_path / bad).write_text('{"version": 7}')
        with pytest.raises(SystemExit, match=words):
            configure_logging("info", str(tmp_path / bad))


# ----------------------------------------------------------------------------- --config FILE
CONFIG = """
port: 12312
max_model_len: 1024
enable-prefix-caching: false
served-model-name: [first, second]
hf-overrides: {"rope_theta": 5}
disable-log-requests: true
"""


def test_a_config_file_gives_flags_and_the_command_line_wins(tmp_path):
    """vLLM's `--config FILE`: keys with dashes or underscores, switches set and cleared, lists
    and mappings; a flag on the command line wins wherever it stands."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    ns = parse_args(["--model", "m", "--config", str(path)])
    assert (ns.port, ns.max_model_len, ns.enable_prefix_caching) == (12312, 1024, False)
    assert ns.served_model_name == ["first", "second"] and ns.hf_overrides == {"rope_theta": 5}
    assert ns.disable_log_requests is True and ns.model == "m"
    assert parse_args(["--port", "9000", f"--config={path}", "--model", "m"]).port == 9000
    assert parse_args(["--config", str(path), "--port", "9000", "--model", "m"]).port == 9000
    served = parse_args(["serve", "the-model", "--config", str(path)])   # the list leaves the model alone
    assert served.model == "the-model" and served.served_model_name == ["first", "second"]


@pytest.mark.parametrize("content, words", [("no-such-flag: 1\n", "unknown flag"), ("- a\n- b\n", "mapping"),
                                            ("port: [\n", "not valid YAML"), (None, "cannot read")])
def test_a_bad_config_file_is_refused_by_name(tmp_path, capsys, content, words):
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--config", str(path)])
    assert words in capsys.readouterr().err
