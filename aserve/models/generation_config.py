"""A model's own sampling defaults, from its generation_config.json, as vLLM takes them.

vLLM's `--generation-config auto` (its default) reads the checkpoint's generation config and uses
its temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens) for
every request field a request leaves unset: a Llama-3 Instruct then samples at its 0.6 / 0.9,
not at 1.0 / 1.0. `vllm` ignores the file (the API's own defaults); a folder reads that folder's
file instead. `--override-generation-config` (JSON) sets or replaces any of them.

Only what the file sets differently from transformers' own defaults counts (its diff), as vLLM
reads it: a file that spells out top_k 50 (transformers' default) sets nothing.
"""

from __future__ import annotations

import os
from typing import Any, Optional

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def sampling_defaults(source: str, model_path: str, overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The SamplingParams defaults (max_new_tokens renamed max_tokens) the model's generation
    config gives; ValueError naming the flag for a bad source or value."""
    if source == "vllm":
        found: dict[str, Any] = {}
    else:
        folder = model_path if source == "auto" else source
        if source != "auto" and not os.path.isdir(folder):
            raise ValueError(f"--generation-config must be auto, vllm or a folder with a "
                             f"generation_config.json, got {source!r}.")
        found = _file_diff(folder)
    defaults = {k: v for k, v in found.items() if k in SAMPLING_KEYS and v is not None}
    unknown = set(overrides or {}) - set(SAMPLING_KEYS) - {"max_tokens"}
    if unknown:
        raise ValueError(f"--override-generation-config: unknown fields {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(SAMPLING_KEYS)}.")
    defaults.update(overrides or {})
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    from aserve.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the model's generation config (or --override-generation-config) sets a bad "
                         f"sampling default: {exc}") from None
    return defaults


def _file_diff(folder: str) -> dict[str, Any]:
    if not os.path.isfile(os.path.join(folder, "generation_config.json")):
        return {}
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder).to_diff_dict()
    except (OSError, ValueError):   # an unreadable file: the API's own defaults, as vLLM falls back
        return {}


def pick(defaults: dict[str, Any], name: str, given: Any, fallback: Any) -> Any:
    """A request's value for a sampling field: its own, else the model's default, else the API's."""
    return given if given is not None else defaults.get(name, fallback)


def sampling_fields(defaults: Optional[dict[str, Any]], temperature: Optional[float] = None,
                    top_p: Optional[float] = None, top_k: Optional[int] = None, min_p: Optional[float] = None,
                    repetition_penalty: Optional[float] = None,
                    default_temperature: float = 1.0) -> dict[str, Any]:
    """The SamplingParams fields a model's defaults reach, for one request (None: unset there)."""
    d = defaults or {}
    return {"temperature": pick(d, "temperature", temperature, default_temperature),
            "top_p": pick(d, "top_p", top_p, 1.0), "top_k": pick(d, "top_k", top_k, -1),
            "min_p": pick(d, "min_p", min_p, 0.0),
            "repetition_penalty": pick(d, "repetition_penalty", repetition_penalty, 1.0)}
