"""Triton kernels for attention over the paged KV cache.

Cache layout (one tensor per layer):
``kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim]``, K in ``kv_cache[0]``, V in
``kv_cache[1]``. The token at slot ``s`` lives in block ``s // block_size`` at offset
``s % block_size``; a sequence's blocks are found only through its row of the block table.

Kernels:

* ``store_kv``: scatter new K/V rows into their slots.
* ``paged_decode_attention``: one query token per sequence, flash-decoding style. One program owns
  every query head of one KV head (GQA: each K/V tile is loaded once and multiplied with the whole
  ``[group, head_dim]`` query tile), and the context may be split over several programs whose
  partial softmax states are merged by a small reduction kernel.
* ``paged_prefill_attention``: causal attention for a flat variable-length batch whose queries are
  the last ``q_len`` tokens of each sequence (chunked prefill / prefix caching; decode rows
  welcome).

All host-side decisions (grid sizes, number of splits) depend only on tensor shapes, never on
tensor values, so the wrappers never synchronise with the device and can be captured in CUDA
graphs.

Numerics: scores are scaled by ``scale * log2(e)`` so that the online softmax can use ``exp2``;
the running max, sum and output accumulator are fp32. Optional score modifiers, applied to the
scaled scores in this order: soft-capping ``cap * tanh(s / cap)`` (Gemma-2) and an ALiBi bias
``slope[head] * (key_pos - query_pos)`` (BLOOM, Falcon-RW).
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the module must import on machines without triton
    triton = None

    class _NoTriton:
        constexpr = int

        @staticmethod
        def jit(fn):
            return fn

    tl = _NoTriton()
    _jit = _NoTriton.jit
else:
    _jit = triton.jit


def _jit_unspecialized(*names: str):
    """jit without value specialisation of integer arguments that change from step to step
    (batch size, block-table width): otherwise each new divisibility class recompiles the
    kernel in the middle of serving."""
    if triton is None:
        return _NoTriton.jit
    return triton.jit(do_not_specialize=list(names))

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Whether these kernels can run here: triton imports and there is a GPU or the interpreter."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Tile sizes. The interpreter runs a numpy op per tile operation, so small tiles there keep the
# tests quick and still exercise multi-tile loops; on the GPU the tiles are sized for an H100.
# ---------------------------------------------------------------------------------------------

# Keys per decode tile; a tile spans several paged blocks (block ids gathered per key).
DECODE_BLOCK_N = 16 if _interpreting() else 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
# Rows (query tokens x query heads of one KV head) and keys per prefill tile.
PREFILL_BLOCK_M = 16 if _interpreting() else 128
PREFILL_BLOCK_N = 16 if _interpreting() else 64
PREFILL_NUM_WARPS = 8
PREFILL_NUM_STAGES = 2

# Split-K heuristics for decode: aim for this many programs per SM, never give a split fewer
# than this many key tiles (else the reduction costs more than it saves), cap the split count.
_SPLIT_PROGRAMS_PER_SM = 4
_SPLIT_MIN_TILES = 4
_SPLIT_MAX = 64


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 8  # interpreter: any small number works


def _auto_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int,
                     block_n: int = 64) -> int:
    """How many programs share one (sequence, KV head) context in decode.

    Without splits the grid has ``num_seqs * num_kv_heads`` programs; when that already fills the
    GPU splitting only adds reduction work. Otherwise split until the GPU is busy, as far as the
    longest possible context allows (``max_context`` is an upper bound known from shapes only).
    """
    base = max(1, num_seqs * num_kv_heads)
    target = _SPLIT_PROGRAMS_PER_SM * num_sms
    if base >= target:
        return 1
    wanted = -(-target // base)
    by_context = max(1, max_context // (_SPLIT_MIN_TILES * block_n))
    return max(1, min(wanted, by_context, _SPLIT_MAX))


# ---------------------------------------------------------------------------------------------
# store_kv
# ---------------------------------------------------------------------------------------------


@_jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program writes all KV heads of one token.
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM)
    tok64 = tok.to(tl.int64)
    k = tl.load(key_ptr + tok64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + tok64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    dst = dst + h[:, None] * stride_ch + d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into their cache slots.

    ``slot_mapping[t] < 0`` marks a padding token whose K/V are dropped.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _check_cache(kv_cache, num_kv_heads, head_dim)
    assert value.shape == key.shape and slot_mapping.shape[0] >= num_tokens
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_H=_next_pow2(num_kv_heads), BLOCK_D=_next_pow2(head_dim),
        num_warps=1 if head_dim * num_kv_heads <= 512 else 4,
    )


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


@_jit
def _tanh(x):
    # tanh from exp2 (the interpreter has no libdevice). The exponent is clipped where the
    # result is already exactly 1.0 in fp32, so it never overflows.
    return 1.0 - 2.0 / (tl.exp2(tl.minimum(x * (2.0 * 1.4426950408889634), 64.0)) + 1.0)


@_jit
def _row_slopes(alibi_ptr, q_head, row_mask, HAS_ALIBI: tl.constexpr):
    """Each row's ALiBi slope in log2 units (zeros without ALiBi)."""
    if HAS_ALIBI:
        return tl.load(alibi_ptr + q_head, mask=row_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.zeros(q_head.shape, tl.float32)


@_jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos,
    k_base, v_base, bt_row, start, key_hi, window, qk_scale, slopes, soft_cap,
    stride_cb, stride_cs,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``start .. start + BLOCK_N`` (clipped to ``key_hi``) into the online softmax.

    With ``MASK`` off every key of the tile is known to be visible to every row, so the causal /
    window / length masks are skipped. Scores are in log2 units: ``soft_cap`` is the cap times
    log2(e) and ``slopes`` (one per row) the ALiBi slopes times log2(e).
    """
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    pos = start + n
    in_range = pos < key_hi
    # Loads are predicated only where needed: keys past key_hi exist only in MASK tiles, padded
    # head-dim lanes only when HEAD_DIM is not a power of two.
    if MASK:
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=in_range, other=0)
        kv_mask = in_range[:, None] & (d[None, :] < HEAD_DIM)
        kv_other = 0.0
    else:
        blk = tl.load(bt_row + pos // BLOCK_SIZE)
        if HEAD_DIM == BLOCK_D:
            kv_mask = None
            kv_other = None
        else:
            kv_mask = (n[:, None] >= 0) & (d[None, :] < HEAD_DIM)
            kv_other = 0.0
    # Physical slot of every key of the tile: block id from the table, then the offset inside it.
    slot_off = blk.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cs
    k = tl.load(k_base + slot_off[:, None] + d[None, :], mask=kv_mask, other=kv_other)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP:  # cap * tanh(score / cap), before the position bias as in Gemma-2
        s = soft_cap * _tanh(s / soft_cap)
    if HAS_ALIBI:  # slope * (key position - query position): 0 on the diagonal, negative before it
        s = s + slopes[:, None] * (pos[None, :] - q_pos[:, None]).to(tl.float32)
    if MASK:
        visible = (pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - pos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet still has m = -inf: shift it by 0 to avoid inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + slot_off[:, None] + d[None, :], mask=kv_mask, other=kv_other)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


def _check_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, \
        "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]"
    assert kv_cache.shape[3] == num_kv_heads and kv_cache.shape[4] == head_dim, \
        "cache and K/V head shapes differ"
    block_size = kv_cache.shape[2]
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert kv_cache.stride(-1) == 1


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 tensors (tests, reference runs) get exact fp32 products instead of TF32; for 16-bit
    # inputs "tf32" is what tl.dot picks by default and has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


@_jit_unspecialized("num_splits", "stride_bt")
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr, alibi_ptr,
    qk_scale, soft_cap, window, group, num_q_heads, num_splits,
    stride_qs, stride_qh, stride_os, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # The query is the token at seq_len - 1; with a window only the last `window` keys count.
    if HAS_WINDOW:
        key_lo = tl.maximum(seq_len - window, 0)
    else:
        key_lo = 0
    # Split the sequence's own tiles evenly (lengths differ per sequence; empty splits are fine).
    num_tiles = tl.cdiv(seq_len - key_lo, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    # Query tile: all heads of this KV head's group, padded to BLOCK_G >= 16 rows for tl.dot.
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < group
    d_mask = d < HEAD_DIM
    q_head = kv_head * group + g
    seq64 = seq.to(tl.int64)
    q = tl.load(q_ptr + seq64 * stride_qs + q_head[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = tl.zeros([BLOCK_G], tl.int32) + seq_len - 1
    slopes = _row_slopes(alibi_ptr, q_head, g_mask, HAS_ALIBI)

    bt_row = block_tables_ptr + seq64 * stride_bt
    k_base = k_cache_ptr + kv_head * stride_ch
    v_base = v_cache_ptr + kv_head * stride_ch
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # Every key in [key_lo, seq_len) is visible to the query, so only the sequence's ragged last
    # tile needs masking (for decode the causal mask pos <= seq_len - 1 is exactly the length mask).
    num_full = (seq_len - key_lo) // BLOCK_N
    for t in range(tile_lo, tl.minimum(tile_hi, num_full)):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, key_lo + t * BLOCK_N, seq_len,
            window, qk_scale, slopes, soft_cap, stride_cb, stride_cs,
            BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, False, HAS_WINDOW,
            HAS_ALIBI, HAS_SOFTCAP, DOT_PRECISION)
    for t in range(tl.maximum(tile_lo, num_full), tile_hi):  # at most one iteration
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, key_lo + t * BLOCK_N, seq_len,
            window, qk_scale, slopes, soft_cap, stride_cb, stride_cs,
            BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, True, HAS_WINDOW,
            HAS_ALIBI, HAS_SOFTCAP, DOT_PRECISION)

    if SPLIT:
        # Partial state (unnormalised acc, max, sum) per (seq, q head, split) for the reduction.
        row = (seq64 * num_q_heads + q_head) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # seq_len == 0 (padding row): write zeros
        o = acc / l_safe[:, None]
        tl.store(out_ptr + seq64 * stride_os + q_head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@_jit_unspecialized("num_splits")
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr,
    num_splits, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Merge the splits of one (seq, q head): rescale each partial state to the global max.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    k = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    k_mask = k < num_splits
    d_mask = d < HEAD_DIM
    row = (seq * num_heads + head) * num_splits + k
    m = tl.load(part_ml_ptr + row * 2, mask=k_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=k_mask, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
                  mask=k_mask[:, None] & d_mask[None, :], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (seq_len == 0)
    w = tl.exp2(m - m_max)  # empty splits have m = -inf and weigh 0
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    den = tl.where(den > 0, den, 1.0)
    o = (num / den).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, o, mask=d_mask)


def _check_attention_inputs(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                            block_tables: torch.Tensor, num_seqs: int) -> tuple[int, int]:
    """Shape, layout and dtype checks shared by the attention wrappers; (num_kv_heads, group)."""
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    _check_cache(kv_cache, num_kv_heads, head_dim)
    assert num_q_heads % num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads"
    assert out.shape == query.shape and query.stride(-1) == 1 and out.stride(-1) == 1
    assert block_tables.shape[0] >= num_seqs and block_tables.stride(-1) == 1
    assert query.dtype == kv_cache.dtype, "query and cache dtypes must match"
    return num_kv_heads, num_q_heads // num_kv_heads


def _score_mod_args(query: torch.Tensor, alibi_slopes: torch.Tensor | None,
                    logits_soft_cap: float | None) -> tuple[torch.Tensor, float, bool, bool]:
    """Kernel arguments for the optional ALiBi slopes (fp32, one per query head) and score
    soft-cap: (slopes pointer or a stand-in, cap in log2 units, HAS_ALIBI, HAS_SOFTCAP)."""
    has_alibi = alibi_slopes is not None
    if has_alibi:
        assert alibi_slopes.shape == (query.shape[1],), "alibi_slopes needs one slope per query head"
        assert alibi_slopes.dtype == torch.float32 and alibi_slopes.is_contiguous()
        assert alibi_slopes.device == query.device
    has_softcap = logits_soft_cap is not None and logits_soft_cap > 0
    cap = float(logits_soft_cap) * _LOG2E if has_softcap else 0.0
    return (alibi_slopes if has_alibi else query), cap, has_alibi, has_softcap


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None,
                           num_splits: int | None = None,
                           alibi_slopes: torch.Tensor | None = None,
                           logits_soft_cap: float | None = None) -> None:
    """Attention of one new token per sequence over its whole paged context.

    ``query``/``out``: ``[num_seqs, num_q_heads, head_dim]``; the query token is at position
    ``seq_lens[b] - 1`` and its K/V are already in the cache. ``block_tables``:
    ``[num_seqs, max_blocks]`` int32; ``seq_lens``: ``[num_seqs]`` int32 (a 0 gives a zero
    output row, for padded batches).
    ``num_splits`` forces the split-K factor; by default it is picked from the shapes.
    ``logits_soft_cap`` replaces each scaled score ``s`` by ``cap * tanh(s / cap)``;
    ``alibi_slopes`` (``[num_q_heads]`` fp32) then adds ``slope * (key_pos - query_pos)``.
    """
    num_seqs, num_q_heads, head_dim = query.shape
    if num_seqs == 0:
        return
    num_kv_heads, group = _check_attention_inputs(out, query, kv_cache, block_tables, num_seqs)
    block_size = kv_cache.shape[2]
    block_d = max(16, _next_pow2(head_dim))
    block_n = DECODE_BLOCK_N if block_d <= 128 else DECODE_BLOCK_N // 2
    has_window = sliding_window is not None and sliding_window > 0
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        if has_window:
            max_context = min(max_context, sliding_window)
        num_splits = _auto_num_splits(num_seqs, num_kv_heads, max_context,
                                      _device_sms(query.device), block_n)
    num_splits = max(1, int(num_splits))
    split = num_splits > 1

    if split:
        part_acc = torch.empty(num_seqs, num_q_heads, num_splits, head_dim,
                               dtype=torch.float32, device=query.device)
        part_ml = torch.empty(num_seqs, num_q_heads, num_splits, 2,
                              dtype=torch.float32, device=query.device)
    else:  # single pass writes the normalised output directly
        part_acc = part_ml = out
    slopes, cap, has_alibi, has_softcap = _score_mod_args(query, alibi_slopes, logits_soft_cap)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens,
        out, part_acc, part_ml, slopes,
        scale * _LOG2E, cap, sliding_window if has_window else 0, group, num_q_heads, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        BLOCK_G=max(16, _next_pow2(group)), BLOCK_D=block_d,
        HAS_WINDOW=has_window, HAS_ALIBI=has_alibi, HAS_SOFTCAP=has_softcap, SPLIT=split,
        DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES,
    )
    if split:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            out, part_acc, part_ml, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=_next_pow2(num_splits), BLOCK_D=_next_pow2(head_dim),
            num_warps=4 if num_splits * head_dim >= 2048 else 1,
        )


# ---------------------------------------------------------------------------------------------
# Prefill (varlen, causal, prefix already cached)
# ---------------------------------------------------------------------------------------------


@_jit_unspecialized("num_seqs", "stride_bt")
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    alibi_ptr, qk_scale, soft_cap, window, group, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Which sequence owns this program? Sequence b gets the program ids starting at
    # qsl[b] // BLOCK_Q + b: that leaves room for its cdiv(q_len, BLOCK_Q) tiles and needs no
    # host-side scan (the grid has num_tokens // BLOCK_Q + num_seqs programs). Binary search for
    # the last sequence whose first id is <= tile.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:  # spare program (or q_len == 0)
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens cached before this chunk

    # Rows pack BLOCK_Q query tokens x GROUP_PAD query heads of this KV head, so each K/V tile
    # loaded serves the whole GQA group.
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    tok = q_tile * BLOCK_Q + r // GROUP_PAD
    g = r % GROUP_PAD
    row_mask = (tok < q_len) & (g < group)
    io_mask = row_mask[:, None] & (d[None, :] < HEAD_DIM)
    q_row = (q_start + tok).to(tl.int64)
    q_head = kv_head * group + g
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + q_head[:, None] * stride_qh + d[None, :],
                mask=io_mask, other=0.0)
    q_pos = ctx_len + tok
    slopes = _row_slopes(alibi_ptr, q_head, row_mask, HAS_ALIBI)

    # Keys [key_lo, key_hi) are visible to some row of the tile, [full_lo, full_hi) to all rows.
    first_pos = ctx_len + q_tile * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    key_hi = last_pos + 1
    full_hi = first_pos + 1
    if HAS_WINDOW:
        key_lo = tl.maximum(first_pos - window + 1, 0)
        full_lo = tl.maximum(last_pos - window + 1, 0)
    else:
        key_lo = tl.full([], 0, tl.int32)
        full_lo = tl.full([], 0, tl.int32)
    # Key tiles start at key_lo; tiles [t_full_lo, t_full_hi) need no masking.
    num_tiles = tl.cdiv(key_hi - key_lo, BLOCK_N)
    t_full_lo = tl.cdiv(full_lo - key_lo, BLOCK_N)
    t_full_hi = tl.maximum((full_hi - key_lo) // BLOCK_N, t_full_lo)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_ch
    v_base = v_cache_ptr + kv_head * stride_ch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_WINDOW:  # lower window edge: partially visible tiles
        for t in range(tl.minimum(t_full_lo, num_tiles)):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, key_lo + t * BLOCK_N, key_hi,
                window, qk_scale, slopes, soft_cap, stride_cb, stride_cs,
                BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, True, HAS_WINDOW,
                HAS_ALIBI, HAS_SOFTCAP, DOT_PRECISION)
    for t in range(t_full_lo, t_full_hi):  # the bulk: fully visible tiles
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, key_lo + t * BLOCK_N, key_hi,
            window, qk_scale, slopes, soft_cap, stride_cb, stride_cs,
            BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, False, HAS_WINDOW,
            HAS_ALIBI, HAS_SOFTCAP, DOT_PRECISION)
    for t in range(t_full_hi, num_tiles):  # causal diagonal
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, key_lo + t * BLOCK_N, key_hi,
            window, qk_scale, slopes, soft_cap, stride_cb, stride_cs,
            BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, True, HAS_WINDOW,
            HAS_ALIBI, HAS_SOFTCAP, DOT_PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows can have l == 0
    o = acc / l_safe[:, None]
    tl.store(out_ptr + q_row[:, None] * stride_ot + q_head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int, scale: float,
                            sliding_window: int | None = None,
                            alibi_slopes: torch.Tensor | None = None,
                            logits_soft_cap: float | None = None) -> None:
    """Causal attention for a flat varlen batch whose K/V (prefix and new tokens) are cached.

    ``query``/``out``: ``[num_tokens, num_q_heads, head_dim]``; sequence ``b`` owns rows
    ``query_start_loc[b]:query_start_loc[b + 1]``, the last ``q_len`` tokens of a sequence of
    ``seq_lens[b]`` tokens. ``q_len`` may be 0 (nothing written) or 1 (a decode row).
    ``max_query_len`` is accepted for API compatibility; the grid is sized from shapes alone.
    ``alibi_slopes`` and ``logits_soft_cap`` modify the scores as in ``paged_decode_attention``.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs <= 0 or max_query_len == 0:
        return
    num_kv_heads, group = _check_attention_inputs(out, query, kv_cache, block_tables, num_seqs)
    group_pad = _next_pow2(group)
    block_d = max(16, _next_pow2(head_dim))
    block_m = max(PREFILL_BLOCK_M, group_pad, 16)
    block_n = PREFILL_BLOCK_N
    num_warps, num_stages = PREFILL_NUM_WARPS, PREFILL_NUM_STAGES
    if block_d > 128:  # keep the fp32 accumulator and K/V tiles within registers / shared memory
        block_m, block_n = max(64, group_pad, 16), 32
    elif block_m * block_d <= 64 * 128:
        num_warps = 4
    block_q = block_m // group_pad
    has_window = sliding_window is not None and sliding_window > 0
    slopes, cap, has_alibi, has_softcap = _score_mod_args(query, alibi_slopes, logits_soft_cap)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        slopes, scale * _LOG2E, cap, sliding_window if has_window else 0, group, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_Q=block_q, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_WINDOW=has_window, HAS_ALIBI=has_alibi, HAS_SOFTCAP=has_softcap,
        DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
