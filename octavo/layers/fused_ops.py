"""Fused Triton kernels for the elementwise ops of Llama-family decoders.

Kernels (each reproduces the PyTorch reference layer's rounding steps, see the wrappers):

* ``rms_norm`` / ``fused_add_rms_norm``: ``octavo.layers.norm.RMSNorm`` without and with the
  residual add, one program per row.
* ``rotary`` / ``qk_norm_rope``: ``octavo.layers.rotary.RotaryEmbedding`` (rotate-half form,
  partial rotary), optionally preceded by Qwen3's per-head RMSNorm of q and k, one program per
  token covering every head of q and then of k. q and k may be strided views of the fused qkv
  projection output.
* ``silu_and_mul``: ``octavo.layers.activation.SiluAndMul``.

The layers call these on CUDA tensors when triton imports, unless the environment variable
``OCTAVO_DISABLE_FUSED_OPS=1`` was set when this module was first imported (it is imported on
the first forward pass over a CUDA tensor); ``set_enabled`` overrides it at run time, e.g. for
tests that need the reference path. CPU tensors always take the PyTorch path.

As in ``octavo.layers.attention.triton_ops``, grid sizes depend only on shapes, so the wrappers
never synchronise with the device and can be captured in CUDA graphs. The number of tokens
enters only through the grid: no kernel takes an integer argument that changes from step to
step, so none can trigger a recompilation (row strides stay specialised, which keeps loads
vectorised).
"""

from __future__ import annotations

import os

import torch

from octavo.layers.attention.triton_ops import _jit, _next_pow2, tl, triton

_DISABLE_ENV = "OCTAVO_DISABLE_FUSED_OPS"


def _env_disabled() -> bool:
    return os.environ.get(_DISABLE_ENV, "0").lower() in ("1", "true", "on", "yes")


_enabled: bool = not _env_disabled()


def enabled() -> bool:
    """Whether the layers use these kernels for CUDA tensors."""
    return _enabled and triton is not None


def set_enabled(flag: bool | None) -> None:
    """Force the fused kernels on (``True``) or off (``False``); ``None`` re-reads the
    environment."""
    global _enabled
    _enabled = (not _env_disabled()) if flag is None else bool(flag)


def _num_warps(block: int) -> int:
    # Enough threads that each holds a few dozen fp32 values of a row at most.
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 256:
        return 4
    return 1


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------


@_jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    eps,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    in_dtype = x_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the input dtype before the norm sees it, as torch's add does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(in_dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    # Normalised value rounded to the input dtype, then the weight product rounded once more.
    normed = (xf * rstd).to(in_dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, hidden]`` with a unit last stride (a view whenever possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms_norm(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor,
                     out: torch.Tensor, res_out: torch.Tensor | None, eps: float) -> None:
    rows, hidden = x2.shape
    if rows == 0:
        return
    assert weight.shape == (hidden,) and weight.is_contiguous()
    block = _next_pow2(hidden)
    has_res = r2 is not None
    _rms_norm_kernel[(rows,)](
        x2, r2 if has_res else x2, weight, out, res_out if has_res else out,
        x2.stride(0), r2.stride(0) if has_res else 0, out.stride(0),
        res_out.stride(0) if has_res else 0,
        eps,
        N=hidden, BLOCK=block, HAS_RESIDUAL=has_res, num_warps=_num_warps(block),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` over the last dim of ``x``; a new tensor of dtype ``promote(weight, x)``.

    fp32 variance and scaling, rounded to ``x.dtype``, then multiplied by ``weight`` and rounded
    again, exactly the reference's steps.
    """
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch_rms_norm(x2, None, weight, out, None, eps)
    return out.view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (rounded to the input dtype), then ``(rms_norm(s), s)`` as new
    tensors; the inputs are left untouched."""
    assert x.shape == residual.shape and x.dtype == residual.dtype, (x.shape, residual.shape)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(x2, r2, weight, out, res_out, eps)
    return out.view(x.shape), res_out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Rotary embedding, optionally after per-head RMSNorm (Qwen3's q_norm / k_norm)
# ---------------------------------------------------------------------------------------------


@_jit
def _rope_heads(
    src_ptr, dst_ptr, w_ptr, tok,
    stride_st, stride_sh, stride_dt, stride_dh,
    cos, sin, eps,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr,
):
    # Every head of one token as a [BLOCK_H, BLOCK_D] tile. The rotate-half partner of dim d is
    # loaded as a second tile (d + half for the first half, d - half for the second) so that the
    # rotation needs no register shuffles.
    HALF: tl.constexpr = ROT_DIM // 2
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    is_rot = d < ROT_DIM
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    src = src_ptr + tok * stride_st + h * stride_sh
    x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=mask & is_rot, other=0.0).to(tl.float32)
    if NORM:
        in_dtype = src_ptr.dtype.element_ty
        out_dtype = dst_ptr.dtype.element_ty
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        w = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=is_rot, other=0.0).to(tl.float32)
        # The reference norm's roundings (input dtype, then weight product in the output
        # dtype); the rotation then starts from those rounded values.
        x = ((x * rstd).to(in_dtype).to(tl.float32) * w).to(out_dtype).to(tl.float32)
        xp = ((xp * rstd).to(in_dtype).to(tl.float32) * wp).to(out_dtype).to(tl.float32)
    rotated = x * cos + tl.where(d < HALF, -xp, xp) * sin
    out = tl.where(is_rot, rotated, x)
    dst = dst_ptr + tok * stride_dt + h * stride_dh + d
    tl.store(dst, out.to(dst_ptr.dtype.element_ty), mask=mask)


@_jit
def _rope_kernel(
    pos_ptr, cache_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cache, eps,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    NORM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    HALF: tl.constexpr = ROT_DIM // 2
    d = tl.arange(0, BLOCK_D)[None, :]
    is_rot = d < ROT_DIM
    j = tl.where(d < HALF, d, d - HALF)
    # The cache row is [cos (half) | sin (half)]; both halves of a head use the same angle.
    row = cache_ptr + pos * stride_cache
    cos = tl.load(row + j, mask=is_rot, other=1.0).to(tl.float32)
    sin = tl.load(row + HALF + j, mask=is_rot, other=0.0).to(tl.float32)
    _rope_heads(q_ptr, q_out_ptr, qw_ptr, tok, stride_qt, stride_qh, stride_qot, stride_qoh,
                cos, sin, eps, NUM_Q_HEADS, HEAD_DIM, ROT_DIM, BLOCK_HQ, BLOCK_D, NORM)
    _rope_heads(k_ptr, k_out_ptr, kw_ptr, tok, stride_kt, stride_kh, stride_kot, stride_koh,
                cos, sin, eps, NUM_K_HEADS, HEAD_DIM, ROT_DIM, BLOCK_HK, BLOCK_D, NORM)


def _launch_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, rotary_dim: int,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q/k need a unit stride along head_dim"
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim
    assert cos_sin_cache.shape[-1] == rotary_dim and cos_sin_cache.stride(-1) == 1
    assert positions.dim() == 1 and positions.shape[0] >= num_tokens and positions.is_contiguous()
    norm = q_weight is not None
    if norm:
        assert k_weight is not None and q_weight.shape == (head_dim,) == k_weight.shape
        assert q_weight.is_contiguous() and k_weight.is_contiguous() and q.dtype == k.dtype
        q_dtype = torch.promote_types(q_weight.dtype, q.dtype)
        k_dtype = torch.promote_types(k_weight.dtype, k.dtype)
    else:
        q_dtype, k_dtype = q.dtype, k.dtype
    q_out = torch.empty(q.shape, dtype=q_dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k_dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_hq, block_hk = _next_pow2(num_q_heads), _next_pow2(num_k_heads)
    block_d = _next_pow2(head_dim)
    _rope_kernel[(num_tokens,)](
        positions, cos_sin_cache, q, k, q_out, k_out,
        q_weight if norm else q, k_weight if norm else k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0), eps,
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HEAD_DIM=head_dim, ROT_DIM=rotary_dim,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, NORM=norm,
        num_warps=_num_warps(block_hq * block_d),
    )
    return q_out, k_out


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
           rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q ``[tokens, q_heads, head_dim]`` and k ``[tokens,
    kv_heads, head_dim]`` at ``positions``; dims past ``rotary_dim`` pass through.

    ``cos_sin_cache[max_pos, rotary_dim]`` holds ``[cos | sin]`` per position. q and k may have
    any token/head strides (e.g. views of the fused qkv output) as long as head_dim is unit
    stride; the results are new contiguous tensors in q's and k's dtypes, rotated in fp32.
    """
    return _launch_rope(positions, q, k, cos_sin_cache, rotary_dim, None, None, 0.0)


def qk_norm_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
                 rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary(positions, rms_norm(q, q_weight), rms_norm(k, k_weight))`` per head in one pass.

    The intermediate normalised values are rounded to the normed dtype exactly as the two
    reference layers' chain does, so only the fp32 arithmetic order differs.
    """
    return _launch_rope(positions, q, k, cos_sin_cache, rotary_dim, q_weight, k_weight, eps)


# ---------------------------------------------------------------------------------------------
# SiLU and multiply
# ---------------------------------------------------------------------------------------------

# Columns per program; wide MLPs (I = 14336) split a row over several programs.
_SILU_MAX_BLOCK = 1024


@_jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_o,
    INTER: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    src = x_ptr + row * stride_x + cols
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + INTER, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` of shape ``[..., 2 * I]`` -> ``[..., I]``.

    Computed in fp32 and rounded to ``x.dtype`` once. The reference ``F.silu(gate) * up`` rounds
    twice in half precision (the silu result, then the product), so in bf16/fp16 the two may
    differ by one rounding of the output dtype; in fp32 they agree to a few ulp.
    """
    assert x.shape[-1] % 2 == 0
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        block = min(_next_pow2(inter), _SILU_MAX_BLOCK)
        _silu_and_mul_kernel[(x2.shape[0], -(-inter // block))](
            x2, out, x2.stride(0), out.stride(0),
            INTER=inter, BLOCK=block, num_warps=_num_warps(block),
        )
    return out.view(*x.shape[:-1], inter)
