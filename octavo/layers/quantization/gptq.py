"""GPTQ checkpoints (AutoGPTQ / GPTQModel): ``qweight``, ``qzeros``, ``scales``, ``g_idx``.

``qweight`` [in / pack, out] is already the kernels' layout. ``qzeros`` [groups, out / pack] is
packed along the output dim; the original ("v1") format stores ``zero - 1``, GPTQModel's v2
stores the zero itself. With ``desc_act`` (act-order) ``g_idx`` maps each input row to its group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from octavo.layers.quantization.base import (
    LinearMethod, QuantizationConfig, UnquantizedLinearMethod, copy_rows, matches_module_list,
)
from octavo.layers.quantization.packing import unpack_int32
from octavo.layers.quantization.wna16 import WNA16LinearMethod


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, desc_act: bool, symmetric: bool, zeros_v2: bool,
                 lm_head: bool, modules_to_not_convert: list[str]) -> None:
        self.method = GPTQLinearMethod(bits, group_size, symmetric, desc_act, zeros_v2)
        self.lm_head = lm_head
        self.modules_to_not_convert = modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        bits = int(config.get("bits", 4))
        if bits not in (4, 8):
            raise ValueError(f"quantization_config.bits={bits}: GPTQ is supported with 4 or 8 bits.")
        if config.get("dynamic"):
            raise ValueError("quantization_config.dynamic (per-module GPTQ overrides) is not supported.")
        checkpoint_format = config.get("checkpoint_format", "gptq")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"quantization_config.checkpoint_format={checkpoint_format!r} is not supported; "
                "GPTQ checkpoints in 'gptq' (v1) or 'gptq_v2' format are."
            )
        return cls(bits, int(config.get("group_size", 128)), bool(config.get("desc_act", False)),
                   bool(config.get("sym", True)), checkpoint_format == "gptq_v2",
                   bool(config.get("lm_head", False)), list(config.get("modules_to_not_convert") or []))

    def linear_method(self, prefix: str) -> LinearMethod:
        if (prefix == "lm_head" and not self.lm_head) or matches_module_list(prefix, self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        return self.method


class GPTQLinearMethod(WNA16LinearMethod):
    def __init__(self, bits: int, group_size: int, symmetric: bool, act_order: bool, zeros_v2: bool) -> None:
        super().__init__(bits, group_size, symmetric, act_order)
        self.zeros_v2 = zeros_v2

    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales") + (("g_idx",) if self.act_order else ())

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        if name == "qweight":
            copy_rows(layer.qweight, tensor, layer.shard_offsets[shard], name, dim=1)
        elif name == "qzeros":
            zeros = unpack_int32(tensor, self.bits, dim=1)
            if not self.zeros_v2:
                zeros = (zeros + 1) & ((1 << self.bits) - 1)  # v1 stores zero - 1 (mod 2**bits)
            self.load_zeros(layer, zeros, shard, name)
        elif name == "scales":
            self.load_scales(layer, tensor, shard, name)
        elif name == "g_idx":
            self.load_g_idx(layer, tensor, shard, name)
        else:
            raise ValueError(f"unexpected tensor {name!r} for a GPTQ layer (qweight, qzeros, scales, g_idx).")
