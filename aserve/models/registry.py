"""Which model class serves which Hugging Face architecture name (config.architectures)."""

from __future__ import annotations

import copy
import importlib

from torch import nn

# architecture -> (module under aserve.models, class name); imported lazily so that asking for
# one family never imports the others.
_MODELS: dict[str, tuple[str, str]] = {
    "ArceeForCausalLM": ("arcee", "ArceeForCausalLM"),
    "CohereForCausalLM": ("cohere", "CohereForCausalLM"),
    "Cohere2ForCausalLM": ("cohere", "Cohere2ForCausalLM"),
    "Ernie4_5ForCausalLM": ("ernie45", "Ernie4_5ForCausalLM"),
    "Exaone4ForCausalLM": ("exaone4", "Exaone4ForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "GlmForCausalLM": ("glm", "GlmForCausalLM"),
    "Glm4ForCausalLM": ("glm", "Glm4ForCausalLM"),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM"),
    "GraniteMoeForCausalLM": ("granitemoe", "GraniteMoeForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "OlmoForCausalLM": ("olmo", "OlmoForCausalLM"),
    "Olmo2ForCausalLM": ("olmo2", "Olmo2ForCausalLM"),
    "Olmo3ForCausalLM": ("olmo2", "Olmo3ForCausalLM"),
    "OlmoeForCausalLM": ("olmoe", "OlmoeForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "PhiForCausalLM": ("phi", "PhiForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "GPTBigCodeForCausalLM": ("gpt2", "GPTBigCodeForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "SeedOssForCausalLM": ("seed_oss", "SeedOssForCausalLM"),
    "SmolLM3ForCausalLM": ("smollm3", "SmolLM3ForCausalLM"),
    "StableLmForCausalLM": ("stablelm", "StableLmForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
}


# Multimodal checkpoints whose language model aserve serves alone (text in, text out): the
# architecture of their text part. Their vision weights are not read.
_TEXT_PARTS: dict[str, str] = {
    "Gemma3ForConditionalGeneration": "Gemma3ForCausalLM",       # gemma-3-4b/12b/27b-it
    "Mistral3ForConditionalGeneration": "MistralForCausalLM",    # Mistral-Small-3.1/3.2-24B
}


def text_part(hf_config):
    """(the text part's config, its architecture) of a multimodal checkpoint in _TEXT_PARTS,
    else None. The text config takes the whole model's tie_word_embeddings, which is what
    transformers ties by."""
    architectures = getattr(hf_config, "architectures", None) or []
    text_config = getattr(hf_config, "text_config", None)
    for arch in architectures:
        if arch in _TEXT_PARTS and text_config is not None:
            text_config = copy.deepcopy(text_config)
            text_config.architectures = [_TEXT_PARTS[arch]]
            tied = getattr(hf_config, "tie_word_embeddings", None)
            if tied is not None:
                text_config.tie_word_embeddings = tied
            return text_config, _TEXT_PARTS[arch]
    return None


def supported_architectures() -> list[str]:
    """The architecture names aserve can serve, sorted (multimodal ones: their text part)."""
    return sorted([*_MODELS, *_TEXT_PARTS])


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
