"""Random (dummy) weights that do not depend on how a model is split across ranks.

A full tensor is drawn in fixed chunks of rows, each chunk from its own seed (derived from the
tensor's name), so a rank can draw just the chunks under its rows and keep its columns: every
tensor-parallel size sees the same model, and no rank draws a full copy of a large tensor.
"""

from __future__ import annotations

import zlib

import torch

_CHUNK_ELEMENTS = 1 << 22
STD = 0.02  # realistic magnitudes keep activations finite in half precision


def _chunk_seed(key: str, seed: int, first_row: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode()) * 65_537 + first_row) % (1 << 63)


@torch.no_grad()
def fill_normal_slice(target: torch.Tensor, key: str, seed: int, full_shape: tuple[int, int],
                      row_start: int = 0, col_start: int = 0) -> None:
    """Fill the 2-D ``target`` with rows ``row_start..`` and columns ``col_start..`` of the random
    ``full_shape`` tensor named ``key``."""
    full_rows, full_cols = full_shape
    rows, cols = target.shape
    chunk = max(1, _CHUNK_ELEMENTS // full_cols)
    generator = torch.Generator(device=target.device)
    first = row_start - row_start % chunk
    while first < row_start + rows:
        count = min(chunk, full_rows - first)
        generator.manual_seed(_chunk_seed(key, seed, first))
        block = torch.empty(count, full_cols, dtype=target.dtype, device=target.device)
        block.normal_(0.0, STD, generator=generator)
        begin, end = max(first, row_start), min(first + count, row_start + rows)
        target[begin - row_start : end - row_start].copy_(block[begin - first : end - first, col_start : col_start + cols])
        first += chunk


def fill_normal(target: torch.Tensor, key: str, seed: int) -> None:
    """A replicated tensor of any shape, drawn the same way as a 2-D one."""
    flat = target.view(target.shape[0], -1) if target.dim() > 1 else target.view(1, -1)
    fill_normal_slice(flat, key, seed, tuple(flat.shape))
