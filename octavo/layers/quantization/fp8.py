"""FP8 (e4m3) weights with a scale per output row; activations quantized per token or per tensor.

Checkpoints: vLLM's ``fp8`` format and compressed-tensors ``float-quantized`` both store
``weight`` (float8_e4m3fn), ``weight_scale`` (one per tensor or per output row) and, with static
activation scales, ``input_scale``. A per-tensor scale is spread over its shard's rows, so fused
q/k/v keep their own scales without requantizing. ``Fp8Config(online=True)`` (``--quantization
fp8`` on a 16-bit checkpoint) quantizes each output row of the loaded weight by its absolute maximum.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from octavo.layers.quantization.base import (
    LinearMethod, QuantizationConfig, UnquantizedLinearMethod, copy_rows, matches_module_list,
)
from octavo.worker.parallel_state import tp_group

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_MIN_SCALE = 1e-12  # an all-zero row still gets a finite scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` scaled by its absolute maximum into e4m3: (values, float32 scales [rows, 1])."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


class Fp8Config(QuantizationConfig):
    name = "fp8"

    supports_tensor_parallel = True

    def __init__(self, static_activations: bool, online: bool, ignored_layers: list[str]) -> None:
        self.method = Fp8LinearMethod(static_activations, online)
        self.ignored_layers = ignored_layers

    @classmethod
    def online(cls) -> "Fp8Config":
        return cls(static_activations=False, online=True, ignored_layers=[])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Fp8Config":
        if config.get("weight_block_size"):
            raise ValueError(
                f"quantization_config.weight_block_size={config['weight_block_size']}: block-wise FP8 is not "
                "supported; FP8 checkpoints with one scale per tensor or per output row are."
            )
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"quantization_config.activation_scheme={scheme!r}; use 'dynamic' or 'static'.")
        return cls(scheme == "static", online=False, ignored_layers=list(config.get("ignored_layers") or []))

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix == "lm_head" or matches_module_list(prefix, self.ignored_layers):
            return UnquantizedLinearMethod()
        return self.method


class Fp8LinearMethod(LinearMethod):
    """``activations``: ``dynamic`` (per token), ``static`` (one checkpoint scale per tensor), or
    ``None`` (weight-only: the weight is widened to the activation dtype in every call).

    Split across tensor-parallel ranks, each rank keeps its rows (column parallel) or columns (row
    parallel) of the FP8 weight and the scales of its rows; online quantization scales each full
    row before the split, and a row-parallel layer takes each token's activation scale over all
    ranks' columns, so every split computes with the values one GPU would."""

    supports_tensor_parallel = True

    def __init__(self, static_activations: bool = False, online: bool = False,
                 activations: Optional[str] = "dynamic") -> None:
        self.activations = "static" if static_activations else activations
        self.online = online

    def create_weights(self, layer: nn.Module, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=FP8_DTYPE),
                                    requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(layer.out_features, dtype=torch.float32), requires_grad=False)
        static = self.activations == "static"
        # one scale per shard until loading ends, then their maximum serves the whole input
        layer.input_scale = torch.empty(len(layer.shard_offsets), dtype=torch.float32) if static else None

    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        if self.online:
            return ("weight",)
        return ("weight", "weight_scale") + (("input_scale",) if self.activations == "static" else ())

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        rows = layer.shard_offsets[shard]
        if name == "weight" and self.online:
            if tensor.dtype == FP8_DTYPE:
                raise ValueError("online FP8 quantization needs a 16/32-bit checkpoint, but the weight is FP8.")
            values, scale = quantize_rows_fp8(tensor.to(layer.weight.device))
            copy_rows(layer.weight, values, rows, name)
            copy_rows(layer.weight_scale, scale.view(-1), rows, "weight_scale")
        elif name == "weight":
            if tensor.dtype != FP8_DTYPE:
                raise ValueError(f"weight has dtype {tensor.dtype}, expected {FP8_DTYPE} in an FP8 checkpoint.")
            copy_rows(layer.weight, tensor, rows, name)
        elif name == "weight_scale":
            scale = tensor.float().reshape(-1)
            if scale.numel() == 1:
                scale = scale.expand(rows[1])
            copy_rows(layer.weight_scale, scale, rows, name)
        elif name == "input_scale" and layer.input_scale is not None:
            if tensor.numel() != 1:
                raise ValueError(f"input_scale has {tensor.numel()} values; only one per tensor is supported.")
            layer.input_scale[list(layer.shard_offsets).index(shard)] = tensor.float().reshape(())
        elif name in ("weight_zero_point", "input_zero_point"):
            if bool(tensor.float().any()):
                raise ValueError(f"{name} is not zero: asymmetric FP8 is not supported.")
        else:
            raise ValueError(f"unexpected tensor {name!r} for an FP8 layer (weight, weight_scale, input_scale).")

    def load_local(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        """``load`` for a layer split across ranks: ``tensor`` is the whole checkpoint tensor."""
        if name == "weight":
            if self.online:
                if tensor.dtype == FP8_DTYPE:
                    raise ValueError("online FP8 quantization needs a 16/32-bit checkpoint, but the weight is FP8.")
                values, scale = quantize_rows_fp8(tensor.to(layer.weight.device))  # whole rows: split-independent
                part, rows = layer.local_part(shard, "weight", values)
                copy_rows(layer.weight, part, rows, "weight")
                copy_rows(layer.weight_scale, layer.local_rows(shard, scale.view(-1), "weight_scale"), rows, "weight_scale")
                return
            if tensor.dtype != FP8_DTYPE:
                raise ValueError(f"weight has dtype {tensor.dtype}, expected {FP8_DTYPE} in an FP8 checkpoint.")
            part, rows = layer.local_part(shard, "weight", tensor)
            copy_rows(layer.weight, part, rows, "weight")
        elif name == "weight_scale":
            scale = tensor.float().reshape(-1)
            rows = layer.shard_offsets[shard]
            if scale.numel() == 1:
                copy_rows(layer.weight_scale, scale.expand(rows[1]), rows, name)
            else:
                local = layer.local_rows(shard, scale, name)
                copy_rows(layer.weight_scale, local, (rows[0], local.shape[0]), name)
        else:
            self.load(layer, name, tensor, shard)  # activation scales and zero points: the same on every rank

    def process_after_loading(self, layer: nn.Module) -> None:
        if layer.input_scale is not None and layer.input_scale.dim() == 1:
            layer.input_scale = layer.input_scale.max().reshape(1, 1)

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        for shard, rows in layer.shard_offsets.items():
            weight = torch.empty(rows[1], layer.in_features, device=layer.weight.device)
            values, scale = quantize_rows_fp8(weight.normal_(0.0, 0.02, generator=generator))
            copy_rows(layer.weight, values, rows, "weight")
            copy_rows(layer.weight_scale, scale.view(-1), rows, "weight_scale")
        if layer.input_scale is not None:
            layer.input_scale.fill_(1.0 / FP8_MAX)

    def dequantize(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The reference: the [out, in] weight in ``dtype``."""
        return (layer.weight.float() * layer.weight_scale.view(-1, 1)).to(dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.activations is None or not _scaled_mm_fits(layer):
            return nn.functional.linear(x, self.dequantize(layer, x.dtype), bias)
        if self.activations == "static":
            x_scale = layer.input_scale
            x_fp8 = quantize_fp8_static(x, x_scale)
            x_scale = x_scale.expand(x.shape[0], 1)
        elif layer.reduce_output:  # row parallel: each token's scale over every rank's columns
            amax = tp_group().all_reduce_max(x.float().abs().amax(dim=-1, keepdim=True))
            x_scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
            x_fp8 = quantize_fp8_static(x, x_scale)
        elif x.is_cuda:
            from octavo.layers.quantization import triton_kernels

            x_fp8, x_scale = triton_kernels.quantize_rows_fp8(x)
        else:
            x_fp8, x_scale = quantize_rows_fp8(x)
        return scaled_mm(x_fp8, x_scale, layer.weight, layer.weight_scale, x.dtype, bias)


def _scaled_mm_fits(layer: nn.Module) -> bool:
    """cuBLAS FP8 needs both matrix dims of the weight to be multiples of 16."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``(x_q * x_scale) @ (weight * weight_scale[:, None])^T + bias`` with per-row scales on both sides.

    cuBLAS applies row-wise scales itself only for bfloat16 output; other dtypes take an unscaled
    float32 product and scale it afterwards."""
    if out_dtype == torch.bfloat16 and x_q.is_cuda:
        out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale.float(), scale_b=weight_scale.view(1, -1),
                               out_dtype=out_dtype)
        return out if bias is None else out + bias
    one = torch.ones((), dtype=torch.float32, device=x_q.device)
    out = torch._scaled_mm(x_q, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    out = (out * x_scale * weight_scale.view(1, -1)).to(out_dtype)
    return out if bias is None else out + bias
