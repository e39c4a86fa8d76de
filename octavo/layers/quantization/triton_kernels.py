"""Triton kernels for quantized linear layers: the W4A16/W8A16 GEMM, its dequantization, and
per-token activation quantization for FP8 and INT8 W8A8.

The GEMM reads the packed weight once per output tile and unpacks it in registers, so a decode
step moves a quarter (4-bit) of the bytes a 16-bit weight would. Its tile shape, or unpacking the
whole weight for one cuBLAS matmul instead, is picked per (token count, rounded as
``_tuning_tokens`` says; N; K) by timing the candidates, for every count when the layer loads
(``pretune``), else on first use (never inside a CUDA-graph capture).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Union

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from octavo.layers.quantization.fp8 import FP8_MAX

logger = logging.getLogger(__name__)


@triton.jit
def _unpack_tile(packed, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K // pack, BLOCK_N] int32 words -> [BLOCK_K, BLOCK_N] unsigned values."""
    PACK: tl.constexpr = 32 // BITS
    words = tl.reshape(tl.broadcast_to(packed[:, None, :], (BLOCK_K // PACK, PACK, BLOCK_N)), (BLOCK_K, BLOCK_N))
    return _shift_out(words, BITS, BLOCK_K)


@triton.jit
def _shift_out(words, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row k of a [BLOCK_K, BLOCK_N] tile of words (each row holding its own word) -> value k % pack."""
    PACK: tl.constexpr = 32 // BITS
    shifts = (tl.arange(0, BLOCK_K) % PACK) * BITS
    return (words >> shifts[:, None]) & ((1 << BITS) - 1)


@triton.jit
def _exact_float(ints, MAGIC: tl.constexpr, FLOAT_T: tl.constexpr):
    """Non-negative ints that fit the mantissa -> (the power of two MAGIC encodes) + ints, in FLOAT_T:
    the ints are OR-ed into its mantissa bits, so no int-to-float conversion runs (that unit's low
    throughput bounds an unpacking kernel)."""
    if FLOAT_T.primitive_bitwidth == 16:  # one return: the compiler follows code past a branch's return
        floats = (ints | MAGIC).to(tl.int16).to(FLOAT_T, bitcast=True)
    else:
        floats = (ints | MAGIC).to(FLOAT_T, bitcast=True)
    return floats


@triton.jit
def _centred_tile(qweight_ptr, zeros_ptr, k0, group, offs_n, n_mask, stride_qk, stride_zg,
                  BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  GATHER_WORDS: tl.constexpr, TRANSPOSED: tl.constexpr, MAGIC: tl.constexpr,
                  FLOAT_T: tl.constexpr):
    """Weight rows k0 .. k0 + BLOCK_K of columns ``offs_n``, unpacked and less their zero point:
    small integers, exact in FLOAT_T. [BLOCK_K, BLOCK_N], or [BLOCK_N, BLOCK_K] when TRANSPOSED
    (built in that order, not transposed after). MAGIC: see _exact_float (0: convert instead)."""
    PACK: tl.constexpr = 32 // BITS
    offs_k = tl.arange(0, BLOCK_K)
    offs_words = tl.arange(0, BLOCK_K // PACK)
    if TRANSPOSED:
        shifts = (offs_k % PACK) * BITS
        if GATHER_WORDS:
            words = tl.load(qweight_ptr + ((k0 + offs_k) // PACK)[None, :] * stride_qk + offs_n[:, None],
                            mask=n_mask[:, None], other=0)
        else:
            packed = tl.load(qweight_ptr + (k0 // PACK + offs_words)[None, :] * stride_qk + offs_n[:, None],
                             mask=n_mask[:, None], other=0)
            words = tl.reshape(tl.broadcast_to(packed[:, :, None], (BLOCK_N, BLOCK_K // PACK, PACK)),
                               (BLOCK_N, BLOCK_K))
        values = (words >> shifts[None, :]) & ((1 << BITS) - 1)
    else:
        if GATHER_WORDS:
            words = tl.load(qweight_ptr + ((k0 + offs_k) // PACK)[:, None] * stride_qk + offs_n[None, :],
                            mask=n_mask[None, :], other=0)
            values = _shift_out(words, BITS, BLOCK_K)
        else:
            packed = tl.load(qweight_ptr + (k0 // PACK + offs_words)[:, None] * stride_qk + offs_n[None, :],
                             mask=n_mask[None, :], other=0)
            values = _unpack_tile(packed, BITS, BLOCK_K, BLOCK_N)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=n_mask, other=0).to(tl.int32)
    else:
        zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.int32)
    if MAGIC != 0:
        # both sides carry the same power of two, so the difference is exact
        if TRANSPOSED:
            centred = _exact_float(values, MAGIC, FLOAT_T) - _exact_float(zero, MAGIC, FLOAT_T)[:, None]
        else:
            centred = _exact_float(values, MAGIC, FLOAT_T) - _exact_float(zero, MAGIC, FLOAT_T)[None, :]
    else:
        if TRANSPOSED:
            centred = (values - zero[:, None]).to(FLOAT_T)
        else:
            centred = (values - zero[None, :]).to(FLOAT_T)
    return centred


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every token count
def _wna16_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr,
    M, N, K, stride_xm, stride_qk, stride_sg, stride_zg, stride_split, stride_om,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GATHER_WORDS: tl.constexpr, SWAP_AB: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr, MAGIC: tl.constexpr,
):
    """out[split] = x @ dequant(W) over this split's K blocks; a block never spans two groups.

    ``GATHER_WORDS``: every row of the tile loads its own copy of its word (cached loads) instead
    of loading each word once and replicating it in registers; which is faster depends on the GPU.
    ``SWAP_AB``: compute out^T = W^T x^T, so the unpacked weight, built in registers, is the
    matmul's first operand (which the tensor cores can take from registers) and a few tokens make
    its narrow second dimension. ``SCALE_AFTER_DOT``: a block's scales are one per column (a block
    stays in one group), so they can multiply the block's [M, N] product instead of its [K, N]
    weight: fewer multiplies where BLOCK_M < BLOCK_K. ``MAGIC``: how unpacked values become floats
    (_exact_float; 0: by conversion)."""
    FLOAT_T: tl.constexpr = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(pid_k, K // BLOCK_K, SPLIT_K):
        k0 = block * BLOCK_K
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0)
        centred = _centred_tile(qweight_ptr, zeros_ptr, k0, group, offs_n, n_mask, stride_qk, stride_zg,
                                BITS, HAS_ZEROS, BLOCK_K, BLOCK_N, GATHER_WORDS, SWAP_AB, MAGIC, FLOAT_T)
        # One rounding of value x scale either way: the product of an exact integer and a scale
        # rounded to FLOAT_T, or the block's fp32 product scaled in fp32.
        if SWAP_AB:
            x_t = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None], mask=m_mask[None, :],
                          other=0.0)
            if SCALE_AFTER_DOT:
                acc += tl.dot(centred, x_t, input_precision=DOT_PRECISION) * scale.to(tl.float32)[:, None]
            else:
                acc = tl.dot(centred * scale.to(FLOAT_T)[:, None], x_t, acc, input_precision=DOT_PRECISION)
        else:
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask[:, None],
                        other=0.0)
            if SCALE_AFTER_DOT:
                acc += tl.dot(a, centred, input_precision=DOT_PRECISION) * scale.to(tl.float32)[None, :]
            else:
                acc = tl.dot(a, centred * scale.to(FLOAT_T)[None, :], acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        out_ptrs = out_ptr + pid_k * stride_split + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
    else:
        out_ptrs = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _wna16_dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, stride_qk, stride_sg, stride_zg, stride_ok,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_words = tl.program_id(0) * (BLOCK_K // PACK) + tl.arange(0, BLOCK_K // PACK)
    n_mask = offs_n < N
    k_mask = offs_k < K
    packed = tl.load(qweight_ptr + offs_words[:, None] * stride_qk + offs_n[None, :],
                     mask=(offs_words < K // PACK)[:, None] & n_mask[None, :], other=0)
    values = _unpack_tile(packed, BITS, BLOCK_K, BLOCK_N)
    groups = offs_k // GROUP_SIZE
    mask = k_mask[:, None] & n_mask[None, :]
    scale = tl.load(scales_ptr + groups[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0).to(tl.int32)
        centred = values - zero
    else:
        centred = values - (1 << (BITS - 1))
    weight = centred.to(tl.float32) * scale.to(tl.float32)
    tl.store(out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :], weight.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q,
                          QMAX: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """One row: scale = absmax / QMAX, q = clamp(x / scale) (rounded half to even for integers)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    # IEEE divisions (``/`` may be approximate on GPUs): the same values as the PyTorch reference
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), QMAX), 1e-12)
    y = tl.math.div_rn(x, scale)
    if ROUND:
        y = (y + 12582912.0) - 12582912.0  # adding and subtracting 1.5 * 2**23 rounds half to even
        y = tl.minimum(tl.maximum(y, -QMAX - 1.0), QMAX)
    else:
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    tl.store(q_ptr + row * stride_q + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def _quantize_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float, round_values: bool):
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    if rows:
        _quantize_rows_kernel[(rows,)](x, out, scale, cols, x.stride(0), out.stride(0), QMAX=qmax,
                                       ROUND=round_values, BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return out, scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 activations in one pass: (float8_e4m3fn [M, K], float32 scales [M, 1])."""
    return _quantize_rows(x, torch.float8_e4m3fn, FP8_MAX, round_values=False)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 activations in one pass: (int8 [M, K], float32 scales [M, 1])."""
    return _quantize_rows(x, torch.int8, 127.0, round_values=True)


# --- W4A16 / W8A16 ----------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, gather words, swap A and B) candidates per
# token bucket, best guess first.
_CANDIDATES = {
    16: [(16, 64, 128, 4, 4, False, False), (16, 128, 128, 4, 4, False, False), (16, 64, 64, 4, 4, False, False),
         (16, 64, 128, 4, 4, True, False),
         (16, 64, 128, 4, 4, False, True), (16, 128, 128, 4, 4, False, True)],
    64: [(32, 64, 128, 4, 4, False, False), (64, 64, 128, 4, 4, False, False), (32, 128, 128, 4, 4, False, False),
         (64, 128, 64, 4, 4, False, False), (32, 64, 128, 4, 4, True, False),
         (64, 64, 128, 4, 4, False, True), (32, 128, 128, 4, 4, False, True)],
    256: [(64, 128, 64, 4, 4, False, False), (128, 128, 64, 8, 4, False, False), (64, 64, 128, 4, 4, False, False),
          (128, 64, 64, 4, 4, False, False), (64, 128, 64, 4, 4, True, False),
          (64, 128, 64, 4, 3, False, True), (128, 128, 64, 8, 3, False, True)],
    1 << 30: [(128, 128, 64, 8, 3, False, False), (128, 256, 64, 8, 3, False, False), (64, 128, 64, 4, 4, False, False),
              (128, 128, 64, 8, 3, True, False), (128, 128, 64, 8, 3, False, True)],
}
# The two paths: the in-register kernel, or unpacking the whole weight once and one cuBLAS matmul.
# The latter is a candidate from DEQUANTIZE_MIN_TOKENS on, where the fused kernel's tensor-core
# rate can fall below cuBLAS's.
FUSED = "fused"
DEQUANTIZE = "dequantize"
PATHS = (FUSED, DEQUANTIZE)
DEQUANTIZE_MIN_TOKENS = 33

# A fused-kernel config (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, gather words, swap A and B), or DEQUANTIZE.
FusedConfig = tuple[int, int, int, int, int, bool, bool]
Config = Union[FusedConfig, str]


def _bucket(tokens: int) -> int:
    return next(bound for bound in _CANDIDATES if tokens <= bound)


def _block_k(candidate_k: int, group_size: int, in_features: int, bits: int) -> Optional[int]:
    """The largest BLOCK_K <= the candidate that stays inside one group and tiles K."""
    block = candidate_k
    while block >= max(16, 32 // bits):
        if group_size % block == 0 and in_features % block == 0:
            return block
        block //= 2
    return None


def wna16_supported(layer, method) -> bool:
    """Whether the fused kernel can tile this layer (else dequantize-then-matmul)."""
    return _block_k(16, method.layer_group_size(layer), layer.in_features, method.bits) is not None


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Split K across programs when the output tiles alone would leave SMs idle."""
    if device.type != "cuda":
        return 1
    wanted = max(1, 2 * _num_sms(device.index or 0) // tiles)
    split = 1
    while split * 2 <= min(wanted, k_blocks // 4, 16):
        split *= 2
    return split


def magic_bits(dtype: torch.dtype, bits: int) -> int:
    """The bits of a power of two whose mantissa holds every ``bits``-wide value exactly, in
    ``dtype`` (the kernel ORs values into it); 0 where none does (8-bit values in bfloat16)."""
    if dtype == torch.float16:
        return 0x6400  # 1024: 10 mantissa bits, unit steps
    if dtype == torch.float32:
        return 0x4B000000  # 2**23: 23 mantissa bits
    if dtype == torch.bfloat16 and bits <= 7:
        return 0x4300  # 128: 7 mantissa bits
    return 0


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
            group_size: int, bits: int, config: FusedConfig, split_k: Optional[int] = None) -> torch.Tensor:
    block_m, block_n, block_k, num_warps, num_stages, gather_words, swap_ab = config
    tokens, in_features = x.shape
    if group_size % block_k or in_features % block_k:
        raise ValueError(f"BLOCK_K {block_k} must divide the group size ({group_size}) and the input width "
                         f"({in_features}): a block may not span two groups.")
    out_features = qweight.shape[1]
    tiles = triton.cdiv(tokens, block_m) * triton.cdiv(out_features, block_n)
    split = split_k or _split_k(tiles, in_features // block_k, x.device)
    out = torch.empty((split, tokens, out_features), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(out_features, block_n), split)
    _wna16_gemm_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, out,
        tokens, out_features, in_features, x.stride(0), qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, out.stride(0), out.stride(1),
        GROUP_SIZE=group_size, BITS=bits, HAS_ZEROS=zeros is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", GATHER_WORDS=gather_words,
        SWAP_AB=swap_ab, SCALE_AFTER_DOT=block_m < block_k, MAGIC=magic_bits(x.dtype, bits),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out[0] if split == 1 else out.sum(0).to(x.dtype)


def _dequantize_then_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: Optional[torch.Tensor], group_size: int, bits: int) -> torch.Tensor:
    return x @ wna16_dequantize(qweight, scales, zeros, group_size, bits, x.dtype)


_TUNED: dict[tuple, Config] = {}
_TIMED_RUNS = 10
_TIMING_REPEATS = 3  # the least of these, each over _TIMED_RUNS runs
_QUEUE_CYCLES = 5_000_000  # a few milliseconds of GPU clock: longer than launching _TIMED_RUNS runs


def _tuning_tokens(tokens: int) -> int:
    """The token counts one tuned choice serves: multiples of 16 up to 256 (the decode graphs'
    batch sizes), powers of two above; the paths' relative speed changes too much across a
    whole candidate bucket (65-256 tokens) for one choice."""
    if tokens <= 256:
        return -(-tokens // 16) * 16
    return 1 << (tokens - 1).bit_length()


def _configs(tokens: int, group_size: int, in_features: int, bits: int, paths: tuple[str, ...]) -> list[Config]:
    unknown = set(paths) - set(PATHS)
    if unknown or not paths:
        raise ValueError(f"unknown W4A16 paths {sorted(unknown) or paths}; choose from {PATHS}.")
    configs: list[Config] = []
    if FUSED in paths:
        for block_m, block_n, block_k, warps, stages, gather, swap in _CANDIDATES[_bucket(tokens)]:
            block_k = _block_k(block_k, group_size, in_features, bits)
            config = (block_m, block_n, block_k, warps, stages, gather, swap)
            if block_k is not None and config not in configs:
                configs.append(config)
    if DEQUANTIZE in paths and (tokens >= DEQUANTIZE_MIN_TOKENS or not configs):
        configs.append(DEQUANTIZE)
    return configs


def _run(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
         group_size: int, bits: int, config: Config) -> torch.Tensor:
    if config == DEQUANTIZE:
        return _dequantize_then_matmul(x, qweight, scales, zeros, group_size, bits)
    return _launch(x, qweight, scales, zeros, group_size, bits, config)


def _tuned_config(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                  group_size: int, bits: int, paths: tuple[str, ...]) -> Config:
    tokens, in_features = x.shape
    configs = _configs(tokens, group_size, in_features, bits, paths)
    key = (_tuning_tokens(tokens), qweight.shape[1], in_features, group_size, bits, zeros is not None, x.dtype,
           tuple(configs))
    if key in _TUNED:
        return _TUNED[key]
    if not x.is_cuda or len(configs) == 1 or torch.cuda.is_current_stream_capturing():
        return configs[0]  # no timing in the interpreter or inside a graph capture
    def time_config(config: Config) -> float:
        _run(x, qweight, scales, zeros, group_size, bits, config)  # compile and warm up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Hold the stream while the timed launches queue up behind it: small shapes run faster than
        # the host launches them, and launch gaps would otherwise decide between the candidates.
        timings = []
        for _ in range(_TIMING_REPEATS):
            torch.cuda._sleep(_QUEUE_CYCLES)
            start.record()
            for _ in range(_TIMED_RUNS):
                _run(x, qweight, scales, zeros, group_size, bits, config)
            end.record()
            end.synchronize()
            timings.append(start.elapsed_time(end))
        return min(timings)

    _TUNED[key] = fastest_config(configs, time_config)
    logger.debug("W4A16 %d tokens, [%d, %d]: %s", tokens, in_features, qweight.shape[1], _TUNED[key])
    return _TUNED[key]


def fastest_config(configs: list[Config], time_config: Callable[[Config], float]) -> Config:
    """The config with the least time; one whose tiles need more shared memory than this card has
    (Triton's OutOfResources, e.g. deep pipelines on large tiles) is skipped, not fatal. Errors in
    the kernel's source are not: they do not depend on the card (scripts/compile_for_hopper.py
    finds them without one)."""
    timings: dict[Config, float] = {}
    for config in configs:
        try:
            timings[config] = time_config(config)
        except OutOfResources as error:
            logger.debug("W4A16 config %s does not fit this GPU: %s", config, error)
    if not timings:
        raise RuntimeError(f"no W4A16 kernel config fits this GPU (tried {configs}).")
    return min(timings, key=timings.get)


def wna16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               group_size: int, bits: int, config: Optional[FusedConfig] = None,
               split_k: Optional[int] = None) -> torch.Tensor:
    """``x [M, K] @ dequant(qweight)`` -> [M, N] in x's dtype, unpacking the weight in registers.
    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, gather words, swap A and B) and
    ``split_k`` override the tuned choice."""
    x = x.contiguous()
    config = config or _tuned_config(x, qweight, scales, zeros, group_size, bits, (FUSED,))
    return _launch(x, qweight, scales, zeros, group_size, bits, config, split_k)


def wna16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int, bits: int, paths: tuple[str, ...] = PATHS) -> torch.Tensor:
    """``x @ dequant(qweight)`` by whichever of ``paths`` (FUSED: the in-register kernel at its
    fastest tile; DEQUANTIZE: unpack, then cuBLAS) measured fastest for this shape on first use."""
    x = x.contiguous()
    return _run(x, qweight, scales, zeros, group_size, bits, _tuned_config(x, qweight, scales, zeros,
                                                                           group_size, bits, paths))


def pretune(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
            bits: int, dtype: torch.dtype, max_tokens: int, paths: tuple[str, ...] = PATHS) -> None:
    """Tune every token count a step can bring up to ``max_tokens`` now (at load), rather than
    in the first step that brings it, where compiling and timing the candidates would stall
    serving for seconds. Shapes already tuned cost nothing."""
    in_features = qweight.shape[0] * (32 // bits)
    counts = sorted({_tuning_tokens(tokens) for tokens in range(1, max_tokens + 1)})
    for tokens in counts:
        x = torch.zeros(tokens, in_features, dtype=dtype, device=qweight.device)
        _tuned_config(x, qweight, scales, zeros, group_size, bits, paths)


def wna16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                     group_size: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The full [K, N] weight in ``dtype`` (for large token counts, before a cuBLAS matmul)."""
    pack = 32 // bits
    in_features, out_features = qweight.shape[0] * pack, qweight.shape[1]
    out = torch.empty(in_features, out_features, dtype=dtype, device=qweight.device)
    block_k, block_n = 64, 64
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(out_features, block_n))
    _wna16_dequantize_kernel[grid](
        qweight, scales, zeros if zeros is not None else scales, out, out_features, in_features,
        qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, out.stride(0),
        GROUP_SIZE=group_size, BITS=bits, HAS_ZEROS=zeros is not None, BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return out
