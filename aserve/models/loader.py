"""From a model name to a loaded model: resolve the folder, read the config, stream the weights."""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from aserve.config import EngineArgs, ModelConfig
from aserve.distributed import SINGLE_RANK, TensorParallelGroup, building_with
from aserve.models.default_model import DEFAULT_MODEL_NAME, default_model_path
from aserve.models.generation_config import sampling_defaults
from aserve.models.layers.rotary import rope_position_limit, serving_max_len
from aserve.models.registry import get_model_class, resolve_architecture, text_part

# Everything needed to serve a model except its weights (configs, tokenizer files, templates).
_META_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
# Some repos carry a second copy of the weights in another layout (Mistral's consolidated
# file, Llama 3's original/ folder); never download or load those.
_IGNORE_PATTERNS = ["original/*", "consolidated*"]


def _hub_error(model: str, cause: BaseException) -> OSError:
    return OSError(
        f"Model {model!r} is neither a local folder nor in the Hugging Face cache, and the "
        f"Hugging Face hub could not be reached to download it ({type(cause).__name__}: {cause}). "
        f"Pass the path of a local folder that holds config.json, the tokenizer files and the "
        f"weights (*.safetensors or pytorch_model*.bin), e.g. --model /path/to/model. On a "
        f"machine without network, set HF_HUB_OFFLINE=1 to fail at once instead of after the "
        f"hub's retries.")


# Any of these makes a folder a tokenizer's (the rest, e.g. merges.txt, come with one of them).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def resolve_model_path(model: str, revision: Optional[str] = None, load_format: str = "auto",
                       download_dir: Optional[str] = None) -> str:
    """The local folder of `model`: a folder as is, else a hub id from the cache or downloaded.

    Only the config, tokenizer and one weight format are fetched: load_format's (none for
    dummy), or for auto safetensors when the repo has them, else .bin. Raises OSError when the
    model is neither a local folder nor cached and the hub cannot be reached. download_dir:
    the hub cache to use instead of Hugging Face's default (vLLM's --download-dir).
    """
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded) or model.startswith(("/", "./", "../", "~")):
        raise OSError(f"Model path {model!r} is not a folder; pass the folder that holds config.json.")
    from huggingface_hub import snapshot_download

    weights = {"safetensors": ["*.safetensors"], "pt": ["*.bin"], "dummy": []}.get(load_format)
    all_patterns = _META_PATTERNS + (["*.safetensors", "*.bin"] if weights is None else weights)
    try:  # the cache first: no network needed for a model used before
        return snapshot_download(model, revision=revision, allow_patterns=all_patterns,
                                 ignore_patterns=_IGNORE_PATTERNS, local_files_only=True,
                                 cache_dir=download_dir)
    except Exception:
        pass
    try:
        if weights is None:
            from huggingface_hub import HfApi

            files = HfApi().list_repo_files(model, revision=revision)
            weights = ["*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"]
        return snapshot_download(model, revision=revision, allow_patterns=_META_PATTERNS + weights,
                                 ignore_patterns=_IGNORE_PATTERNS, cache_dir=download_dir)
    except Exception as e:  # offline, unknown repo, gated repo, invalid id: all one message
        raise _hub_error(model, e) from e


def _tokenizer_path(args: EngineArgs, model_path: str) -> str:
    """The tokenizer's folder, as vLLM picks it: --tokenizer at --tokenizer-revision (the repo's
    default branch if none), else the model's own, at --tokenizer-revision if given."""
    if args.tokenizer is None and (args.tokenizer_revision is None or args.model is None
                                   or args.tokenizer_revision == args.revision):
        return model_path
    # "dummy": the config and tokenizer files only, never a second copy of weights.
    return resolve_model_path(args.tokenizer or args.model, args.tokenizer_revision, "dummy",
                              args.download_dir)


def _max_positions(hf_config) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len",
                "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def create_model_config(args: EngineArgs) -> ModelConfig:
    """Resolve EngineArgs into a ModelConfig (folder, HF config, architecture, dtype, lengths).

    args.model None means the built-in default model. Raises ValueError for an unsupported
    architecture or a max_model_len longer than the model supports.
    """
    from transformers import AutoConfig

    if args.model is None:
        model = model_path = default_model_path()
        default_name = DEFAULT_MODEL_NAME
    else:
        model = args.model
        model_path = resolve_model_path(model, args.revision, args.load_format, args.download_dir)
        default_name = model
    tokenizer_path = _tokenizer_path(args, model_path)
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(f"{model_path} has no config.json: pass the folder of a Hugging Face model "
                         f"(config.json, tokenizer files, weights), or its hub id.")
    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    _apply_hf_overrides(hf_config, args.hf_overrides)
    dtype = args.resolve_dtype(hf_config, args.resolve_device())
    text = text_part(hf_config)
    if text is not None:   # a multimodal checkpoint: its language model, alone
        hf_config, architecture = text
    else:
        architecture = resolve_architecture(hf_config)

    limit = _max_positions(hf_config)
    if limit is not None:   # linear and YaRN rope scaling stretch it (Qwen2.5 with YaRN: 4x)
        limit = rope_position_limit(hf_config, limit)
    window = _drop_sliding_window(hf_config) if args.disable_sliding_window else None
    if window is not None:
        limit = min(limit, window) if limit is not None else window
    if args.max_model_len is not None:
        if limit is not None and args.max_model_len > limit:
            why = (f"its sliding window, {window} tokens, with disable_sliding_window" if limit == window
                   else f"{limit} positions in its config")
            raise ValueError(f"max_model_len {args.max_model_len} is longer than the model supports "
                             f"({why}); use at most {limit}.")
        max_model_len = args.max_model_len
    else:
        max_model_len = limit or 2048  # a config with no length limit at all: a modest default

    return ModelConfig(
        model=model, model_path=model_path, tokenizer_path=tokenizer_path, hf_config=hf_config,
        architecture=architecture, dtype=dtype, max_model_len=max_model_len,
        served_model_name=args.served_model_name or default_name,
        trust_remote_code=args.trust_remote_code, seed=args.seed, load_format=args.load_format,
        max_logprobs=args.max_logprobs, text_part_only=text is not None,
        sampling_defaults=sampling_defaults(args.generation_config, model_path, args.override_generation_config))


def _drop_sliding_window(hf_config) -> Optional[int]:
    """vLLM's --disable-sliding-window: every layer attends to its whole context instead, and
    the caller caps the model's length at the window, within which the two agree. Returns the
    window (None: no layer has one, and nothing changes)."""
    from aserve.models.llama import layer_sliding_window

    layers = getattr(hf_config, "num_hidden_layers", 0) or 0
    windows = {layer_sliding_window(hf_config, i) for i in range(layers)} - {None}
    if not windows:
        return None
    hf_config.sliding_window = None
    return min(windows)


def _apply_hf_overrides(hf_config, overrides: Optional[dict]) -> None:
    """vLLM's --hf-overrides: config fields set or replaced before anything reads the config (a
    longer context with its rope scaling, say). A dict value updates a dict field key by key."""
    for key, value in (overrides or {}).items():
        current = getattr(hf_config, key, None)
        if isinstance(value, dict) and isinstance(current, dict):
            value = {**current, **value}
        setattr(hf_config, key, value)


def _weight_files(model_path: str, suffix: str, index_name: str) -> list[str]:
    index = os.path.join(model_path, index_name)
    if os.path.isfile(index):  # sharded: exactly the files the index names
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_path, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_path, f"*{suffix}")))
    return [f for f in files if not os.path.basename(f).startswith("consolidated")]


def iterate_weights(model_path: str, load_format: str = "auto",
                    skip: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every checkpoint tensor, one file at a time; names skip() takes
    are left out, unread.

    auto: *.safetensors (memory-mapped, no pickle) when there are any, else pytorch_model*.bin;
    "safetensors" or "pt" reads only that format.
    """
    from safetensors import safe_open

    files = [] if load_format == "pt" else _weight_files(
        model_path, ".safetensors", "model.safetensors.index.json")
    if files:
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if skip is None or not skip(name):
                        yield name, f.get_tensor(name)
        return
    if load_format != "safetensors":
        files = [f for f in _weight_files(model_path, ".bin", "pytorch_model.bin.index.json")
                 if os.path.basename(f).startswith("pytorch_model")]
    if not files:
        expected = {"safetensors": "*.safetensors files", "pt": "pytorch_model*.bin files"}.get(
            load_format, "*.safetensors or pytorch_model*.bin files")
        raise ValueError(f"No weights found in {model_path} for load_format={load_format!r}: "
                         f"expected {expected} (or load_format='dummy' for random weights).")
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from ((name, tensor) for name, tensor in state.items() if skip is None or not skip(name))
        del state


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int, bound: float = 1e-3) -> None:
    """vLLM's dummy format: every parameter uniform in [-bound, bound], drawn on its own device
    from a generator seeded with `seed`, so equal seeds give equal weights. A tied parameter is
    one object, listed (and filled) once, so it stays tied."""
    generator = None
    for param in model.parameters():
        if generator is None:  # the model's device (every parameter is built on it)
            generator = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(-bound, bound, generator=generator)


def check_tensor_parallel_split(model_config: ModelConfig, world_size: int) -> None:
    """Refuse, with ValueError, a model whose layers cannot be split over world_size ranks,
    before any process starts or any weight is read: the model is built on the meta device as
    rank 0 of world_size, so every layer's own divisibility check runs, with no memory."""
    if world_size == 1:
        return
    try:
        with torch.device("meta"), building_with(TensorParallelGroup.layout_only(0, world_size)):
            get_model_class(model_config.architecture)(model_config.hf_config)
    except ValueError as exc:
        raise ValueError(f"{model_config.model} cannot be split over tensor_parallel_size="
                         f"{world_size}: {exc}. Choose a size that divides it.") from None


def load_model(model_config: ModelConfig, device, group: TensorParallelGroup = SINGLE_RANK) -> nn.Module:
    """Build the model (this rank's shard of it) directly on `device` in model_config.dtype and
    load its weights (random ones drawn there for load_format "dummy": no weight file is read)."""
    model_cls = get_model_class(model_config.architecture)
    previous_dtype = torch.get_default_dtype()
    # Parameters are created in the serving dtype on the target device, so a model is never
    # materialised twice (first in float32 on the CPU) on its way there.
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(device), building_with(group), serving_max_len(model_config.max_model_len):
            model = model_cls(model_config.hf_config)
    finally:
        torch.set_default_dtype(previous_dtype)
    with torch.no_grad():
        if model_config.load_format == "dummy":
            fill_dummy_weights(model, model_config.seed)
        else:
            if model_config.text_part_only:
                model.load_weights(text_part_weights(iterate_weights(
                    model_config.model_path, model_config.load_format, skip=is_vision_weight)))
            else:
                model.load_weights(iterate_weights(model_config.model_path, model_config.load_format))
    return model.eval()


# The language model's weights in a multimodal checkpoint: transformers 4's names
# (language_model.model.*, language_model.lm_head.*) and 5's (model.language_model.*).
_TEXT_PREFIXES = (("language_model.", ""), ("model.language_model.", "model."))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


def is_vision_weight(name: str) -> bool:
    """A multimodal checkpoint's vision tower or projector weight (left unread)."""
    return name.startswith(_VISION_PREFIXES)


def text_part_weights(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A multimodal checkpoint's language-model weights, named as the text model's own."""
    for name, tensor in weights:
        if is_vision_weight(name):
            continue
        for prefix, replacement in _TEXT_PREFIXES:
            if name.startswith(prefix):
                name = replacement + name[len(prefix):]
                break
        yield name, tensor


def load_tokenizer(model_config: ModelConfig, trust_remote_code: Optional[bool] = None):
    """The model's (fast) tokenizer, from model_config.tokenizer_path."""
    from transformers import AutoTokenizer

    if trust_remote_code is None:
        trust_remote_code = model_config.trust_remote_code
    path = model_config.tokenizer_path
    # Without these, transformers' own error is misleading (it asks to install sentencepiece).
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES) \
            and not glob.glob(os.path.join(path, "*.tiktoken")):
        raise ValueError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): pass the "
                         f"model's tokenizer (--tokenizer <folder or hub id>, OfflineLLM's tokenizer=), "
                         f"or serve token ids only (--skip-tokenizer-init).")
    return AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
