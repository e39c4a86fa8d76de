"""Reference attention in plain PyTorch: runs on any device and is the test oracle.

It reads K/V only through block tables, exactly like the GPU kernels, so a bug
in block bookkeeping shows up here too.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from octavo.layers.attention.metadata import AttentionMetadata

# Prefill queries per attention call. Each call's scores are [group * QUERY_TILE, keys], so a
# long prompt never holds a [tokens x tokens] matrix.
QUERY_TILE = 256
# Masks up to this many elements are kept for the step's other layers; larger ones are rebuilt,
# or one long chunk would keep a mask per tile (quadratic in the chunk) alive.
_CACHED_MASK_ELEMENTS = 1 << 20


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V, ``[seq_len, num_kv_heads, head_dim]`` each, via its block table."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    values = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return keys, values


def causal_mask(query_len: int, seq_len: int, sliding_window: Optional[int], device) -> torch.Tensor:
    """True where query ``i`` (absolute position ``seq_len - query_len + i``) may see key ``j``."""
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= query_pos - key_pos < sliding_window
    return visible


def modify_scores(scores: torch.Tensor, distance: torch.Tensor, slopes: Optional[torch.Tensor],
                  soft_cap: Optional[float]) -> torch.Tensor:
    """Soft-capping, then the ALiBi bias, on a tile of scaled scores ``[..., rows, keys]``.

    ``distance`` is ``key_pos - query_pos`` per (row, key) and ``slopes`` one ALiBi slope per row
    (both broadcast against ``scores``); ``None`` skips either step.
    """
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    if slopes is not None:
        scores = scores + slopes[..., None] * distance
    return scores


def _attend_modified(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                     distance: torch.Tensor, slopes: Optional[torch.Tensor],
                     soft_cap: Optional[float]) -> torch.Tensor:
    """Explicit-score attention for what SDPA cannot express; scores and softmax in float32."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = modify_scores(scores, distance, slopes, soft_cap).masked_fill(~visible, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def _attend_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group_mask: torch.Tensor,
                scale: float, alibi_slopes: Optional[torch.Tensor] = None,
                soft_cap: Optional[float] = None) -> torch.Tensor:
    """query [q, Hq, D], keys/values [k, Hkv, D] -> [q, Hq, D]; GQA by viewing heads as groups.

    Each KV head's query heads are folded into the query length (no broadcasting: fast SDPA
    kernels), so ``group_mask`` is the causal mask repeated once per query head of a group.
    """
    query_len, num_q_heads, head_dim = query.shape
    seq_len, num_kv_heads = keys.shape[0], keys.shape[1]
    group = num_q_heads // num_kv_heads
    q = query.transpose(0, 1).reshape(num_kv_heads, group * query_len, head_dim)
    k, v = keys.transpose(0, 1), values.transpose(0, 1)
    if alibi_slopes is None and soft_cap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=group_mask, scale=scale)
    else:
        positions = torch.arange(seq_len, device=query.device)
        distance = (positions[None, :] - positions[seq_len - query_len:, None]).repeat(group, 1)
        slopes = None  # one per folded row: query head (kv, g) for each of the query_len tokens
        if alibi_slopes is not None:
            slopes = alibi_slopes.view(num_kv_heads, group).repeat_interleave(query_len, dim=1)
        out = _attend_modified(q, k, v, group_mask, scale, distance, slopes, soft_cap)
    return out.reshape(num_q_heads, query_len, head_dim).transpose(0, 1)


class TorchAttentionBackend:
    name = "torch"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 metadata: AttentionMetadata) -> None:
        if "valid_slots" not in metadata.per_step:
            slots = metadata.slot_mapping
            valid = slots >= 0
            metadata.per_step["valid_slots"] = (slots, None) if bool(valid.all()) else (slots[valid], valid)
        slots, valid = metadata.per_step["valid_slots"]
        if valid is not None:
            key, value = key[valid], value[valid]
        kv_cache[0].view(-1, *key.shape[1:])[slots] = key.to(kv_cache.dtype)
        kv_cache[1].view(-1, *value.shape[1:])[slots] = value.to(kv_cache.dtype)

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
               scale: float, sliding_window: Optional[int], *, alibi_slopes: Optional[torch.Tensor] = None,
               logits_soft_cap: Optional[float] = None) -> torch.Tensor:
        if metadata.is_decode_only:
            return self._decode(query, kv_cache, metadata, scale, sliding_window, alibi_slopes, logits_soft_cap)
        out = torch.empty_like(query)
        starts = metadata.query_start_loc_cpu
        group = query.shape[1] // kv_cache.shape[3]
        # Masks depend only on their shape: built in the first layer, reused after (small ones only).
        masks = metadata.per_step.setdefault(("prefill", sliding_window, group), {})
        for index, seq_len in enumerate(metadata.seq_lens_cpu):
            start, end = starts[index], starts[index + 1]
            if start == end:
                continue
            keys, values = gather_kv(kv_cache, metadata.block_tables[index], seq_len)
            context = seq_len - (end - start)  # tokens cached before this chunk
            # Query tiles keep the score matrix at [tile x keys]: memory linear in the chunk.
            for tile_start in range(start, end, QUERY_TILE):
                tile_end = min(tile_start + QUERY_TILE, end)
                key_end = context + tile_end - start  # keys up to the tile's last query
                key_start = 0 if sliding_window is None else max(0, key_end - (tile_end - tile_start)
                                                                 - sliding_window + 1)
                shape = (tile_end - tile_start, key_end - key_start)
                mask = masks.get(shape)
                if mask is None:
                    mask = causal_mask(*shape, sliding_window, query.device).repeat(group, 1)
                    if mask.numel() <= _CACHED_MASK_ELEMENTS:
                        masks[shape] = mask
                out[tile_start:tile_end] = _attend_one(query[tile_start:tile_end], keys[key_start:key_end],
                                                       values[key_start:key_end], mask, scale,
                                                       alibi_slopes, logits_soft_cap)
        return out

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float, sliding_window: Optional[int], alibi_slopes: Optional[torch.Tensor] = None,
                soft_cap: Optional[float] = None) -> torch.Tensor:
        """One query per sequence: gather every table at once, padded to the longest, one SDPA call."""
        num_seqs = metadata.num_seqs
        block_size = kv_cache.shape[2]
        # The block index and the key mask are the same in every layer: built once per step.
        key = ("decode", block_size, sliding_window)
        if key not in metadata.per_step:
            num_blocks = -(-metadata.max_seq_len // block_size)
            blocks = metadata.block_tables[:num_seqs, :num_blocks].long()
            key_pos = torch.arange(num_blocks * block_size, device=query.device)[None, :]
            seq_lens = metadata.seq_lens[:num_seqs, None].long()
            visible = key_pos < seq_lens
            if sliding_window is not None:
                visible &= (seq_lens - 1) - key_pos < sliding_window
            metadata.per_step[key] = (blocks, visible[:, None, None, :])
        blocks, mask = metadata.per_step[key]
        keys, values = kv_cache[:, blocks].flatten(2, 3)  # one gather for both: [B, L, Hkv, D] each
        num_kv_heads = keys.shape[2]
        group = query.shape[1] // num_kv_heads
        # The group's query heads share one key mask, so they can stand in for the query length:
        # a plain 4-D SDPA call, which takes the fast kernels (the broadcasting 5-D form does not).
        q = query.unflatten(1, (num_kv_heads, group))  # [B, Hkv, g, D]
        k = keys.transpose(1, 2)  # [B, Hkv, L, D]
        v = values.transpose(1, 2)
        if alibi_slopes is None and soft_cap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:
            key_pos = torch.arange(k.shape[2], device=query.device)
            distance = (key_pos[None, :] - (metadata.seq_lens[:num_seqs, None].long() - 1))[:, None, None, :]
            slopes = None if alibi_slopes is None else alibi_slopes.view(num_kv_heads, group)
            out = _attend_modified(q, k, v, mask, scale, distance, slopes, soft_cap)
        return out.flatten(1, 2)
