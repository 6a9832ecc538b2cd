"""Engine settings: EngineArgs (what a user passes) resolved into frozen configs."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
# Chunked prefill keeps steps short; long prompts are simply spread over several steps. A GPU
# wants larger steps: its matrix units need thousands of rows to run at full rate. As vLLM, a
# GPU of 70 GiB or more (A100/H100 80 GB, H200) takes larger steps and more sequences: there a
# model of 8B parameters reads its weights once for twice the rows, and the KV cache has room.
# On an H200, 512 / 16384 ran model B (Llama-3.1-8B shape) offline 5% faster than 256 / 8192
# (taking turns in one call), and 1024 sequences no faster than 512; model A (OPT-125m shape)
# was not slower. An API server whose engine steps in the server's own process keeps 256 / 8192
# there: served all at once, model A delivered 36.9k tok/s at 512 against 44.2k at 256 in an
# earlier lease, its steps' host work (sharing one interpreter with the HTTP work) growing with
# their rows; on the CPU, 512 doubled the server's TPOT in every turn, with no steady difference
# in throughput (bench/RESULTS.md, 2026-12-04). An engine in a process of its own (the server's
# default on CUDA) steps alone, as offline, and takes the larger steps: on an H100, model A
# served all at once at 111-117k tok/s with 512 / 16384 against 94-98k with 256 / 8192, and
# the same at Poisson 40 req/s (1024 sequences: 72-74k, past the decode graphs' largest batch;
# bench/RESULTS.md, 2026-12-06).
LARGE_GPU_BYTES = 70 << 30
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192, "large-gpu": 16384}
DEFAULT_MAX_NUM_SEQS = {"cpu": 256, "cuda": 256, "large-gpu": 512}
# Who runs the engine (vLLM's UsageContext): OfflineLLM and direct users; the API server, the
# engine in its own process; or the engine process that an API server feeds.
USAGE_CONTEXTS = ("offline", "api_server", "engine_process")
# vLLM's --runner: generate text, or pool prompts into embeddings (/v1/embeddings, embed()).
RUNNERS = ("generate", "pooling")
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
    # The most logprobs one request may ask for (-1 = the whole vocabulary), as vLLM.
    max_logprobs: int = 20
    # The model's sampling defaults (its generation_config.json: models/generation_config.py),
    # for what a request leaves unset; max_new_tokens is max_tokens here.
    sampling_defaults: dict = field(default_factory=dict)
    # A multimodal checkpoint served as its language model alone (models/registry.text_part):
    # hf_config is the text config, and the weights are read through loader.text_part_weights.
    text_part_only: bool = False

    @functools.cached_property
    def vocab_size(self) -> int:
        # Cached: transformers' config attributes cost ~1-2 us a read, and every add reads this.
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
    """How the model is sharded over processes: tensor_parallel_size ranks, spread evenly over
    nnodes machines; rank r runs on node r // ranks_per_node, on its GPU r % ranks_per_node.
    Node 0 (the head) holds rank 0, which is the engine's own process; master_addr and
    master_port name the head's rendezvous store (None: loopback and a free port, one node)."""

    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    def node_ranks(self, node: Optional[int] = None) -> range:
        """The ranks of a node (default: this one)."""
        node = self.node_rank if node is None else node
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def local_rank(self, rank: int) -> int:
        return rank % self.ranks_per_node


@dataclass
class EngineArgs:
    """Everything a user may set; names and defaults follow vLLM where it has them."""

    model: Optional[str] = None          # None: the built-in default model
    tokenizer: Optional[str] = None
    served_model_name: Optional[str] = None
    revision: Optional[str] = None       # a hub model's branch, tag or commit
    # The tokenizer's revision (a separate --tokenizer repo's; default: the model's revision
    # when the tokenizer is the model's own, else the repo's default branch).
    tokenizer_revision: Optional[str] = None
    download_dir: Optional[str] = None   # where hub downloads go (default: the Hugging Face cache)
    dtype: str = "auto"
    device: str = "auto"                 # auto: cuda when available, else cpu
    max_model_len: Optional[int] = None
    block_size: int = 16
    kv_cache_memory_gb: Optional[float] = None   # CPU: the KV cache's budget (default 1 GiB)
    num_gpu_blocks_override: Optional[int] = None  # exact block count (tests, debugging)
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: Optional[int] = None  # None: DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: Optional[int] = None          # None: DEFAULT_MAX_NUM_SEQS for the device
    seed: int = 0
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    # Several machines (torchrun's names): the head (node_rank 0) runs the engine and serves;
    # the others run `python -m aserve --headless` and start their ranks.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    enforce_eager: bool = False
    # vLLM's: full attention on every layer, the model's length capped at its sliding window.
    disable_sliding_window: bool = False
    # Decode steps with a longer context than this run eagerly (no CUDA graph), as in vLLM.
    max_seq_len_to_capture: int = 8192
    # auto: *.safetensors, else pytorch_model*.bin; safetensors / pt: only that format;
    # dummy: random weights (uniform in [-1e-3, 1e-3], seeded by `seed`), no weight files read.
    load_format: str = "auto"
    skip_tokenizer_init: bool = False    # no tokenizer: prompts are token ids, outputs have no text
    # Schedule step k+1 while step k runs on the GPU (engine/pipeline.py): measured faster on
    # every bench/workloads.py workload on an H100; the server's step driver pipelines too.
    async_scheduling: bool = True
    # Reuse the KV blocks of prompt prefixes already computed (engine/prefix_cache.py); on by
    # default, as in vLLM.
    enable_prefix_caching: bool = True
    # Most logprobs (and prompt logprobs) a request may ask for; -1 means no bound (vLLM's).
    max_logprobs: int = 20
    # Where requests' sampling defaults come from, as vLLM: auto (the model's
    # generation_config.json), vllm (none: the API's own), or a folder; and overrides of them.
    generation_config: str = "auto"
    override_generation_config: Optional[dict] = None
    # vLLM's --hf-overrides: fields of the model's config.json set or replaced at load.
    hf_overrides: Optional[dict] = None
    # api_server: `python -m aserve` with the engine in its process (the CLI's default, changed
    # to engine_process when the engine gets a process of its own), which keeps smaller steps
    # on a large GPU.
    usage_context: str = "offline"
    # generate: text (the default); pooling: each prompt becomes an embedding, its last token's
    # final hidden state (aserve/pooling_params.py), and nothing is generated.
    runner: str = "generate"

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}.")
        if self.usage_context not in USAGE_CONTEXTS:
            raise ValueError(f"usage_context must be one of {', '.join(USAGE_CONTEXTS)}, got {self.usage_context!r}.")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}.")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be one of auto, float16, bfloat16, float32, got {self.dtype!r}.")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}.")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no bound) or at least 0, got {self.max_logprobs}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}.")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}.")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}.")
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"nnodes must be at least 1 and divide tensor_parallel_size "
                             f"({self.tensor_parallel_size}), got {self.nnodes}.")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}.")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be a TCP port (1-65535), got {self.master_port}.")
        if self.nnodes > 1 and (self.master_addr is None or self.master_port is None):
            raise ValueError("several nodes (nnodes > 1) need master_addr and master_port: the "
                             "head node's address and a free port on it, the same on every node.")

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.nnodes, self.node_rank,
                              self.master_addr, self.master_port)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible to it"
            raise ValueError(f"device {self.device!r} was asked for, but torch {torch.__version__} has no "
                             f"CUDA ({build}): use --device cpu (or auto), or install a CUDA build of torch.")
        return device

    def resolve_max_num_batched_tokens(self, device: torch.device) -> int:
        return self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS[self._step_defaults(device)]

    def resolve_max_num_seqs(self, device: torch.device) -> int:
        return self.max_num_seqs or DEFAULT_MAX_NUM_SEQS[self._step_defaults(device)]

    def _step_defaults(self, device: torch.device) -> str:
        key = device_class(device)
        return "cuda" if key == "large-gpu" and self.usage_context == "api_server" else key

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


def device_class(device: torch.device) -> str:
    """The key of the step-size defaults: cpu, cuda, or large-gpu (a GPU of LARGE_GPU_BYTES or
    more). Every rank of a tensor-parallel group resolves the same, on GPUs of one kind."""
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "large-gpu" if torch.cuda.get_device_properties(index).total_memory >= LARGE_GPU_BYTES else "cuda"
