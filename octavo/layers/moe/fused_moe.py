"""Fused Triton kernels for a sparse MoE feed-forward: all experts in one launch per matmul.

The (token, expert) pairs of a batch are sorted by expert and each expert's run is padded to a
multiple of ``BLOCK_M`` rows, so that every row block of the sorted order belongs to one expert.
Then two grouped GEMMs run over the sorted rows, each covering every expert in one launch:

1. ``align``: one program counts the pairs per expert and writes the sorted pair ids
   (``token * top_k + j``; padding rows hold ``num_pairs``) and each row block's expert
   (``-1`` for blocks past the end).
2. ``gate_up``: ``silu(x @ W_gate^T) * (x @ W_up^T)`` for the rows of a block, the tokens
   gathered by pair id, written to an intermediate buffer in sorted order.
3. ``down``: the intermediate rows times ``W_down^T``, scaled by the routing weight, written to
   the pair's own row; the ``top_k`` rows of a token are then summed.

Every size the host sees comes from tensor shapes: the sorted array is padded to its upper bound
for this many pairs (``num_pairs + min(num_experts, num_pairs) * (BLOCK_M - 1)`` rows), and
blocks past the real end exit at once after reading their expert id. Nothing waits for the
device, so the whole layer can be captured in a CUDA graph.

Expert weights are ``[E, N, K]`` stacks of ``nn.Linear`` weights (rows are output features),
read through their strides; a quantized format would add a per-expert scale pointer here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from octavo.layers.attention.triton_ops import (
    _dot_precision,
    _interpreting,
    _jit,
    _jit_unspecialized,
    _next_pow2,
    tl,
)


@dataclass(frozen=True)
class GemmTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeTiles:
    """Row block shared by the sorting and both GEMMs, and each GEMM's own tiles."""

    block_m: int
    gate_up: GemmTiles
    down: GemmTiles
    group_m: int = 8  # row blocks that walk the columns together, so their weight tiles meet in L2


def moe_tiles(num_pairs: int, num_experts: int, dtype: torch.dtype) -> MoeTiles:
    """Tiles for a batch of ``num_pairs`` (token, expert) pairs, from shapes only.

    The row block is about twice the mean rows per expert, so that most experts fit one block
    and each weight tile is streamed once (decode is bound by reading the expert weights);
    prefill gets the large tiles of a compute-bound GEMM. The gate/up kernel keeps two
    accumulators, so its column block counts double. Sizes follow public tunings for Mixtral on
    H100/H200. Four-byte dtypes (fp32 tests) take half the depth, to stay within shared memory.
    The interpreter gets tiny tiles so CPU tests stay quick.
    """
    if _interpreting():
        return MoeTiles(16, GemmTiles(16, 16, 1, 1), GemmTiles(16, 32, 1, 1), group_m=2)
    rows_per_expert = num_pairs / num_experts
    if rows_per_expert <= 8:
        tiles = MoeTiles(16, GemmTiles(64, 128, 4, 4), GemmTiles(64, 128, 4, 4))
    elif rows_per_expert <= 16:
        tiles = MoeTiles(32, GemmTiles(64, 128, 4, 3), GemmTiles(128, 128, 4, 3))
    elif rows_per_expert <= 32:
        tiles = MoeTiles(64, GemmTiles(64, 128, 8, 4), GemmTiles(128, 128, 8, 4))
    else:
        tiles = MoeTiles(128, GemmTiles(128, 64, 8, 4), GemmTiles(256, 64, 8, 4))
    if dtype.itemsize == 4:
        def narrow(gemm: GemmTiles) -> GemmTiles:
            return GemmTiles(min(gemm.block_n, 64), gemm.block_k // 2, gemm.num_warps, gemm.num_stages)

        tiles = MoeTiles(tiles.block_m, narrow(tiles.gate_up), narrow(tiles.down), tiles.group_m)
    return tiles


def _align_chunk(block_e: int) -> int:
    """Pairs the sorting program takes per step: a ``[chunk, experts]`` tile of about 16K values."""
    if _interpreting():
        return 16
    return max(16, min(1024, 16384 // block_e))


# ---------------------------------------------------------------------------------------------
# Sorting the pairs by expert
# ---------------------------------------------------------------------------------------------


@_jit_unspecialized("num_pairs", "num_blocks")
def _align_kernel(
    topk_ids_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, num_blocks,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    # Pass 1: pairs per expert, then each expert's padded run [start, end) in the sorted order.
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for first in range(0, num_pairs, CHUNK):
        pairs = first + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    # Pass 2: each pair goes to its expert's start + the pairs of that expert before it, so the
    # order within an expert is the pair order (deterministic).
    placed = tl.zeros([BLOCK_E], dtype=tl.int32)
    for first in range(0, num_pairs, CHUNK):
        pairs = first + tl.arange(0, CHUNK)
        in_range = pairs < num_pairs
        ids = tl.load(topk_ids_ptr + pairs, mask=in_range, other=-1)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - hit
        slot = tl.sum(hit * (starts + placed)[None, :] + hit * rank, axis=1)
        tl.store(sorted_pairs_ptr + slot, pairs, mask=in_range)
        placed += tl.sum(hit, axis=0)
    # Each row block's expert: the first whose run ends after the block's first row.
    for first in range(0, num_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        first_row = blocks * BLOCK_M
        expert = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(block_experts_ptr + blocks, expert, mask=blocks < num_blocks)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ids sorted by expert, each expert's run padded to ``block_m`` rows, and each row
    block's expert.

    Returns ``sorted_pairs [num_blocks * block_m]`` (int32; padding rows hold ``num_pairs``) and
    ``block_experts [num_blocks]`` (int32; ``-1`` for blocks past the last expert's run), where
    ``num_blocks`` is the upper bound for this many pairs, so the shapes depend on
    ``topk_ids.shape`` alone.
    """
    num_pairs = topk_ids.numel()
    max_rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    num_blocks = -(-max_rows // block_m)
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=topk_ids.device)
    block_experts = torch.empty(num_blocks, dtype=torch.int32, device=topk_ids.device)
    if num_pairs:
        block_e = _next_pow2(num_experts)
        _align_kernel[(1,)](
            topk_ids.reshape(-1), sorted_pairs, block_experts, num_pairs, num_blocks,
            BLOCK_E=block_e, BLOCK_M=block_m, CHUNK=_align_chunk(block_e), BLOCK_B=16 if _interpreting() else 64,
            num_warps=8,
        )
    return sorted_pairs, block_experts


# ---------------------------------------------------------------------------------------------
# The two grouped GEMMs
# ---------------------------------------------------------------------------------------------


@_jit
def _block_coords(pid, num_blocks, NUM_N_BLOCKS: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid``: groups of ``GROUP_M`` row blocks sweep the
    columns together, so the row blocks of one expert read each weight tile at about the same time."""
    per_group = GROUP_M * NUM_N_BLOCKS
    group_first = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_blocks - group_first, GROUP_M)
    block_m = group_first + (pid % per_group) % group_size
    block_n = (pid % per_group) // group_size
    return block_m, block_n


@_jit_unspecialized("num_pairs", "num_blocks")
def _gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, num_blocks,
    stride_xt, stride_we, stride_wn, stride_wk, stride_or,
    N: tl.constexpr, K: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # N: intermediate size (the gate rows are 0..N-1 of the expert's weight, the up rows N..2N-1).
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks, (N + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    tokens = (pairs // TOP_K).to(tl.int64)
    valid = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :]
    gate_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    up_ptrs = gate_ptrs + N * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_left = K - step * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & (ks[None, :] < k_left), other=0.0)
        w_mask = (ks[:, None] < k_left) & (cols[None, :] < N)
        gate = tl.dot(a, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate, input_precision=DOT_PRECISION)
        up = tl.dot(a, tl.load(up_ptrs, mask=w_mask, other=0.0), up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk
    act = gate / (1.0 + tl.exp(-gate)) * up
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_or + cols[None, :]
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=cols[None, :] < N)


@_jit_unspecialized("num_pairs", "num_blocks")
def _down_kernel(
    h_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr, weights_ptr,
    num_pairs, num_blocks,
    stride_hr, stride_we, stride_wn, stride_wk, stride_op,
    N: tl.constexpr, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # N: hidden size, K: intermediate size; rows of h are in sorted order, outputs go to pair rows.
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks, (N + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + ks[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_left = K - step * BLOCK_K
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=(ks[:, None] < k_left) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_op + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


def fused_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The same result as ``reference.fused_experts_reference``, with every expert in one launch
    per matmul (fp32 accumulation, the SiLU product rounded once to the hidden dtype).

    ``hidden [tokens, H]``, ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]`` in one dtype,
    unit stride along their last dim; ``topk_weights`` / ``topk_ids`` ``[tokens, top_k]``.
    """
    num_tokens, hidden_size = hidden.shape
    num_experts, double_inter, _ = gate_up_proj.shape
    inter = double_inter // 2
    top_k = topk_ids.shape[1]
    assert gate_up_proj.shape == (num_experts, 2 * inter, hidden_size), gate_up_proj.shape
    assert down_proj.shape == (num_experts, hidden_size, inter), down_proj.shape
    assert hidden.dtype == gate_up_proj.dtype == down_proj.dtype, (hidden.dtype, gate_up_proj.dtype)
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    assert gate_up_proj.stride(-1) == 1 and down_proj.stride(-1) == 1
    if num_tokens == 0:
        return torch.empty_like(hidden)
    num_pairs = num_tokens * top_k
    tiles = moe_tiles(num_pairs, num_experts, hidden.dtype)
    sorted_pairs, block_experts = align_pairs(topk_ids.contiguous(), num_experts, tiles.block_m)
    num_blocks = block_experts.shape[0]
    precision = _dot_precision(hidden.dtype)

    intermediate = torch.empty(num_blocks * tiles.block_m, inter, dtype=hidden.dtype, device=hidden.device)
    gate_up = tiles.gate_up
    _gate_up_kernel[(num_blocks * -(-inter // gate_up.block_n),)](
        hidden, gate_up_proj, intermediate, sorted_pairs, block_experts,
        num_pairs, num_blocks,
        hidden.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2),
        intermediate.stride(0),
        N=inter, K=hidden_size, TOP_K=top_k,
        BLOCK_M=tiles.block_m, BLOCK_N=gate_up.block_n, BLOCK_K=gate_up.block_k, GROUP_M=tiles.group_m,
        DOT_PRECISION=precision, num_warps=gate_up.num_warps, num_stages=gate_up.num_stages,
    )

    per_pair = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    down = tiles.down
    _down_kernel[(num_blocks * -(-hidden_size // down.block_n),)](
        intermediate, down_proj, per_pair, sorted_pairs, block_experts, topk_weights.contiguous(),
        num_pairs, num_blocks,
        intermediate.stride(0), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
        per_pair.stride(0),
        N=hidden_size, K=inter,
        BLOCK_M=tiles.block_m, BLOCK_N=down.block_n, BLOCK_K=down.block_k, GROUP_M=tiles.group_m,
        DOT_PRECISION=precision, num_warps=down.num_warps, num_stages=down.num_stages,
    )
    if top_k == 1:
        return per_pair
    return per_pair.view(num_tokens, top_k, hidden_size).sum(dim=1)
