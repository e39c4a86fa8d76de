"""The interface every attention implementation provides, and how one is chosen."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from octavo.layers.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 metadata: AttentionMetadata) -> None:
        """Store the step's K/V ([num_tokens, num_kv_heads, head_dim]) at their cache slots."""

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
               scale: float, sliding_window: Optional[int], *,
               alibi_slopes: Optional[torch.Tensor] = None,
               logits_soft_cap: Optional[float] = None) -> torch.Tensor:
        """Causal attention of the step's queries over each sequence's cached K/V.

        ``kv_cache`` is ``[2, num_blocks, block_size, num_kv_heads, head_dim]``;
        returns ``[num_tokens, num_q_heads, head_dim]``. The scaled scores ``s`` become
        ``cap * tanh(s / cap)`` with ``logits_soft_cap``, then gain
        ``alibi_slopes[head] * (key_pos - query_pos)`` with ``alibi_slopes`` (fp32, per query head).
        """


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` uses the Triton kernels on CUDA when available, the flash-attention CPU path on
    the CPU, else the PyTorch reference (``torch``, which runs anywhere)."""
    from octavo.layers.attention.torch_backend import TorchAttentionBackend

    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        from octavo.layers.attention.cpu_backend import CpuAttentionBackend, cpu_flash_available

        if device.type != "cpu":
            raise ValueError(f"attention backend 'cpu' runs on the CPU only, not on {device.type}.")
        if cpu_flash_available():
            return CpuAttentionBackend()
        if name == "cpu":
            raise ValueError("attention backend 'cpu' needs torch's flash attention for CPU (torch >= 2.3).")
        return TorchAttentionBackend()
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    if name in ("auto", "triton"):
        try:
            from octavo.layers.attention.triton_backend import TritonAttentionBackend
        except ImportError as error:
            if name == "triton":
                raise ValueError(f"attention backend 'triton' is unavailable: {error}") from error
            return TorchAttentionBackend()
        return TritonAttentionBackend()
    raise ValueError(f"attention backend must be 'auto', 'torch', 'cpu' or 'triton', got {name!r}.")
