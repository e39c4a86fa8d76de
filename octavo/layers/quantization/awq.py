"""AWQ checkpoints (AutoAWQ "gemm"): ``qweight`` and ``qzeros`` packed along the output dim in an
interleaved column order, ``scales`` [groups, out]; ``w = (q - zero) * scale``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from octavo.layers.quantization.base import (
    LinearMethod, QuantizationConfig, UnquantizedLinearMethod, matches_module_list,
)
from octavo.layers.quantization.packing import awq_to_natural_columns, unpack_int32
from octavo.layers.quantization.wna16 import WNA16LinearMethod


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, group_size: int, modules_to_not_convert: list[str]) -> None:
        self.method = AWQLinearMethod(group_size)
        self.modules_to_not_convert = modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQConfig":
        bits = int(config.get("bits", config.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"quantization_config.bits={bits}: AWQ is supported with 4 bits.")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version={version!r}: only AWQ's 'gemm' packing is supported.")
        if not config.get("zero_point", True):
            raise ValueError("quantization_config.zero_point=false: only AWQ with zero points is supported.")
        return cls(int(config.get("group_size", config.get("q_group_size", 128))),
                   list(config.get("modules_to_not_convert") or []))

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix == "lm_head" or matches_module_list(prefix, self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        return self.method


class AWQLinearMethod(WNA16LinearMethod):
    def __init__(self, group_size: int) -> None:
        super().__init__(4, group_size, symmetric=False, act_order=False)

    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        if name == "qweight":
            self.load_qweight(layer, awq_to_natural_columns(unpack_int32(tensor, 4, dim=1)), shard, name)
        elif name == "qzeros":
            self.load_zeros(layer, awq_to_natural_columns(unpack_int32(tensor, 4, dim=1)), shard, name)
        elif name == "scales":
            self.load_scales(layer, tensor, shard, name)
        else:
            raise ValueError(f"unexpected tensor {name!r} for an AWQ layer (qweight, qzeros, scales).")
