"""The command line's flags (vLLM's names and defaults where vLLM has the flag) and what they
become: the parser, parse_args for both forms (`aserve serve MODEL` and `--model MODEL`), and
the EngineArgs they give. cli.py runs the server from them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from aserve import __version__
from aserve.config import (DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, LOAD_FORMATS, USAGE_CONTEXTS,
                           EngineArgs)
from aserve.server.admission import DEFAULT_MAX_WAITING
from aserve.server.config_file import expand_config_file
from aserve.server.content_format import FORMATS as CONTENT_FORMATS
from aserve.server.http_server import HttpLimits
from aserve.server.reasoning import PARSERS as REASONING_PARSERS
from aserve.server.responses_store import DEFAULT_MAX_STORED_RESPONSES
from aserve.server.serving import DEFAULT_SHUTDOWN_TIMEOUT_S
from aserve.server.tool_parsers import PARSERS
from aserve.server.vllm_flags import add_ignored_vllm_flags

API_KEY_ENV = "ASERVE_API_KEY"
DEBUG_ENV = "ASERVE_DEBUG"
_ENGINE_DEFAULTS = EngineArgs()


def make_parser(serve: bool = False) -> argparse.ArgumentParser:
    """The command line; serve=True: `aserve serve MODEL ...`, vLLM's form, whose first
    positional argument is the model."""
    p = argparse.ArgumentParser(
        prog="aserve serve" if serve else "python -m aserve",
        description="Serve a model over HTTP: vLLM's /generate and OpenAI's /v1 API "
                    "(/v1/models, /v1/completions, /v1/chat/completions), plus /health, /metrics, "
                    "/tokenize and /detokenize. Also `aserve serve MODEL [flags]` (or `python -m "
                    "aserve serve MODEL`), as `vllm serve MODEL`. vLLM flags that mean nothing "
                    "here are accepted with a warning (see README: Command line).",
        epilog="Example: python -m aserve --model facebook/opt-125m  "
               "(add --host 0.0.0.0 to listen on all interfaces).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"aserve {__version__}")
    m = p.add_argument_group("model")
    if serve:
        m.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="Hugging Face model id or local folder (the same as --model).")
    m.add_argument("--model", default=None,
                   help="Hugging Face model id or local folder; default: the built-in tiny random "
                        "model (no download, gibberish output), for trying the server out.")
    m.add_argument("--revision", default=None,
                   help="The model's branch, tag or commit on the hub; default: its default branch.")
    m.add_argument("--tokenizer", default=None, help="Tokenizer id or folder; default: the model's.")
    m.add_argument("--tokenizer-revision", default=None,
                   help="The tokenizer's branch, tag or commit on the hub; default: --revision for "
                        "the model's own tokenizer, the default branch of a --tokenizer repo.")
    m.add_argument("--download-dir", default=None,
                   help="Where hub models are cached and downloaded; default: the Hugging Face "
                        "cache ($HF_HOME, ~/.cache/huggingface).")
    m.add_argument("--served-model-name", default=None, nargs="+",
                   help="The model name the API reports and expects in requests; default: --model. "
                        "Several names: requests may use any of them, /v1/models lists them all, and "
                        "answers name the first (as vLLM).")
    m.add_argument("--dtype", default="auto", choices=["auto", "float16", "half", "bfloat16", "float32", "float"],
                   help="Weight and activation dtype; auto: the checkpoint's on GPU (float16 for a "
                        "float32 checkpoint, as vLLM), float32 on CPU. (default: %(default)s)")
    m.add_argument("--max-model-len", type=int, default=None,
                   help="Context length (prompt + output); default: the model's.")
    m.add_argument("--seed", type=int, default=_ENGINE_DEFAULTS.seed,
                   help="Random seed of sampling. (default: %(default)s)")
    m.add_argument("--chat-template", default=None,
                   help="Chat template for /v1/chat/completions: a Jinja file or an inline Jinja "
                        "string; default: the tokenizer's.")
    m.add_argument("--chat-template-content-format", default="auto", choices=CONTENT_FORMATS,
                   help="How message content reaches the chat template: string, openai (a list of "
                        "text parts), or auto (read from the template, as vLLM). (default: %(default)s)")
    m.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='Chat: let the model decide to call tools (tool_choice "auto", the default '
                        "when a request has tools); needs --tool-call-parser.")
    m.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="How the model writes its tool calls, for tool_choice \"auto\": hermes "
                        "(<tool_call>{...}</tool_call>: Hermes, Qwen2.5, Qwen3), llama3_json (Llama 3.x "
                        "with a JSON tool template), mistral ([TOOL_CALLS]), pythonic ([f(a=1)]: "
                        "Llama 3.2 and 4), qwen3_coder (Qwen3-Coder's XML); vLLM's names.")
    m.add_argument("--generation-config", default=_ENGINE_DEFAULTS.generation_config,
                   help="Where requests' sampling defaults come from (temperature, top_p, top_k, min_p, "
                        "repetition_penalty, max_new_tokens, for what a request leaves unset): auto, the "
                        "model's generation_config.json; vllm, none (the API's own); or a folder with "
                        "a generation_config.json. As vLLM. (default: %(default)s)")
    m.add_argument("--hf-overrides", default=None, type=_json_object,
                   help='JSON fields of the model\'s config.json to set or replace at load (as vLLM), '
                        'e.g. \'{"max_position_embeddings": 65536, "rope_scaling": {...}}\'.')
    m.add_argument("--override-generation-config", default=None, type=_json_object,
                   help='JSON that sets or replaces sampling defaults, e.g. \'{"temperature": 0.5}\'.')
    m.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="Take a reasoning model's thinking apart from its answer: chat's `reasoning` "
                        "field, /v1/responses' reasoning item (<think>...</think>; deepseek_r1: "
                        "DeepSeek-R1 and its distills, QwQ; qwen3: Qwen3, where an output nothing "
                        "opened is the answer and a tool call ends the thinking).")
    m.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code.")
    m.add_argument("--load-format", default="auto", choices=list(LOAD_FORMATS),
                   help="Weights to read: auto (safetensors, else pytorch_model*.bin), safetensors, "
                        "pt, or dummy (random weights, no weight files needed; for benchmarks). "
                        "(default: %(default)s)")
    m.add_argument("--max-logprobs", type=int, default=20,
                   help="Most logprobs or prompt logprobs one request may ask for; -1: no bound, so "
                        "logprobs -1 (the whole vocabulary) is served. (default: %(default)s)")
    m.add_argument("--skip-tokenizer-init", action="store_true",
                   help="Load no tokenizer: prompts must be token ids and outputs carry no text.")

    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"Most sequences in one step; default: {DEFAULT_MAX_NUM_SEQS['cuda']} ("
                        f"{DEFAULT_MAX_NUM_SEQS['large-gpu']} on a GPU of 70 GiB or more, with the engine in "
                        f"its own process, the default on CUDA, as offline).")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="Most tokens computed in one step (chunked prefill splits longer prompts); "
                        f"default: {DEFAULT_MAX_NUM_BATCHED_TOKENS['cuda']} on a GPU (vLLM's API server's; "
                        f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['large-gpu']} on one of 70 GiB or more with the "
                        f"engine in its own process, the default on CUDA, as offline), "
                        f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['cpu']} on CPU.")
    e.add_argument("--block-size", type=int, default=_ENGINE_DEFAULTS.block_size, choices=[8, 16, 32, 64, 128],
                   help="Tokens per KV cache block. (default: %(default)s)")
    e.add_argument("--gpu-memory-utilization", type=float, default=_ENGINE_DEFAULTS.gpu_memory_utilization,
                   help="GPU: the fraction of GPU memory the model and KV cache may use. (default: %(default)s)")
    e.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="CPU: the KV cache's memory budget in GiB; default: 1.")
    e.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="Exactly this many KV cache blocks, whatever the memory (testing, "
                        "debugging); default: as many as the memory budget holds.")
    e.add_argument("--enforce-eager", action="store_true", help="GPU: do not capture CUDA graphs.")
    e.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"],
                   help="generate text (auto: the default), or pool prompts into embeddings "
                        "(/v1/embeddings: an embedding model such as Qwen3-Embedding), as vLLM's flag.")
    e.add_argument("--task", default=None, choices=["auto", "generate", "embed", "embedding"],
                   help=argparse.SUPPRESS)   # vLLM's older name: embed is --runner pooling
    e.add_argument("--convert", default=None, choices=["auto", "none", "embed"],
                   help="embed: serve the model as an embedding model (--runner pooling), as vLLM's flag.")
    e.add_argument("--disable-sliding-window", action="store_true",
                   help="Attend to the whole context on every layer, and cap the model's length at its "
                        "sliding window (Mistral, Phi-3, Gemma 2/3), as vLLM does.")
    e.add_argument("--max-seq-len-to-capture", type=int, default=_ENGINE_DEFAULTS.max_seq_len_to_capture,
                   help="GPU: decode steps with a longer context than this run without a CUDA "
                        "graph. (default: %(default)s)")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   default=_ENGINE_DEFAULTS.async_scheduling,
                   help="Schedule step k+1 while step k runs on the device (requests with "
                        "penalties, logprobs, n > 1 or beams step synchronously). (default: on)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=_ENGINE_DEFAULTS.enable_prefix_caching,
                   help="Reuse the KV cache of prompt prefixes already computed (shared system "
                        "prompts, earlier turns of a chat). (default: on)")
    e.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu. (default: %(default)s)")

    d = p.add_argument_group("parallelism (several GPUs, several nodes)")
    d.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="Ranks to shard the model over: one per GPU (worker processes beside this "
                        "one), or CPU processes on a machine without GPUs. (default: %(default)s)")
    d.add_argument("--nnodes", type=int, default=_env_int("NNODES", 1),
                   help="Machines the ranks are spread over (evenly). (default: $NNODES or 1)")
    d.add_argument("--node-rank", type=int, default=_env_int("NODE_RANK", _env_int("GROUP_RANK", 0)),
                   help="This machine's number: 0 is the head, which serves; others run --headless. "
                        "(default: $NODE_RANK, $GROUP_RANK or 0)")
    d.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR"),
                   help="The head's address, which every node can reach. (default: $MASTER_ADDR; "
                        "one node: 127.0.0.1)")
    d.add_argument("--master-port", type=int, default=_env_int("MASTER_PORT", None),
                   help="A free port on the head for the ranks' rendezvous. (default: $MASTER_PORT; "
                        "one node: any free port)")
    # Not a vLLM flag: this CLI runs the API server, whose step sizes differ on a large GPU.
    d.add_argument("--usage-context", choices=USAGE_CONTEXTS, default="api_server", help=argparse.SUPPRESS)
    d.add_argument("--headless", action="store_true",
                   help="Run this node's ranks only (no server): for every node but the head.")

    s = p.add_argument_group("server")
    s.add_argument("--host", default="localhost",
                   help="Interface to listen on; 0.0.0.0 (or ::) listens on all interfaces. (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="Port to listen on. (default: %(default)s)")
    s.add_argument("--api-key", default=None,
                   help=f"If set, every /v1 request (and /invocations) needs 'Authorization: Bearer <key>'; "
                        f"default: the {API_KEY_ENV} environment variable.")
    s.add_argument("--max-waiting-queue-length", type=int, default=DEFAULT_MAX_WAITING,
                   help="Most requests waiting to be scheduled (tokenizing included); past it, new "
                        "requests get 503 with Retry-After. 0: unbounded. (default: %(default)s)")
    s.add_argument("--timeout-keep-alive", type=float, default=HttpLimits.keep_alive_timeout_s,
                   help="Seconds an idle connection stays open, and the most a client may take to "
                        "send a request's head (uvicorn's and vLLM's flag). (default: %(default)s)")
    s.add_argument("--body-read-timeout", type=float, default=HttpLimits.body_read_timeout_s,
                   help="Seconds a client may take to send a request's body; past it, 408. "
                        "(default: %(default)s)")
    s.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="On SIGTERM or SIGINT, seconds the requests in flight may take to finish "
                        "before they are aborted; a second signal exits at once (vLLM's flag, "
                        "whose default is 0). (default: %(default)s)")
    s.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="Logprobs name each token as 'token_id:N' (a request's "
                        "return_tokens_as_token_ids overrides this).")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="Render a request's own chat_template (refused by default, as vLLM: a "
                        "template is code the server runs).")
    s.add_argument("--metrics-prefix", default="aserve", type=_metrics_prefix,
                   help="/metrics names are PREFIX:<vLLM's name>; `vllm` serves vLLM's own names, "
                        "for its Grafana dashboards. (default: %(default)s)")
    s.add_argument("--enable-server-load-tracking", action="store_true",
                   help="Count the requests in flight for GET /load (vLLM's; without it /load "
                        "answers 0).")
    s.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="Serve GET /tokenizer_info: the tokenizer's settings and chat template "
                        "(vLLM's; off by default, as it exposes the template).")
    s.add_argument("--max-stored-responses", type=int, default=DEFAULT_MAX_STORED_RESPONSES,
                   help="/v1/responses: how many responses store=true keeps in memory for GET, "
                        "previous_response_id and background runs (the oldest is forgotten first); "
                        "0: none (store is ignored, as vLLM does by default). (default: %(default)s)")
    s.add_argument("--response-role", default="assistant",
                   help="The role of a chat reply to a request with add_generation_prompt (as vLLM). "
                        "(default: %(default)s)")
    s.add_argument("--data-parallel-size", type=int, default=1,
                   help="vLLM's engine replicas; aserve runs one (1 only: put several servers behind a "
                        "balancer for more).")
    s.add_argument("--allowed-origins", type=_json_list, default=["*"],
                   help='Origins a browser may call the API from, a JSON list. (default: ["*"], as vLLM)')
    s.add_argument("--allowed-methods", type=_json_list, default=["*"],
                   help='Methods a cross-origin call may use, a JSON list. (default: ["*"])')
    s.add_argument("--allowed-headers", type=_json_list, default=["*"],
                   help='Headers a cross-origin call may send, a JSON list. (default: ["*"])')
    s.add_argument("--allow-credentials", action="store_true",
                   help="Cross-origin calls may carry credentials (cookies, the Authorization header).")
    s.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="Report usage.prompt_tokens_details.cached_tokens (prompt tokens the prefix "
                        "cache served), as vLLM's flag.")
    s.add_argument("--root-path", default=None,
                   help="A path prefix (e.g. /llm) that a proxy forwards with the request: every route "
                        "answers under it too, as with vLLM's flag.")
    s.add_argument("--enable-force-include-usage", action="store_true",
                   help="Every stream reports usage on each chunk and at its end, whatever its "
                        "stream_options, as vLLM's flag.")
    s.add_argument("--enable-request-id-headers", action="store_true",
                   help="Put X-Request-Id on every response: the client's own, else a new one.")
    s.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="Run the engine in a process of its own, as vLLM's engine core, so the server's "
                        "HTTP work and the engine's host work do not share one interpreter's lock "
                        "(aserve/engine/engine_process.py). (default: on when the engine runs on a CUDA "
                        "device, off on the CPU)")
    s.add_argument("--api-server-count", "-asc", type=int, default=None,
                   help="HTTP server processes in front of the one engine process, on one port (as vLLM's): "
                        "each parses, validates and streams its share of the connections, so a burst "
                        "of requests reaches the engine sooner; with more than one each also makes its "
                        "streams' text (aserve/server/api_servers.py), and the engine runs in a process of "
                        "its own. (default: 1)")
    s.add_argument("--disable-log-requests", "--disable-uvicorn-access-log", action="store_true",
                   help="No access log line per request (method, path, status, latency, tokens).")
    s.add_argument("--disable-log-stats", action="store_true",
                   help="No periodic status line (throughput, running and waiting requests, KV "
                        "cache use); /metrics still counts.")
    s.add_argument("--debug", action="store_true",
                   help=f"Show the traceback of a start-up error (also ${DEBUG_ENV}=1).")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                   help="Log level. (default: %(default)s)")
    s.add_argument("--config", default=None, metavar="FILE",
                   help="A YAML file of flags (each key a flag's name, each value its value), as "
                        "vLLM's; flags on the command line win over the file's.")
    s.add_argument("--log-config-file", default=None,
                   help="A JSON logging configuration (Python's logging.config.dictConfig: handlers, "
                        "formats, levels), applied after the defaults, as vLLM's flag.")
    add_ignored_vllm_flags(p)
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line, in either form: `[python -m] aserve [serve MODEL] [flags]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    serve = bool(argv) and argv[0] == "serve"
    parser = make_parser(serve=serve)
    args = argv[1:] if serve else argv
    # `serve MODEL` keeps its model first: a list-valued flag from --config could swallow it.
    lead = args[:1] if serve and args and not args[0].startswith("-") else []
    ns = parser.parse_args(lead + expand_config_file(args[len(lead):], parser))
    tag = getattr(ns, "model_tag", None)
    if tag is not None:
        if ns.model is not None and ns.model != tag:
            parser.error(f"the model is given twice, as {tag!r} and --model {ns.model!r}: give one.")
        ns.model = tag
    return ns


def _metrics_prefix(value: str) -> str:
    # A Prometheus metric name: [a-zA-Z_:][a-zA-Z0-9_:]*; the prefix is its first part.
    import re

    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Prometheus name prefix (letters, digits, _).")
    return value


def _env_int(name: str, default):
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise SystemExit(f"error: ${name} must be an integer, got {value!r}") from None


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """Every EngineArgs field from the flag of the same name (the engine takes the first served
    model name; the server answers to the others too)."""
    fields = {name: getattr(ns, name) for name in EngineArgs.field_names() if hasattr(ns, name)}
    if "runner" in fields:   # --runner auto, or vLLM's --task / --convert naming embeddings
        pooling = (fields["runner"] == "pooling" or getattr(ns, "task", None) in ("embed", "embedding")
                   or getattr(ns, "convert", None) == "embed")
        fields["runner"] = "pooling" if pooling else "generate"
    if isinstance(fields.get("served_model_name"), list):
        fields["served_model_name"] = fields["served_model_name"][0]
    return EngineArgs(**fields)


def _json_of(kind: type, described: str):
    """An argparse type: JSON text that must decode to `kind` (described so in the error)."""
    def parse(text: str):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise argparse.ArgumentTypeError(f"must be {described}")
        return value
    return parse


_json_object = _json_of(dict, "a JSON object")
_json_list = _json_of(list, "a JSON list of strings")
