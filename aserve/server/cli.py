"""`python -m aserve`: the OpenAI-compatible server's command line, with vLLM's flag names
(cli_flags.py defines them; make_parser, parse_args and engine_args_from are reachable here too).

Defaults follow vLLM where it has the flag; --host defaults to localhost, so a fresh server is
not reachable from other machines until asked to be (--host 0.0.0.0).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import logging.config
import os
import sys
import traceback
from typing import Optional

from aserve.server.cli_flags import (API_KEY_ENV, DEBUG_ENV, engine_args_from, make_parser,  # noqa: F401
                                     parse_args)
from aserve.server.http_server import HttpLimits, check_port_free
from aserve.server.vllm_flags import warn_ignored_vllm_flags


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template names a file, or is the template itself (it has Jinja markers)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        # As vLLM: an inline template on a command line spells newlines as \n.
        return value.encode().decode("unicode_escape") if value.isascii() else value
    raise SystemExit(f"--chat-template: {value!r} is neither a file nor a Jinja template.")


def resolve_api_key(ns: argparse.Namespace) -> Optional[str]:
    """--api-key, else $ASERVE_API_KEY, else None (no key: the API is open)."""
    return ns.api_key or os.environ.get(API_KEY_ENV) or None


def configure_logging(level: str, config_file: Optional[str] = None) -> None:
    """Every line once, in one format, on stderr; then vLLM's --log-config-file, a JSON
    logging.config.dictConfig (handlers, formats and levels of any logger), if given."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # aserve's default handler, and huggingface_hub's (installed on import, and propagating to
    # the root handler above), would print each of their lines twice; transformers' prints in
    # a format of its own. Route all three through the root handler alone.
    import huggingface_hub  # noqa: F401 - installs its handler, which goes now
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    for name in ("aserve", "huggingface_hub"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("aserve").setLevel(level.upper())
    if config_file:
        _apply_logging_config(config_file)


def _apply_logging_config(path: str) -> None:
    try:
        with open(path) as f:
            config = json.load(f)
        logging.config.dictConfig(config)
    except OSError as exc:
        raise SystemExit(f"error: --log-config-file {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, AttributeError, ImportError) as exc:   # bad JSON, or not a dictConfig
        raise SystemExit(f"error: --log-config-file {path} is not a logging configuration: {exc}") from None


def main(argv: Optional[list[str]] = None) -> None:
    ns = parse_args(argv)
    configure_logging(ns.log_level, ns.log_config_file)
    warn_ignored_vllm_flags(ns)
    try:
        engine_args = engine_args_from(ns)
    except ValueError as exc:  # a bad flag value: say which, without a traceback
        raise SystemExit(f"error: {exc}") from None
    if ns.headless:
        from aserve.executor.headless import run_headless

        try:
            sys.exit(run_headless(engine_args))
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    chat_template = load_chat_template(ns.chat_template)
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise SystemExit("error: --enable-auto-tool-choice needs --tool-call-parser (e.g. hermes).")
    if ns.data_parallel_size != 1:
        raise SystemExit(f"error: --data-parallel-size {ns.data_parallel_size}: aserve runs one engine a server; "
                         "start one server per replica behind a load balancer.")
    if ns.max_stored_responses < 0:
        raise SystemExit(f"error: --max-stored-responses must be at least 0, got {ns.max_stored_responses}.")

    from aserve.engine.async_engine import AsyncEngine
    from aserve.engine.process_async_engine import ProcessAsyncEngine, start_engine_process
    from aserve.server.api_servers import ApiServerProcesses, api_server_count, tag_log_lines_with_pid
    from aserve.server.open_files import raise_open_file_limit
    from aserve.server.serving import serve

    raise_open_file_limit()
    try:
        count = api_server_count(ns.api_server_count, ns.engine_process)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    in_own_process = count > 1 or engine_in_own_process(ns.engine_process, engine_args)
    engine_args = placed_engine_args(engine_args, in_own_process)
    state = server_state_from(ns, chat_template)
    peers = None
    if count > 1:
        tag_log_lines_with_pid()
        peers = ApiServerProcesses(ns, engine_args)

    def load_engine():
        if peers is None:
            return (ProcessAsyncEngine if in_own_process else AsyncEngine).from_engine_args(engine_args)
        # One engine process for every API server; the others start while it loads.
        process, pipes = start_engine_process(engine_args, count)
        peers.start(state.bound_port, pipes[1:])
        engine = ProcessAsyncEngine(engine_args, pipes[0], process)
        try:
            peers.wait_until_listening()
        except BaseException:
            engine.close_unstarted()
            raise
        return engine

    print(f"aserve: loading model {ns.model or '(built-in default)'} ...", flush=True)
    try:
        if peers is not None:
            check_port_free(ns.host, ns.port)
        status = _run(serve(state, ns.host, ns.port, shutdown_timeout_s=ns.shutdown_timeout,
                            load_engine=load_engine, peers=peers, reuse_port=peers is not None))
    except Exception as exc:  # the port, the model, the device: one line, with what to do
        if ns.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(f"error: {describe_startup_error(exc, ns.host, ns.port)}", file=sys.stderr, flush=True)
        if not ns.debug:
            print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        if peers is not None:
            peers.kill()
        os._exit(1)  # a loading thread (or worker ranks) may still be running
    finally:
        if peers is not None:
            peers.remove_socket_dir()
    if status or not state.ready:
        # The engine died (exit non-zero so a supervisor restarts the server), or a signal
        # came while the model was loading. os._exit: a model step stuck in a collective of
        # a dead rank, or the loading thread, would keep a normal exit waiting.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def server_state_from(ns: argparse.Namespace, chat_template: Optional[str]):
    """The server's state as the command line sets it (each API server process builds its own)."""
    from aserve.server.admission import Admission
    from aserve.server.app import ServerState
    from aserve.server.cors import CorsPolicy
    from aserve.server.responses_store import ResponseStore

    return ServerState(
        api_key=resolve_api_key(ns), chat_template=chat_template,
        tool_call_parser=ns.tool_call_parser if ns.enable_auto_tool_choice else None,
        reasoning_parser=ns.reasoning_parser,
        log_requests=not ns.disable_log_requests, return_tokens_as_token_ids=ns.return_tokens_as_token_ids,
        trust_request_chat_template=ns.trust_request_chat_template,
        admission=Admission(ns.max_waiting_queue_length),
        log_stats=not ns.disable_log_stats, metrics_prefix=ns.metrics_prefix,
        enable_server_load_tracking=ns.enable_server_load_tracking,
        enable_tokenizer_info_endpoint=ns.enable_tokenizer_info_endpoint,
        enable_request_id_headers=ns.enable_request_id_headers, response_role=ns.response_role,
        enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
        enable_force_include_usage=ns.enable_force_include_usage, root_path=ns.root_path or "",
        chat_template_content_format=ns.chat_template_content_format,
        responses=ResponseStore(ns.max_stored_responses),
        cors=CorsPolicy(tuple(ns.allowed_origins), tuple(ns.allowed_methods), tuple(ns.allowed_headers),
                        ns.allow_credentials),
        served_model_aliases=tuple((ns.served_model_name or [])[1:]),
        limits=HttpLimits(keep_alive_timeout_s=ns.timeout_keep_alive, body_read_timeout_s=ns.body_read_timeout))


def engine_in_own_process(flag: Optional[bool], engine_args) -> bool:
    """--engine-process as given, else on for a CUDA device: there the engine's host work is what
    bounds a step, and sharing one interpreter's lock with the server's HTTP work cost it
    (one process served 0.53-0.54x offline A on an H100, the engine process 0.64-0.68x:
    bench/RESULTS.md, 2026-12-06). On the CPU the model's own threads need the cores that a
    second process would take."""
    if flag is not None:
        return flag
    try:
        return engine_args.resolve_device().type == "cuda"
    except ValueError:   # --device cuda without one: the engine's load says so, as always
        return False


def placed_engine_args(engine_args, in_own_process: bool):
    """The server's engine args once it is known where the engine steps: an engine in a process
    of its own steps alone, as offline, and so takes a large GPU's larger steps
    (usage_context engine_process; aserve/config.py has the figures)."""
    if in_own_process and engine_args.usage_context == "api_server":
        return dataclasses.replace(engine_args, usage_context="engine_process")
    return engine_args


def describe_startup_error(exc: BaseException, host: str, port: int) -> str:
    """One line saying what went wrong and what to do (the messages of aserve's own checks
    already say both)."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another server?): stop it, or pass "
                f"another --port.")
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {message}"


def _run(coro):
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows build: plain asyncio still works
        import asyncio
        return asyncio.run(coro)
    return uvloop.run(coro)
