"""aserve: high-throughput LLM inference and serving (paged KV cache, continuous batching)."""

import logging as _logging
import os as _os

from aserve.config import EngineArgs
from aserve.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from aserve.pooling_params import PoolingParams
from aserve.sampling_params import BeamSearchParams, SamplingParams
from aserve.structured_output import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["OfflineLLM", "LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
           "Logprob", "EngineArgs", "StructuredOutputsParams", "GuidedDecodingParams", "PoolingParams",
           "EmbeddingOutput", "EmbeddingRequestOutput"]
__version__ = "0.1.0"


def _configure_logging() -> None:
    """Start-up facts (KV blocks, graph capture, engine start time) reach script users too, as
    vLLM's do: the "aserve" logger prints INFO to stderr unless ASERVE_CONFIGURE_LOGGING=0 or
    the application gave it handlers of its own."""
    logger = _logging.getLogger("aserve")
    if _os.environ.get("ASERVE_CONFIGURE_LOGGING", "1") != "1" or logger.handlers:
        return
    handler = _logging.StreamHandler()
    handler.setFormatter(_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(_logging.INFO)


_configure_logging()


def __getattr__(name: str):
    # Imported lazily: the engine pulls in the models and transformers, which light users
    # of aserve (protocol types, sampling params) should not pay for.
    if name in ("OfflineLLM", "LLM"):   # LLM: vLLM's name, for scripts written for vLLM
        from aserve.offline import OfflineLLM
        return OfflineLLM
    raise AttributeError(f"module 'aserve' has no attribute {name!r}")
