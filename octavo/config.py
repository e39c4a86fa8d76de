"""Engine configuration: what model, how much cache, how big a step.

Everything a user can set on ``LLM(...)`` or ``octavo serve`` lands here, checked
once at start-up so that later code can trust it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from octavo.layers.quantization import check_quantization_option

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30  # 2 GiB: plenty for small models on a laptop
# Tokens per step on CPU: a step stays around a second on two cores even late in an 8k prompt,
# so decodes and newly arrived requests are never held up for long.
CPU_MAX_NUM_BATCHED_TOKENS = 512


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is visible; use device='cpu'.")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, model_dtype: Optional[torch.dtype], device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU; on GPU the checkpoint's half type (bfloat16 for float32 checkpoints)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16.")
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(set(_DTYPES))}, got {dtype!r}.")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    if model_dtype in (torch.float16, torch.bfloat16):
        return model_dtype
    return torch.bfloat16


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: Optional[int] = None  # bytes; CPU default DEFAULT_CPU_KV_CACHE_BYTES
    num_gpu_blocks_override: Optional[int] = None  # tests and benchmarks pin the pool size
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}."
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}.")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}.")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    # default: max(8192, max_model_len) without chunking; with it 8192 on GPU, CPU_MAX_NUM_BATCHED_TOKENS on CPU
    max_num_batched_tokens: Optional[int] = None
    enable_chunked_prefill: bool = True
    # While other requests wait, a prompt's chunk takes at most this many tokens of a step, so a
    # long prompt cannot hold them back until it is done (default: half the step budget on CPU,
    # where a step of a long prompt's chunk takes seconds; off on GPU).
    long_prefill_token_threshold: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}.")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(
                f"long_prefill_token_threshold must be >= 1, got {self.long_prefill_token_threshold}."
            )

    def step_token_budget(self, device: torch.device, max_model_len: int) -> int:
        """Tokens per step: what was asked for, else the device's default."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if not self.enable_chunked_prefill:
            return max(8192, max_model_len)
        return CPU_MAX_NUM_BATCHED_TOKENS if device.type == "cpu" else 8192

    def prefill_chunk_cap(self, device: torch.device, step_budget: int) -> Optional[int]:
        """The chunk a prompt may take while others wait (None: the whole budget)."""
        if self.long_prefill_token_threshold is not None:
            return self.long_prefill_token_threshold
        return max(1, step_budget // 2) if device.type == "cpu" and self.enable_chunked_prefill else None


@dataclass
class EngineConfig:
    model: str
    tokenizer: Optional[str] = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    max_model_len: Optional[int] = None
    seed: int = 0
    load_format: str = "auto"  # auto | safetensors | gguf | dummy | pt
    allow_pickle_weights: bool = False
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False
    attention_backend: str = "auto"  # auto | torch | cpu | triton
    # GGUF 4-bit matrices on CPU: kept in their blocks ("packed") or decoded to the model dtype
    # ("float32", the reference); auto packs them for float32 CPU runs.
    gguf_weights: str = "auto"
    # Plan step k+1 while the device runs step k (None: on for CUDA, off for CPU, where the
    # host is the device and nothing would overlap).
    async_scheduling: Optional[bool] = None
    # Run the engine core (scheduler, KV cache, model runner) in its own process, so that
    # tokenization, detokenization and HTTP never take the GIL from the step loop
    # (None: on for CUDA; off for CPU, where the front end and the core share the cores).
    engine_core_process: Optional[bool] = None
    # Weight format: auto (config.json's quantization_config), none, or a format name; fp8 also
    # quantizes a 16-bit checkpoint at load.
    quantization: Optional[str] = "auto"
    # Engine cores (replicas) behind the one front end, each on its own device(s).
    data_parallel_size: int = 1
    # Where the cores run: None or "mp" (local processes), "ray" (Ray actors, on any machine of a cluster).
    distributed_executor_backend: Optional[str] = None
    # Split the model across this many ranks (GPUs, or gloo processes on CPU), Megatron-style.
    tensor_parallel_size: int = 1
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy", "pt"):
            raise ValueError(
                f"load_format must be one of auto, safetensors, gguf, dummy, pt; got {self.load_format!r}."
            )
        check_quantization_option(self.quantization)
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}.")
        if self.engine_core_process is False and (self.data_parallel_size > 1
                                                  or self.distributed_executor_backend == "ray"):
            raise ValueError("data_parallel_size > 1 and the ray backend run engine cores in their own "
                             "processes; leave engine_core_process unset.")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError("distributed_executor_backend must be 'mp' or 'ray', got "
                             f"{self.distributed_executor_backend!r}.")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}.")
        if self.gguf_weights not in ("auto", "packed", "float32"):
            raise ValueError(f"gguf_weights must be 'auto', 'packed' or 'float32', got {self.gguf_weights!r}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}.")
