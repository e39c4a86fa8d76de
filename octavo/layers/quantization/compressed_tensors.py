"""compressed-tensors checkpoints (llm-compressor): ``config_groups`` map layers to schemes.

Supported schemes (each maps onto an octavo method):

- FP8 W8A8, ``float-quantized``: 8-bit float weights per tensor/channel, activations per token
  (dynamic) or per tensor (static); FP8 weights without activation quantization are W8A16.
- INT8 W8A8, ``int-quantized``: symmetric int8 weights per tensor/channel, symmetric int8
  activations per token or per tensor.
- W4A16 / W8A16, ``pack-quantized`` (``weight_packed`` [out, in / pack], ``weight_scale``
  [out, groups], ``weight_zero_point`` [out / pack, groups] packed along the output dim,
  ``weight_shape``, optional ``weight_g_idx``) and 8-bit ``int-quantized`` weights without
  activation quantization.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from octavo.layers.quantization.base import (
    LinearMethod, QuantizationConfig, UnquantizedLinearMethod, copy_rows, matches_module_list,
)
from octavo.layers.quantization.fp8 import Fp8LinearMethod
from octavo.layers.quantization.int8 import Int8LinearMethod
from octavo.layers.quantization.packing import unpack_int32
from octavo.layers.quantization.wna16 import WNA16LinearMethod

SUPPORTED_SCHEMES = (
    "FP8 W8A8 (float weights, 8 bits, tensor/channel; activations token/tensor, or none)",
    "INT8 W8A8 (symmetric int weights, 8 bits, tensor/channel; symmetric activations token/tensor)",
    "W4A16/W8A16 (int weights, 4 or 8 bits, channel/group, no activation quantization)",
)


def _describe(weights: dict, activations: Optional[dict]) -> str:
    text = (f"weights {weights.get('type')} {weights.get('num_bits')}-bit {weights.get('strategy')} "
            f"symmetric={weights.get('symmetric', True)}")
    if activations:
        text += (f", activations {activations.get('type')} {activations.get('num_bits')}-bit "
                 f"{activations.get('strategy')} dynamic={activations.get('dynamic')} "
                 f"symmetric={activations.get('symmetric', True)}")
    return text


def _unsupported(weights: dict, activations: Optional[dict], why: str) -> ValueError:
    return ValueError(
        f"compressed-tensors scheme ({_describe(weights, activations)}) is not supported: {why}. "
        f"Supported schemes: {'; '.join(SUPPORTED_SCHEMES)}."
    )


def method_for_scheme(weights: dict, activations: Optional[dict], fmt: str) -> LinearMethod:
    """The octavo method for one compressed-tensors scheme; ValueError naming what does not fit."""
    kind, bits = weights.get("type", "int"), int(weights.get("num_bits", 8))
    strategy, symmetric = weights.get("strategy", "tensor"), weights.get("symmetric", True)
    if weights.get("dynamic", False):
        raise _unsupported(weights, activations, "dynamic weight quantization")
    if activations is not None:
        act_strategy = activations.get("strategy", "tensor")
        dynamic = activations.get("dynamic", False)
        if activations.get("type", "int") != kind or int(activations.get("num_bits", 8)) != 8 or bits != 8:
            raise _unsupported(weights, activations, "weights and activations must both be 8-bit of one type")
        if strategy not in ("tensor", "channel"):
            raise _unsupported(weights, activations, f"W8A8 weights need strategy tensor or channel, not {strategy}")
        if not dynamic and act_strategy != "tensor":
            raise _unsupported(weights, activations, "static activation scales must be per tensor")
        if dynamic and act_strategy not in ("token", "tensor"):
            raise _unsupported(weights, activations, f"dynamic activations by {act_strategy}")
        if kind == "float":
            return Fp8LinearMethod(static_activations=not dynamic)
        if not symmetric or not activations.get("symmetric", True):
            raise _unsupported(weights, activations, "INT8 W8A8 must be symmetric")
        return Int8LinearMethod(static_activations=not dynamic)
    if kind == "float":
        if bits != 8 or strategy not in ("tensor", "channel"):
            raise _unsupported(weights, activations, "float weights must be 8-bit per tensor or channel")
        return Fp8LinearMethod(activations=None)
    if strategy not in ("channel", "group") or bits not in (4, 8):
        raise _unsupported(weights, activations, "integer weight-only schemes need 4 or 8 bits by channel or group")
    group_size = -1 if strategy == "channel" else int(weights["group_size"])
    act_order = weights.get("actorder") in ("group", "dynamic")
    if fmt == "pack-quantized":
        return CompressedPackedLinearMethod(bits, group_size, bool(symmetric), act_order)
    if fmt in ("int-quantized", "naive-quantized") and bits == 8:
        return CompressedInt8WeightMethod(group_size, bool(symmetric), act_order)
    raise _unsupported(weights, activations, f"format {fmt!r} for {bits}-bit weights (use pack-quantized)")


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], LinearMethod]], ignore: list[str]) -> None:
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CompressedTensorsConfig":
        default_format = config.get("format", "dense")
        if config.get("quantization_status", "compressed") not in ("compressed", "frozen"):
            raise ValueError(f"quantization_config.quantization_status={config.get('quantization_status')!r}: "
                             "only compressed checkpoints are supported.")
        if default_format == "dense":
            raise ValueError("compressed-tensors format 'dense' stores no quantized weights; load it unquantized.")
        if config.get("sparsity_config"):
            raise ValueError("compressed-tensors sparsity_config (sparse weights) is not supported.")
        groups = []
        for name, group in (config.get("config_groups") or {}).items():
            weights = group.get("weights")
            if weights is None:
                raise ValueError(f"config_groups.{name} quantizes no weights; only weight schemes are supported.")
            if group.get("output_activations"):
                raise ValueError(f"config_groups.{name}.output_activations is not supported.")
            fmt = group.get("format") or default_format
            method = method_for_scheme(weights, group.get("input_activations"), fmt)
            groups.append((list(group.get("targets") or []), method))
        if not groups:
            raise ValueError("quantization_config.config_groups is empty.")
        return cls(groups, list(config.get("ignore") or []))

    def linear_method(self, prefix: str) -> LinearMethod:
        if matches_module_list(prefix, self.ignore):
            return UnquantizedLinearMethod()
        for targets, method in self.groups:
            for target in targets:
                if target == "Linear" or (target.startswith("re:") and re.fullmatch(target[3:], prefix)) \
                        or prefix == target or prefix.endswith("." + target):
                    return method
        return UnquantizedLinearMethod()


class CompressedPackedLinearMethod(WNA16LinearMethod):
    """``pack-quantized``: the same packing as the kernels' layout, transposed."""

    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        return (("weight_packed", "weight_scale", "weight_shape")
                + (() if self.symmetric else ("weight_zero_point",))
                + (("weight_g_idx",) if self.act_order else ()))

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        rows = layer.shard_offsets[shard]
        if name == "weight_packed":
            copy_rows(layer.qweight, tensor.t(), rows, name, dim=1)
        elif name == "weight_scale":
            self.load_scales(layer, tensor.t(), shard, name)
        elif name == "weight_zero_point":
            self.load_zeros(layer, unpack_int32(tensor, self.bits, dim=0).t(), shard, name)
        elif name == "weight_shape":
            if [int(v) for v in tensor.reshape(-1)] != [rows[1], layer.in_features]:
                raise ValueError(f"weight_shape is {tensor.tolist()}, expected {[rows[1], layer.in_features]}.")
        elif name == "weight_g_idx":
            self.load_g_idx(layer, tensor, shard, name)
        else:
            raise ValueError(f"unexpected tensor {name!r} for a pack-quantized layer.")


class CompressedInt8WeightMethod(WNA16LinearMethod):
    """8-bit ``int-quantized`` weights (``weight`` int8 [out, in]) without activation quantization."""

    def __init__(self, group_size: int, symmetric: bool, act_order: bool) -> None:
        super().__init__(8, group_size, symmetric, act_order)

    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        return (("weight", "weight_scale") + (() if self.symmetric else ("weight_zero_point",))
                + (("weight_g_idx",) if self.act_order else ()))

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        offset = 1 << (self.bits - 1)  # stored signed; the kernels' layout is unsigned
        if name == "weight":
            if tensor.dtype != torch.int8:
                raise ValueError(f"weight has dtype {tensor.dtype}, expected torch.int8.")
            self.load_qweight(layer, (tensor.to(torch.int32) + offset).t(), shard, name)
        elif name == "weight_scale":
            self.load_scales(layer, tensor.reshape(tensor.shape[0], -1).t(), shard, name)
        elif name == "weight_zero_point":
            self.load_zeros(layer, (tensor.to(torch.int32) + offset).reshape(tensor.shape[0], -1).t(), shard, name)
        elif name == "weight_g_idx":
            self.load_g_idx(layer, tensor, shard, name)
        else:
            raise ValueError(f"unexpected tensor {name!r} for an int-quantized layer.")
