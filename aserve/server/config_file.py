"""`--config FILE`: the server's flags from a YAML file, as `vllm serve --config` reads them.

Each key is a flag's long name without its dashes (`max-model-len` or `max_model_len`), each
value its value: `true` sets a switch, `false` clears it (`--no-NAME` where the flag has one),
a list gives a flag several values, a mapping is passed as JSON. The file's flags go before
the command line's, so a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

CONFIG_FLAG = "--config"


def expand_config_file(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """argv with `--config FILE` (or `--config=FILE`) replaced by the file's flags, put first."""
    path, rest = _take_config_path(argv, parser)
    if path is None:
        return argv
    return _flags_from(_load(path, parser), parser) + rest


def _take_config_path(argv: list[str], parser: argparse.ArgumentParser) -> tuple[Any, list[str]]:
    for i, arg in enumerate(argv):
        if arg == CONFIG_FLAG:
            if i + 1 >= len(argv):
                parser.error(f"{CONFIG_FLAG}: expected a YAML file's path")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith(CONFIG_FLAG + "="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _load(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        parser.error(f"{CONFIG_FLAG}: cannot read {path}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        parser.error(f"{CONFIG_FLAG}: {path} is not valid YAML: {exc}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"{CONFIG_FLAG}: {path} must hold a mapping of flag names to values")
    return data


def _flags_from(config: dict, parser: argparse.ArgumentParser) -> list[str]:
    known = parser._option_string_actions  # every option string the parser takes
    flags: list[str] = []
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in known:
            parser.error(f"{CONFIG_FLAG}: unknown flag {key!r} (no {flag})")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            elif "--no-" + flag[2:] in known:
                flags.append("--no-" + flag[2:])
            # false for a plain switch: left unset, which it is by default
        elif isinstance(value, list):
            flags += [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags
