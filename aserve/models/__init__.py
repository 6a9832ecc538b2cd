"""Model implementations over the paged KV cache, their registry and the loader."""

from aserve.models.loader import create_model_config, load_model, load_tokenizer, resolve_model_path
from aserve.models.registry import get_model_class, supported_architectures

__all__ = ["create_model_config", "get_model_class", "load_model", "load_tokenizer",
           "resolve_model_path", "supported_architectures"]
