"""Engine settings: EngineArgs (what a user passes) resolved into frozen configs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch

LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
_DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "float32": torch.float32, "float": torch.float32}


@dataclass(frozen=True)
class ModelConfig:
    model: str                 # what the user named: a folder or a hub id
    model_path: str            # the resolved local folder
    tokenizer_path: str
    hf_config: object          # transformers.PretrainedConfig
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    served_model_name: str
    trust_remote_code: bool
    seed: int
    load_format: str = "auto"

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_blocks: int
    kv_cache_memory_bytes: int


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1


@dataclass
class EngineArgs:
    """Everything a user may set; names and defaults follow vLLM where it has them."""

    model: Optional[str] = None          # None: the built-in default model
    tokenizer: Optional[str] = None
    served_model_name: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"                 # auto: cuda when available, else cpu
    max_model_len: Optional[int] = None
    block_size: int = 16
    kv_cache_memory_gb: Optional[float] = None   # CPU: the KV cache's budget (default 1 GiB)
    num_gpu_blocks_override: Optional[int] = None  # exact block count (tests, debugging)
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: Optional[int] = None
    max_num_seqs: int = 256
    seed: int = 0
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    # Decode steps with a longer context than this run eagerly (no CUDA graph), as in vLLM.
    max_seq_len_to_capture: int = 8192
    # auto: *.safetensors, else pytorch_model*.bin; safetensors / pt: only that format;
    # dummy: random weights (uniform in [-1e-3, 1e-3], seeded by `seed`), no weight files read.
    load_format: str = "auto"
    skip_tokenizer_init: bool = False    # no tokenizer: prompts are token ids, outputs have no text
    # Schedule step k+1 while step k runs on the GPU (engine/pipeline.py): measured faster on
    # every bench/workloads.py workload on an H100; the server's step driver pipelines too.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}.")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be one of auto, float16, bfloat16, float32, got {self.dtype!r}.")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}.")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}.")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet; use 1.")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, hf_config, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32  # CPU half-precision matmuls are slow and less exact
        config_dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype, torch.float16)
        if config_dtype in (None, torch.float32):
            return torch.float16  # as vLLM: float32 checkpoints serve in half precision on GPU
        return config_dtype
