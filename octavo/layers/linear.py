"""Linear layers whose weight format is chosen by a quantization config.

Every projection in a model is a ``Linear``: with no quantization config it holds a plain
``weight``; with one, the config's ``LinearMethod`` decides the parameters and the matmul.
Checkpoints store q/k/v (and gate/up) separately; one wider matmul is faster, so a
``MergedLinear`` stacks several checkpoint matrices ("shards") along its output rows and the
loader copies each into its slice. Quantized shards keep their own scales.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from octavo.layers.quantization.base import LinearMethod, QuantizationConfig, UnquantizedLinearMethod, copy_rows


class Linear(nn.Module):
    """``y = x @ W^T + b``; ``out_features`` is a size, or shard name -> size for a fused layer.

    ``prefix`` is the layer's module name in the checkpoint (``model.layers.0.mlp.down_proj``):
    a quantization config uses it to leave some layers (``lm_head``, ignore lists) unquantized.
    """

    def __init__(self, in_features: int, out_features: Union[int, dict[str, int]], bias: bool,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__()
        shard_sizes = out_features if isinstance(out_features, dict) else {"": out_features}
        self.in_features = in_features
        self.out_features = sum(shard_sizes.values())
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.quant_method: LinearMethod = (
            quant_config.method_for(prefix) if quant_config is not None else UnquantizedLinearMethod()
        )
        dtype = torch.get_default_dtype()
        self.quant_method.create_weights(self, dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._loaded: set[tuple[str, str]] = set()

    def load_shard(self, shard: str, name: str, tensor: torch.Tensor) -> None:
        """Copy the checkpoint tensor ``<shard's module>.<name>`` into this layer; shard ``""`` of a
        fused layer is the whole layer, as some checkpoints store it (Phi-3's ``qkv_proj``)."""
        if shard == "" and shard not in self.shard_offsets:
            self._load_whole(name, tensor)
            return
        if shard not in self.shard_offsets:
            raise ValueError(f"layer has no shard {shard!r} (it has {', '.join(map(repr, self.shard_offsets))}).")
        if name == "bias":
            if self.bias is None:
                raise ValueError(f"checkpoint has a bias for shard {shard!r} but the layer has none.")
            copy_rows(self.bias, tensor, self.shard_offsets[shard], "bias")
        else:
            self.quant_method.load(self, name, tensor, shard)
        self._loaded.add((shard, name))

    def _load_whole(self, name: str, tensor: torch.Tensor) -> None:
        whole = (0, self.out_features)
        if name == "bias":
            if self.bias is None:
                raise ValueError("checkpoint has a bias but the layer has none.")
            copy_rows(self.bias, tensor, whole, "bias")
        elif name == "weight" and self._takes_plain_weight():
            if tensor.shape[0] != self.out_features:
                raise ValueError(f"weight has {tensor.shape[0]} rows, expected {self.out_features}.")
            for shard, (offset, size) in self.shard_offsets.items():
                self.quant_method.load(self, name, tensor[offset : offset + size], shard)
        else:
            raise ValueError(
                f"the checkpoint stores the fused shards {', '.join(self.shard_offsets)} of this layer as one "
                f"quantized tensor ({name}); quantized fused layers must be stored shard by shard."
            )
        self._loaded.update((shard, name) for shard in self.shard_offsets)

    def _takes_plain_weight(self) -> bool:
        """The checkpoint weight is a full-precision [out, in] matrix (split by rows into shards)."""
        return isinstance(self.quant_method, UnquantizedLinearMethod) or getattr(self.quant_method, "online", False)

    def missing_tensors(self) -> list[tuple[str, str]]:
        """(shard, tensor name) pairs the checkpoint has not provided yet."""
        names = self.quant_method.checkpoint_tensors(self) + (("bias",) if self.bias is not None else ())
        return [(shard, name) for shard in self.shard_offsets for name in names if (shard, name) not in self._loaded]

    def process_after_loading(self) -> None:
        self.quant_method.process_after_loading(self)
        self._loaded.clear()

    def init_dummy(self, generator: torch.Generator) -> None:
        self.quant_method.init_dummy(self, generator)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        out = self.quant_method.apply(self, x.reshape(-1, self.in_features), self.bias)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={type(self.quant_method).__name__}")


class MergedLinear(Linear):
    """A linear layer whose output rows are the concatenation of named shards."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__(in_features, dict(shard_sizes), bias, quant_config, prefix)
