"""Sub-byte integers packed into int32 words, as GPTQ, AWQ and compressed-tensors store them.

Value ``i`` of a word sits at bits ``[i * bits, (i + 1) * bits)``, low bits first; values are
unsigned (a signed format stores ``value + 2**(bits - 1)``).
"""

from __future__ import annotations

import torch

# AWQ's GEMM layout puts output column ``AWQ_PACK_ORDER[i]`` (of each run of eight) in nibble i.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """[R, C] int32 words -> int32 values, ``32 // bits`` times longer along ``dim`` (0 or 1)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 0:
        values = (packed.unsqueeze(1) >> shifts.view(1, per_word, 1)) & mask
        return values.reshape(packed.shape[0] * per_word, packed.shape[1])
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, per_word)) & mask
    return values.reshape(packed.shape[0], packed.shape[1] * per_word)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``unpack_int32``: unsigned values in [0, 2**bits) along ``dim`` -> int32 words."""
    per_word = 32 // bits
    if values.shape[dim] % per_word:
        raise ValueError(f"{values.shape[dim]} values cannot be packed {per_word} to an int32 word.")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    values = values.to(torch.int64)
    if dim == 0:
        words = (values.reshape(-1, per_word, values.shape[1]) << shifts.view(1, per_word, 1)).sum(1)
    else:
        words = (values.reshape(values.shape[0], -1, per_word) << shifts.view(1, 1, per_word)).sum(2)
    # Reinterpret the unsigned 32-bit words as int32 (the top value's high bit is the sign bit).
    return (words - ((words >> 31) << 32)).to(torch.int32)


def awq_to_natural_columns(values: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's column interleave on values unpacked along dim 1 (eight columns per word)."""
    rows, cols = values.shape
    order = torch.tensor(AWQ_PACK_ORDER, device=values.device)
    natural = torch.empty_like(values).view(rows, cols // 8, 8)
    natural[:, :, order] = values.view(rows, cols // 8, 8)
    return natural.view(rows, cols)
