"""ALiBi slopes (Press et al., "Train Short, Test Long"), as BLOOM and Falcon-RW were trained."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """One float32 slope per head: the geometric sequence ``2^(-8 i / n)`` for the largest power
    of two ``n <= num_heads``, then every other term of the sequence for ``2n`` for the rest."""
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    extra = num_heads - closest
    slopes += [2.0 ** (-8.0 * i / (2 * closest)) for i in range(1, 2 * extra, 2)]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")
