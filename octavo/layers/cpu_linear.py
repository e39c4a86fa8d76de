"""float32 linear layers for the CPU, with the weight stored transposed.

PyTorch's CPU GEMM multiplies ``x @ W^T`` with ``W`` stored [out, in] about half as fast at a few
rows (a decode step of a small batch) as with the weight stored [in, out]; at one row and at
hundreds of rows the two are even (measured on a 2-core AVX-512 machine, SmolLM2's shapes). The
values are the same; only the layout changes, once, after loading.
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """``y = x @ weight_t + bias`` with ``weight_t`` [in_features, out_features] contiguous."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight_t = nn.Parameter(source.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = source.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.mm(flat, self.weight_t) if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def transpose_linears(model: nn.Module) -> int:
    """Swap the model's float32 ``nn.Linear`` layers for ``TransposedLinear``; the output
    projection stays (a tied one shares its matrix with the embedding lookup). Returns the count."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.endswith("lm_head") or module.weight.dtype != torch.float32:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, TransposedLinear(module))
        swapped += 1
    return swapped
