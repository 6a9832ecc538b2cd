"""aserve: high-throughput LLM inference and serving (paged KV cache, continuous batching)."""

from aserve.config import EngineArgs
from aserve.outputs import CompletionOutput, Logprob, RequestOutput
from aserve.sampling_params import SamplingParams

__all__ = ["OfflineLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "EngineArgs"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: the engine pulls in the models and transformers, which light users
    # of aserve (protocol types, sampling params) should not pay for.
    if name == "OfflineLLM":
        from aserve.offline import OfflineLLM
        return OfflineLLM
    raise AttributeError(f"module 'aserve' has no attribute {name!r}")
