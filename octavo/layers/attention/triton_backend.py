"""Attention through the Triton PagedAttention kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

from typing import Optional

import torch

from octavo.layers.attention.metadata import AttentionMetadata
from octavo.layers.attention.triton_ops import (
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
    triton_available,
)

if not triton_available():
    raise ImportError("Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for testing).")


class TritonAttentionBackend:
    name = "triton"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 metadata: AttentionMetadata) -> None:
        store_kv(key, value, kv_cache, metadata.slot_mapping)

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
               scale: float, sliding_window: Optional[int], *, alibi_slopes: Optional[torch.Tensor] = None,
               logits_soft_cap: Optional[float] = None) -> torch.Tensor:
        out = torch.empty_like(query)
        mods = dict(alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap)
        if metadata.is_decode_only:
            paged_decode_attention(out, query, kv_cache, metadata.block_tables, metadata.seq_lens, scale,
                                   sliding_window, **mods)
        elif metadata.prefill is not None:
            # Mixed batch, decodes first: each part to the kernel made for it (the prefill
            # kernel would spend a whole query tile on every one-token row).
            decodes, prefill = metadata.num_decodes, metadata.prefill
            paged_decode_attention(out[:decodes], query[:decodes], kv_cache, metadata.block_tables[:decodes],
                                   metadata.seq_lens[:decodes], scale, sliding_window, **mods)
            paged_prefill_attention(out[decodes:], query[decodes:], kv_cache, prefill.block_tables,
                                    prefill.query_start_loc, prefill.seq_lens, metadata.max_query_len, scale,
                                    sliding_window, **mods)
        else:
            paged_prefill_attention(out, query, kv_cache, metadata.block_tables, metadata.query_start_loc,
                                    metadata.seq_lens, metadata.max_query_len, scale, sliding_window, **mods)
        return out
