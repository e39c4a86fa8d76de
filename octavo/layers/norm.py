"""Normalisation layers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers import cpu_fused


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; with ``residual`` it adds first and returns the new residual.

    ``weight_offset=1.0`` is Gemma's form: the stored weight is a delta, the scale is ``1 + w``,
    applied in float32 before rounding (Llama rounds first, then multiplies by ``w``).
    CUDA tensors of the Llama form go through the fused Triton kernels of ``octavo.layers.fused_ops``
    (same roundings; ``OCTAVO_DISABLE_FUSED_OPS=1`` turns them off); inputs are never modified.
    Float32 rows on the CPU go through the fused C++ kernels of ``octavo.layers.cpu_fused``
    (``OCTAVO_CPU_FUSED_OPS=0`` turns them off).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - weight_offset))
        self.cpu_fused = not weight_offset and cpu_fused.fused_ops_enabled()

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if x.is_cuda and not self.weight_offset:
            from octavo.layers import fused_ops  # imported on first use: CPU runs never load triton

            if fused_ops.enabled():
                if residual is None:
                    return fused_ops.rms_norm(x, self.weight, self.eps)
                return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        elif self.cpu_fused and self.weight.dtype == torch.float32 and cpu_fused.use_fused(x):
            if residual is None:
                return cpu_fused.rms_norm(x, self.weight, self.eps)
            return cpu_fused.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        orig_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            out = (x * (self.weight_offset + self.weight.float())).to(orig_dtype)
        else:
            out = self.weight * x.to(orig_dtype)
        return out if residual is None else (out, residual)
