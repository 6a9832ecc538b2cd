"""Which model class serves which Hugging Face architecture name (config.architectures)."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module under aserve.models, class name); imported lazily so that asking for
# one family never imports the others.
_MODELS: dict[str, tuple[str, str]] = {
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "Olmo2ForCausalLM": ("olmo2", "Olmo2ForCausalLM"),
    "Olmo3ForCausalLM": ("olmo2", "Olmo3ForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
}


def supported_architectures() -> list[str]:
    """The architecture names aserve can serve, sorted."""
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for an HF architecture name; ValueError listing the supported ones."""
    if architecture not in _MODELS:
        raise ValueError(f"Model architecture {architecture!r} is not supported by aserve. "
                         f"Supported architectures: {', '.join(supported_architectures())}.")
    module_name, class_name = _MODELS[architecture]
    module = importlib.import_module(f"aserve.models.{module_name}")
    return getattr(module, class_name)


def resolve_architecture(hf_config) -> str:
    """The first architecture of a config that aserve supports; ValueError otherwise."""
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in _MODELS:
            return arch
    shown = ", ".join(architectures) if architectures else "none listed in config.json"
    raise ValueError(f"Model architecture(s) {shown} not supported by aserve. "
                     f"Supported architectures: {', '.join(supported_architectures())}.")
