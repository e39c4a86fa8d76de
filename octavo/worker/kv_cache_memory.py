"""How many KV blocks fit: a fixed byte budget on CPU, a profiled share of the card on CUDA."""

from __future__ import annotations

import logging

import torch

from octavo.config import DEFAULT_CPU_KV_CACHE_BYTES

logger = logging.getLogger(__name__)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


def cpu_kv_cache_bytes(kv_cache_memory: int | None) -> int:
    return kv_cache_memory if kv_cache_memory is not None else DEFAULT_CPU_KV_CACHE_BYTES


def cuda_kv_cache_bytes(device: torch.device, gpu_memory_utilization: float, peak_activation_bytes: int) -> int:
    """What is left of ``utilization * total`` after everything already on the card
    (weights, other processes) and the activation peak of a worst-case step."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = int(total * gpu_memory_utilization) - used - peak_activation_bytes
    logger.info(
        "GPU memory: total %.2f GiB, in use %.2f GiB, activation peak %.2f GiB, KV budget %.2f GiB",
        total / 2**30, used / 2**30, peak_activation_bytes / 2**30, max(budget, 0) / 2**30,
    )
    if budget <= 0:
        raise RuntimeError(
            f"no GPU memory left for the KV cache at gpu_memory_utilization={gpu_memory_utilization}: "
            f"{used / 2**30:.2f} GiB of {total / 2**30:.2f} GiB is in use. Raise gpu_memory_utilization, "
            "lower max_num_batched_tokens, or use a smaller model."
        )
    return budget
