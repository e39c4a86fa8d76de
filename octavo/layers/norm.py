"""Normalisation layers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; with ``residual`` it adds first and returns the new residual.

    CUDA tensors go through the fused Triton kernels of ``octavo.layers.fused_ops`` (same
    roundings; ``OCTAVO_DISABLE_FUSED_OPS=1`` turns them off); inputs are never modified.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if x.is_cuda:
            from octavo.layers import fused_ops  # imported on first use: CPU runs never load triton

            if fused_ops.enabled():
                if residual is None:
                    return fused_ops.rms_norm(x, self.weight, self.eps)
                return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        orig_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x.to(orig_dtype)
        return out if residual is None else (out, residual)
