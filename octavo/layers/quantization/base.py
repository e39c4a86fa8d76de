"""The interface between linear layers and weight formats.

A ``QuantizationConfig`` describes one checkpoint format (read from ``quantization_config`` in
config.json, or chosen with ``--quantization``) and hands every linear layer a ``LinearMethod``.
The method owns the layer's weight: it registers the parameters, copies checkpoint tensors into
them shard by shard (fused q/k/v and gate/up keep one scale set per shard), repacks them once
loading is done, and computes ``x @ W^T + bias``. Methods keep no per-layer state of their own:
everything lives on the layer, so one method object serves every layer of a config.

The layer (``octavo.layers.linear.Linear``) owns what every format shares: its shard table
(name -> (row offset, rows)), the bias, and the bookkeeping of which checkpoint tensors arrived.

A new format is a ``QuantizationConfig`` subclass (registered in ``QUANTIZATION_CONFIGS`` when
config.json can name it) and a ``LinearMethod``; model code never changes, since every model
builds its projections as ``Linear(..., quant_config=quant_config, prefix=...)``. A method may
store the shards of one fused layer in different sub-formats (e.g. GGUF block types per tensor).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

import torch
from torch import nn


class LinearMethod(ABC):
    """How one family of layers stores and multiplies its weight.

    ``layer.in_features``, ``layer.out_features`` and ``layer.shard_offsets`` are set before
    ``create_weights`` is called. A layer that is not fused has one shard named ``""``.
    A method with ``supports_tensor_parallel`` takes, in a layer split across ranks, this rank's
    part of each checkpoint tensor through ``load_local`` (see ``Linear``).
    """

    supports_tensor_parallel: ClassVar[bool] = False

    @abstractmethod
    def create_weights(self, layer: nn.Module, dtype: torch.dtype) -> None:
        """Register the layer's parameters (``dtype`` is the model's activation dtype). A method
        whose storage depends on the checkpoint may instead register them on the first ``load``."""

    @abstractmethod
    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        """The tensor names (the part after the module name, e.g. ``qweight``) every shard's
        checkpoint must provide; ``load`` may also accept optional ones not listed here."""

    @abstractmethod
    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        """Copy one checkpoint tensor (``<module>.<name>``) of ``shard`` into the layer.
        Raise ValueError naming the tensor when its name or shape does not fit."""

    def process_after_loading(self, layer: nn.Module) -> None:
        """Repack once every tensor is in (transpose, merge shard scales, sort act-order rows)."""

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Fill the layer with random weights of realistic magnitude (``load_format="dummy"``),
        in the state ``process_after_loading`` expects."""
        raise ValueError(f"{type(self).__name__} has no random (dummy) weights; load a checkpoint instead.")

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` of shape [tokens, in_features], in ``x``'s dtype."""


class QuantizationConfig(ABC):
    """One weight format, parsed and checked once; ``linear_method`` is asked per layer."""

    name: ClassVar[str]  # what --quantization / quantization_config.quant_method calls it
    # Whether every layer it quantizes can be split across tensor-parallel ranks.
    supports_tensor_parallel: ClassVar[bool] = False
    # fused module -> the checkpoint modules it stacks (qkv_proj -> q_proj, k_proj, v_proj); the
    # loader sets it from the model class so that ignore lists can name checkpoint modules.
    packed_modules: dict[str, tuple[str, ...]] = {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizationConfig":
        """Parse a checkpoint's ``quantization_config``; ValueError naming the field it cannot serve."""
        raise ValueError(f"the {cls.name} format is not described by a quantization_config in config.json.")

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer named ``prefix`` (its checkpoint module name, e.g.
        ``model.layers.0.mlp.down_proj``; a fused layer is asked once per checkpoint shard name
        and must get methods of one class for all). Layers the format leaves in full
        precision (``lm_head``, ignore lists) get ``UnquantizedLinearMethod()``."""

    def check_dtype(self, dtype: torch.dtype) -> None:
        """ValueError when the format cannot compute in the model's ``dtype``."""

    def method_for(self, prefix: str) -> LinearMethod:
        """``linear_method`` for the layer ``prefix``, asking a fused layer under each name it stacks."""
        parent, _, leaf = prefix.rpartition(".")
        names = [".".join(filter(None, [parent, part])) for part in self.packed_modules.get(leaf, (leaf,))]
        methods = [self.linear_method(name) for name in names]
        if len({type(method) for method in methods}) > 1:
            raise ValueError(
                f"{', '.join(names)} are fused into one layer but the checkpoint stores them in different "
                f"formats ({', '.join(type(m).__name__ for m in methods)}); this is not supported."
            )
        return methods[0]


class UnquantizedLinearMethod(LinearMethod):
    """A plain ``weight`` of shape [out_features, in_features] in the model's dtype."""

    supports_tensor_parallel = True

    def create_weights(self, layer: nn.Module, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=dtype),
                                    requires_grad=False)

    def checkpoint_tensors(self, layer: nn.Module) -> tuple[str, ...]:
        return ("weight",)

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: str) -> None:
        if name != "weight":
            raise ValueError(f"unexpected tensor {name!r} for an unquantized linear layer.")
        copy_rows(layer.weight, tensor, layer.shard_offsets[shard], name)

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> None:
        layer.weight.normal_(0.0, 0.02, generator=generator)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return nn.functional.linear(x, layer.weight, bias)


def copy_rows(target: torch.Tensor, tensor: torch.Tensor, rows: tuple[int, int], name: str, dim: int = 0) -> None:
    """Copy ``tensor`` into ``target``'s slice ``rows`` = (offset, size) along ``dim``, checking shapes."""
    offset, size = rows
    expected = list(target.shape)
    expected[dim] = size
    if list(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}.")
    with torch.no_grad():
        target.narrow(dim, offset, size).copy_(tensor)


def matches_module_list(prefix: str, names: list[str]) -> bool:
    """Whether the layer ``prefix`` is in an ignore list: an exact name, a ``re:`` regular expression
    (compressed-tensors), or a name the prefix ends with (lists may omit the model prefix)."""
    for name in names:
        if name.startswith("re:"):
            if re.fullmatch(name[3:], prefix):
                return True
        elif prefix == name or prefix.endswith("." + name):
            return True
    return False
