"""The attention layer models use: writes this step's K/V, then attends over the cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers.attention.backend import AttentionBackend
from octavo.layers.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    """``alibi_slopes`` (one per query head) adds ``slope * (key_pos - query_pos)`` to the scaled
    scores instead of rotary positions (BLOOM); ``logits_soft_cap`` first replaces each scaled
    score ``s`` by ``cap * tanh(s / cap)`` (Gemma-2)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None, alibi_slopes: Optional[torch.Tensor] = None,
                 logits_soft_cap: Optional[float] = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")
        if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
            raise ValueError(
                f"alibi_slopes needs one slope per query head ({num_heads}), got {tuple(alibi_slopes.shape)}."
            )
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}.")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.alibi_slopes: Optional[torch.Tensor]
        if alibi_slopes is None:
            self.alibi_slopes = None
        else:  # float32 whatever the model dtype; moves with the model
            slopes = alibi_slopes.to(device=torch.get_default_device(), dtype=torch.float32)
            self.register_buffer("alibi_slopes", slopes.contiguous(), persistent=False)
        # Bound by the model runner once the cache is allocated.
        self.kv_cache: Optional[torch.Tensor] = None
        self.backend: Optional[AttentionBackend] = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """query [T, Hq*D], key/value [T, Hkv*D] -> [T, Hq*D]."""
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.kv_cache is None or self.backend is None:
            raise RuntimeError("attention layer used before the KV cache was bound.")
        self.backend.write_kv(key, value, self.kv_cache, metadata)
        out = self.backend.attend(query, self.kv_cache, metadata, self.scale, self.sliding_window,
                                  alibi_slopes=self.alibi_slopes, logits_soft_cap=self.logits_soft_cap)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
