"""Attention on the CPU through torch's flash-attention kernel for CPU.

The reference backend (``torch_backend``) stays the oracle; this one differs only where it
pays on a CPU, and the tests hold the two together:

* a prefill chunk runs as two flash-attention calls and no mask at all: the chunk's queries
  over the chunk's own keys (causal, the kernel skips the masked tiles) and over the keys
  cached before it (all visible). The two partial results are merged through their
  log-sum-exps. Memory stays linear in the chunk and the kernel reads K/V heads as they are
  (grouped-query attention without copies).
* a mixed batch runs its leading one-token rows as one batched decode instead of one
  call per sequence.

Sliding windows (and any other score modifier) go to the reference path.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from octavo.layers.attention.metadata import AttentionMetadata
from octavo.layers.attention.torch_backend import TorchAttentionBackend, gather_kv

_flash_for_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def cpu_flash_available() -> bool:
    return _flash_for_cpu is not None


def _flash(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """query [q, Hq, D], keys/values [k, Hkv, D] -> (out [1, Hq, q, D], logsumexp [1, Hq, q])."""
    return _flash_for_cpu(query.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                          0.0, causal, scale=scale)


def attend_chunk(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a chunk's queries, the last ``q`` of the ``k`` keys: [q, Hq, D]."""
    query_len = query.shape[0]
    context = keys.shape[0] - query_len
    out, lse = _flash(query, keys[context:], values[context:], scale, causal=True)
    if context > 0:
        prefix_out, prefix_lse = _flash(query, keys[:context], values[:context], scale, causal=False)
        total = torch.logaddexp(lse, prefix_lse)
        out = out * (lse - total).exp()[..., None] + prefix_out * (prefix_lse - total).exp()[..., None]
    return out[0].transpose(0, 1)


def _decode_part(metadata: AttentionMetadata) -> AttentionMetadata:
    """The leading one-token rows of a mixed batch, as a decode-only batch of their own."""
    rows = metadata.num_decodes
    return AttentionMetadata(
        query_start_loc=metadata.query_start_loc[: rows + 1],
        seq_lens=metadata.seq_lens[:rows],
        block_tables=metadata.block_tables[:rows],
        slot_mapping=metadata.slot_mapping[:rows],
        max_query_len=1,
        max_seq_len=max(metadata.seq_lens_cpu[:rows]),
        query_start_loc_cpu=metadata.query_start_loc_cpu[: rows + 1],
        seq_lens_cpu=metadata.seq_lens_cpu[:rows],
    )


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self, paged_decode: Optional[bool] = None) -> None:
        """``paged_decode``: decode rows read K/V through the block tables in one kernel
        (``cpu_paged``) instead of gather + SDPA; default: on unless ``OCTAVO_CPU_PAGED_DECODE=0``,
        and only where the kernel builds."""
        from octavo.layers.attention import cpu_paged

        wanted = cpu_paged.paged_decode_enabled() if paged_decode is None else paged_decode
        self.paged_decode = wanted and cpu_paged.load_paged_decode()

    def _decode_rows(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                     scale: float) -> torch.Tensor:
        if self.paged_decode and query.dtype == torch.float32 and kv_cache.dtype == torch.float32:
            from octavo.layers.attention.cpu_paged import paged_decode

            return paged_decode(query, kv_cache, metadata.block_tables, metadata.seq_lens, scale)
        return self._decode(query, kv_cache, metadata, scale, None)

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
               scale: float, sliding_window: Optional[int], **modifiers: Any) -> torch.Tensor:
        if sliding_window is not None or any(value is not None for value in modifiers.values()):
            return super().attend(query, kv_cache, metadata, scale, sliding_window, **modifiers)
        if metadata.is_decode_only:
            return self._decode_rows(query, kv_cache, metadata, scale)
        out = torch.empty_like(query)
        first = metadata.num_decodes
        if first:
            if "decode_part" not in metadata.per_step:
                metadata.per_step["decode_part"] = _decode_part(metadata)
            out[:first] = self._decode_rows(query[:first], kv_cache, metadata.per_step["decode_part"], scale)
        starts = metadata.query_start_loc_cpu
        for index in range(first, metadata.num_seqs):
            start, end = starts[index], starts[index + 1]
            if start == end:
                continue
            keys, values = gather_kv(kv_cache, metadata.block_tables[index], metadata.seq_lens_cpu[index])
            out[start:end] = attend_chunk(query[start:end], keys, values, scale)
        return out
