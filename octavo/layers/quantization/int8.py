"""INT8 weights and activations (W8A8): symmetric int8 weights with a scale per output row,
activations quantized per token (dynamic) or with one checkpoint scale (static); the product is
an int8 x int8 -> int32 matmul (``torch._int_mm``) scaled back on both sides."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers.quantization.base import LinearMethod, copy_rows

INT8_MAX = 127
_MIN_SCALE = 1e-12
# cuBLAS int8 matmul needs more than 16 rows of activations; fewer are padded up to this.
_INT_MM_MIN_ROWS = 17


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row scaled by its absolute maximum to [-127, 127], rounded: (int8 values, float32 scales [rows, 1])."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=_MIN_SCALE)
    return quantize_int8_static(x, scale), scale


def quantize_int8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale).clamp(-128, INT8_MAX).to(torch.int8)


def int_mm(x_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 weight [N, K] -> int32 [M, N], the weight read column-major."""
    rows = x_q.shape[0]
    if x_q.is_cuda and rows < _INT_MM_MIN_ROWS:
        x_q = nn.functional.pad(x_q, (0, 0, 0, _INT_MM_MIN_ROWS - rows))
        return torch._int_mm(x_q, weight.t())[:rows]
    return torch._int_mm(x_q, weight.t())


class Int8LinearMethod(LinearMethod):
    """compressed-tensors ``int-quantized`` W8A8: ``weight`` int8, ``weight_scale``, optional ``input_scale``."""

    def __init__(self, static_activations: bool) -> None:
        self.static_activations = static_activations

    def create_weights(self, layer: nn.Module, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=torch.int8),
                                    requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(layer.out_features, dtype=torch.float32), requires_grad=False)
        shards = len(layer.shard_offsets)
        layer.input_scale = torch.empty(shards, dtype=torch.float32) if self.static_activations else None

    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        return ("weight", "weight_scale") + (("input_scale",) if self.static_activations else ())

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        rows = layer.shard_offsets[shard]
        if name == "weight":
            if tensor.dtype != torch.int8:
                raise ValueError(f"weight has dtype {tensor.dtype}, expected torch.int8 (int-quantized).")
            copy_rows(layer.weight, tensor, rows, name)
        elif name == "weight_scale":
            scale = tensor.float().reshape(-1)
            copy_rows(layer.weight_scale, scale.expand(rows[1]) if scale.numel() == 1 else scale, rows, name)
        elif name == "input_scale" and layer.input_scale is not None:
            if tensor.numel() != 1:
                raise ValueError(f"input_scale has {tensor.numel()} values; only one per tensor is supported.")
            layer.input_scale[list(layer.shard_offsets).index(shard)] = tensor.float().reshape(())
        elif name in ("weight_zero_point", "input_zero_point"):
            if bool(tensor.any()):
                raise ValueError(f"{name} is not zero: asymmetric INT8 W8A8 is not supported.")
        else:
            raise ValueError(f"unexpected tensor {name!r} for an INT8 layer (weight, weight_scale, input_scale).")

    def process_after_loading(self, layer: nn.Module) -> None:
        if layer.input_scale is not None and layer.input_scale.dim() == 1:
            layer.input_scale = layer.input_scale.max().reshape(1, 1)

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        layer.weight.random_(-INT8_MAX, INT8_MAX + 1, generator=generator)
        layer.weight_scale.fill_(0.02 / (INT8_MAX / 3**0.5))  # uniform ints: std 127 / sqrt(3)
        if layer.input_scale is not None:
            layer.input_scale.fill_(1.0 / INT8_MAX)

    def dequantize(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return (layer.weight.float() * layer.weight_scale.view(-1, 1)).to(dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if layer.in_features % 8 or layer.out_features % 8:
            return nn.functional.linear(x, self.dequantize(layer, x.dtype), bias)
        if layer.input_scale is not None:
            x_q, x_scale = quantize_int8_static(x, layer.input_scale), layer.input_scale
        elif x.is_cuda:
            from octavo.layers.quantization import triton_kernels

            x_q, x_scale = triton_kernels.quantize_rows_int8(x)
        else:
            x_q, x_scale = quantize_rows_int8(x)
        out = (int_mm(x_q, layer.weight).float() * x_scale * layer.weight_scale.view(1, -1)).to(x.dtype)
        return out if bias is None else out + bias
