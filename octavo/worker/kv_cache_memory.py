"""How many KV blocks fit: a fixed byte budget on CPU, a profiled share of the card on CUDA."""

from __future__ import annotations

import gc
import logging

import torch

from octavo.config import DEFAULT_CPU_KV_CACHE_BYTES

logger = logging.getLogger(__name__)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


def cpu_kv_cache_bytes(kv_cache_memory: int | None) -> int:
    return kv_cache_memory if kv_cache_memory is not None else DEFAULT_CPU_KV_CACHE_BYTES


def check_cuda_share(device: torch.device, gpu_memory_utilization: float) -> int:
    """Before an engine takes anything: refuse a share larger than what is free now (as vLLM does),
    and return how much this process has reserved so far, to measure the engine's own use against."""
    gc.collect()  # engines the caller dropped give their memory back
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    share = int(total * gpu_memory_utilization)
    if free < share:
        raise ValueError(
            f"gpu_memory_utilization={gpu_memory_utilization} asks for {share / 2**30:.2f} GiB, but only "
            f"{free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB is free (other processes or engines hold the "
            "rest). Lower gpu_memory_utilization or free the GPU."
        )
    return torch.cuda.memory_reserved(device)


def cuda_kv_cache_bytes(device: torch.device, gpu_memory_utilization: float, peak_activation_bytes: int,
                        reserved_at_start: int) -> int:
    """The KV share of this engine's ``utilization * total``, as in vLLM: the share minus what this engine
    itself holds (weights and buffers: this process's reserved memory since ``reserved_at_start``) and the
    activation peak of a worst-case step. Memory held by others does not shrink the share, but the budget
    never exceeds what is free now."""
    free, total = torch.cuda.mem_get_info(device)
    share = int(total * gpu_memory_utilization)
    own = max(torch.cuda.memory_reserved(device) - reserved_at_start, 0)
    budget = min(share - own, free) - peak_activation_bytes
    logger.info(
        "GPU memory: total %.2f GiB, share %.2f GiB, weights and buffers %.2f GiB, activation peak %.2f GiB, "
        "KV budget %.2f GiB",
        total / 2**30, share / 2**30, own / 2**30, peak_activation_bytes / 2**30, max(budget, 0) / 2**30,
    )
    if budget <= 0:
        raise RuntimeError(
            f"no GPU memory left for the KV cache at gpu_memory_utilization={gpu_memory_utilization}: the "
            f"weights and buffers take {own / 2**30:.2f} GiB and a worst-case step "
            f"{peak_activation_bytes / 2**30:.2f} GiB of the {share / 2**30:.2f} GiB share "
            f"({free / 2**30:.2f} GiB is free). Raise gpu_memory_utilization, lower max_num_batched_tokens, "
            "or use a smaller model."
        )
    return budget
