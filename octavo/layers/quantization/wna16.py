"""Integer weights (4 or 8 bits) with group scales, activations in the model's dtype (W4A16, W8A16).

GPTQ, AWQ and compressed-tensors store the same thing in different layouts; each format's
method converts its tensors on load into one layout the kernels read:

- ``qweight`` int32 [in / (32 / bits), out]: unsigned values packed along the input dim;
- ``scales`` [in / group_size, out] in the model's dtype;
- ``zeros`` uint8 [in / group_size, out], only for asymmetric formats (else ``2**(bits-1)``);
- ``perm`` int64 [in], only with act-order: the input order that makes groups contiguous.

``w[k, n] = (q[k, n] - zero[g, n]) * scale[g, n]`` with ``g = k // group_size``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers.quantization.base import LinearMethod, copy_rows
from octavo.layers.quantization.packing import pack_int32, unpack_int32

# Above this many tokens, unpacking the whole weight once and running cuBLAS beats unpacking
# tiles in every program of the fused kernel (prefill); at or below it the faster of the two,
# measured per shape on first use (decode: the fused kernel reads the packed weight only once).
FUSED_MAX_TOKENS = 1024


class WNA16LinearMethod(LinearMethod):
    """The shared layout, dequantization and kernels; subclasses read one checkpoint format."""

    fused_max_tokens = FUSED_MAX_TOKENS
    paths: tuple[str, ...] = ("fused", "dequantize")  # triton_kernels.PATHS: the tuner's choice up to fused_max_tokens

    def __init__(self, bits: int, group_size: int, symmetric: bool, act_order: bool) -> None:
        if bits not in (4, 8):
            raise ValueError(f"{bits}-bit integer weights are not supported; 4 and 8 bits are.")
        self.bits = bits
        self.pack = 32 // bits
        self.group_size = group_size  # -1: one group over the whole input (per-channel)
        self.symmetric = symmetric
        self.act_order = act_order

    def layer_group_size(self, layer: nn.Module) -> int:
        return layer.in_features if self.group_size == -1 else self.group_size

    def create_weights(self, layer: nn.Module, dtype: torch.dtype) -> None:
        in_features, out_features = layer.in_features, layer.out_features
        group_size = self.layer_group_size(layer)
        if in_features % group_size or in_features % self.pack:
            raise ValueError(
                f"input size {in_features} is not a multiple of the group size {group_size} "
                f"(and of {self.pack}); this layer cannot hold {self.bits}-bit weights."
            )
        groups = in_features // group_size
        layer.qweight = nn.Parameter(torch.empty(in_features // self.pack, out_features, dtype=torch.int32),
                                     requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(groups, out_features, dtype=dtype), requires_grad=False)
        zeros = None if self.symmetric else torch.empty(groups, out_features, dtype=torch.uint8)
        layer.register_parameter("zeros", None if zeros is None else nn.Parameter(zeros, requires_grad=False))
        # act-order: g_idx per shard until loading ends, then one input permutation
        layer.g_idx = torch.empty(len(layer.shard_offsets), in_features, dtype=torch.int32) if self.act_order else None
        layer.perm = None

    # --- loading helpers for the formats -------------------------------------------------

    def load_qweight(self, layer: nn.Module, values: torch.Tensor, shard: str, name: str) -> None:
        """``values``: unsigned ints [in, shard rows] (already unpacked and in natural order)."""
        copy_rows(layer.qweight, pack_int32(values, self.bits, dim=0), layer.shard_offsets[shard], name, dim=1)

    def load_scales(self, layer: nn.Module, scales: torch.Tensor, shard: str, name: str) -> None:
        copy_rows(layer.scales, scales.to(layer.scales.dtype), layer.shard_offsets[shard], name, dim=1)

    def load_zeros(self, layer: nn.Module, zeros: torch.Tensor, shard: str, name: str) -> None:
        """``zeros``: unsigned ints [groups, shard rows]; ignored by symmetric formats (their zero is fixed)."""
        if layer.zeros is not None:
            copy_rows(layer.zeros, zeros.to(torch.uint8), layer.shard_offsets[shard], name, dim=1)

    def load_g_idx(self, layer: nn.Module, g_idx: torch.Tensor, shard: str, name: str) -> None:
        if layer.g_idx is None:
            return  # without act-order the groups are contiguous whatever g_idx says
        index = list(layer.shard_offsets).index(shard)
        copy_rows(layer.g_idx, g_idx.reshape(1, -1).to(torch.int32), (index, 1), name)

    # --- after loading ------------------------------------------------------------------

    def process_after_loading(self, layer: nn.Module) -> None:
        self._apply_act_order(layer)
        if layer.qweight.is_cuda:
            from octavo.layers.quantization import triton_kernels

            if self.fused_max_tokens > 0 and triton_kernels.wna16_supported(layer, self):
                triton_kernels.pretune(layer.qweight, layer.scales, layer.zeros, self.layer_group_size(layer),
                                       self.bits, layer.scales.dtype, self.fused_max_tokens, self.paths)

    def _apply_act_order(self, layer: nn.Module) -> None:
        """Act-order checkpoints: one input permutation for the layer (the fused shards must agree)."""
        if layer.g_idx is None:
            return
        g_idx = layer.g_idx
        if not bool((g_idx == g_idx[0]).all()):
            raise ValueError(
                "the fused shards of this layer were quantized with different act-order permutations "
                "(g_idx); this is not supported."
            )
        perm = torch.argsort(g_idx[0], stable=True)
        group_size = self.layer_group_size(layer)
        expected = torch.arange(layer.in_features, device=perm.device) // group_size
        if not bool((g_idx[0][perm] == expected).all()):
            raise ValueError(f"g_idx does not give every group exactly {group_size} input rows.")
        layer.g_idx = None
        if bool((perm == torch.arange(layer.in_features, device=perm.device)).all()):
            return  # act-order checkpoint whose order is the identity
        values = unpack_int32(layer.qweight.data, self.bits, dim=0)[perm]
        layer.qweight.data = pack_int32(values, self.bits, dim=0)
        layer.perm = perm

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Uniform random integers with scales that give weights a standard deviation of about 0.02."""
        layer.qweight.random_(-(1 << 31), 1 << 31, generator=generator)  # every packed value uniform
        levels = 1 << self.bits
        value_std = ((levels * levels - 1) / 12) ** 0.5
        layer.scales.fill_(0.02 / value_std)
        if layer.zeros is not None:
            layer.zeros.fill_(levels // 2)
        if layer.g_idx is not None:
            group_size = self.layer_group_size(layer)
            layer.g_idx.copy_(torch.arange(layer.in_features).expand_as(layer.g_idx) // group_size)

    # --- compute ------------------------------------------------------------------------

    def dequantize(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The reference: the full [in, out] weight in ``dtype`` (rows in ``perm`` order)."""
        values = unpack_int32(layer.qweight, self.bits, dim=0)
        group_size = self.layer_group_size(layer)
        zeros = (layer.zeros.to(torch.int32) if layer.zeros is not None
                 else torch.full_like(layer.scales, 1 << (self.bits - 1), dtype=torch.int32))
        centred = values - zeros.repeat_interleave(group_size, dim=0)
        return (centred.float() * layer.scales.float().repeat_interleave(group_size, dim=0)).to(dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if layer.perm is not None:
            x = x[:, layer.perm]
        if x.is_cuda:
            from octavo.layers.quantization import triton_kernels

            if x.shape[0] <= self.fused_max_tokens and triton_kernels.wna16_supported(layer, self):
                out = triton_kernels.wna16_matmul(x, layer.qweight, layer.scales, layer.zeros,
                                                  self.layer_group_size(layer), self.bits, self.paths)
                return out if bias is None else out + bias
            weight = triton_kernels.wna16_dequantize(layer.qweight, layer.scales, layer.zeros,
                                                     self.layer_group_size(layer), self.bits, x.dtype)
        else:
            weight = self.dequantize(layer, x.dtype)
        out = x @ weight
        return out if bias is None else out + bias
