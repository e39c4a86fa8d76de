"""Linear layers whose weight format is chosen by a quantization config.

Every projection in a model is a ``Linear``: with no quantization config it holds a plain
``weight``; with one, the config's ``LinearMethod`` decides the parameters and the matmul.
Checkpoints store q/k/v (and gate/up) separately; one wider matmul is faster, so a
``MergedLinear`` stacks several checkpoint matrices ("shards") along its output rows and the
loader copies each into its slice. Quantized shards keep their own scales.

Under tensor parallelism (Megatron-style) a layer is ``column`` parallel (each rank holds its
rows of every shard: q/k/v, gate/up, the LM head's vocabulary), ``row`` parallel (each rank
holds its columns and the partial products are summed with one all-reduce: o_proj, down_proj)
or replicated. The loader hands every rank the whole checkpoint tensor and the layer keeps its
own part, so no rank ever holds a full copy of a sharded weight on its device.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from octavo.layers.quantization.base import LinearMethod, QuantizationConfig, UnquantizedLinearMethod, copy_rows
from octavo.layers.sharded_init import fill_normal_slice
from octavo.worker.parallel_state import tp_group

PARALLEL_MODES = ("replicated", "column", "row", "vocab")


class Linear(nn.Module):
    """``y = x @ W^T + b``; ``out_features`` is a size, or shard name -> size for a fused layer.

    ``prefix`` is the layer's module name in the checkpoint (``model.layers.0.mlp.down_proj``):
    a quantization config uses it to leave some layers (``lm_head``, ignore lists) unquantized.
    ``parallel`` is how the layer splits across tensor-parallel ranks (``PARALLEL_MODES``;
    ``vocab`` is column parallel with the rows padded to a multiple of the ranks).
    ``shard_rows`` overrides a column-parallel shard's (start, size) in the checkpoint tensor,
    for key/value heads replicated on several ranks. Sizes are always the full model's.
    """

    def __init__(self, in_features: int, out_features: Union[int, dict[str, int]], bias: bool,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "",
                 parallel: str = "replicated", shard_rows: Optional[dict[str, tuple[int, int]]] = None) -> None:
        super().__init__()
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}.")
        group = tp_group()
        full_sizes = out_features if isinstance(out_features, dict) else {"": out_features}
        # shard -> (first checkpoint row this rank holds, rows it holds, rows in the checkpoint)
        self.shard_sources: dict[str, tuple[int, int, int]] = {}
        for name, size in full_sizes.items():
            if parallel == "column":
                start, local = (shard_rows or {}).get(name) or group.shard(size, f"{prefix} {name or 'output'} rows")
            elif parallel == "vocab":
                start, local = group.padded_shard(size)
            else:
                start, local = 0, size
            self.shard_sources[name] = (start, local, size)
        # (first checkpoint column this rank holds, columns it holds, columns in the checkpoint)
        in_start, in_local = group.shard(in_features, f"{prefix} input columns") if parallel == "row" else (0, in_features)
        self.input_source = (in_start, in_local, in_features)
        self.reduce_output = parallel == "row" and group.world_size > 1
        self.in_features = in_local
        self.out_features = sum(local for _, local, _ in self.shard_sources.values())
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, (_, local, _) in self.shard_sources.items():
            self.shard_offsets[name] = (offset, local)
            offset += local
        self.quant_method: LinearMethod = (
            quant_config.method_for(prefix) if quant_config is not None else UnquantizedLinearMethod()
        )
        if group.world_size > 1 and parallel != "replicated" and not self.quant_method.supports_tensor_parallel:
            raise ValueError(
                f"quantized weights ({type(self.quant_method).__name__}) do not support tensor parallelism yet; "
                "use tensor_parallel_size=1, FP8, or an unquantized checkpoint (quantization none)."
            )
        dtype = torch.get_default_dtype()
        self.quant_method.create_weights(self, dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Only a layer split across ranks narrows checkpoint tensors (quantized: FP8 only).
        self.sharded = (in_local != in_features
                        or any(local != full for _, local, full in self.shard_sources.values()))
        if self.sharded:  # vocabulary padding rows stay zero (their logits are dropped)
            with torch.no_grad():
                for tensor in (self.weight, self.bias):
                    if tensor is not None:
                        tensor.zero_()
        self._loaded: set[tuple[str, str]] = set()

    def local_rows(self, shard: str, values: torch.Tensor, name: str = "tensor") -> torch.Tensor:
        """This rank's rows of the checkpoint tensor ``name`` of ``shard`` (a weight, a bias or a
        per-row scale): all of them unless the layer splits its rows, fewer than the shard holds
        where it ends in vocabulary padding."""
        start, local, full = self.shard_sources[shard]
        if values.shape[0] != full:
            raise ValueError(f"{name} has {values.shape[0]} rows, expected {full}.")
        rows = max(0, min(local, full - start))
        return values if rows == full else values.narrow(0, start, rows)

    def local_part(self, shard: str, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """This rank's part of the checkpoint tensor of ``shard`` (its rows, and a weight's input
        columns) and the (offset, rows) it fills."""
        tensor = self.local_rows(shard, tensor, name)
        in_start, in_local, in_full = self.input_source
        if name == "weight" and in_local != in_full:
            tensor = tensor.narrow(1, in_start, in_local)
        return tensor, (self.shard_offsets[shard][0], tensor.shape[0])

    def load_shard(self, shard: str, name: str, tensor: torch.Tensor) -> None:
        """Copy the checkpoint tensor ``<shard's module>.<name>`` into this layer; shard ``""`` of a
        fused layer is the whole layer, as some checkpoints store it (Phi-3's ``qkv_proj``)."""
        if shard == "" and shard not in self.shard_offsets:
            self._load_whole(name, tensor)
            return
        if shard not in self.shard_offsets:
            raise ValueError(f"layer has no shard {shard!r} (it has {', '.join(map(repr, self.shard_offsets))}).")
        if name == "bias" and self.bias is None:
            raise ValueError(f"checkpoint has a bias for shard {shard!r} but the layer has none.")
        if self.sharded:
            self._load_local(shard, name, tensor)
        elif name == "bias":
            copy_rows(self.bias, tensor, self.shard_offsets[shard], "bias")
        else:
            self.quant_method.load(self, name, tensor, shard)
        self._loaded.add((shard, name))

    def _load_local(self, shard: str, name: str, tensor: torch.Tensor) -> None:
        """A sharded (always unquantized) layer keeps its rows (and columns) of the tensor."""
        if name == "bias" and self.reduce_output:  # added once, after the all-reduce
            copy_rows(self.bias, tensor, self.shard_offsets[shard], "bias")
            return
        if name != "bias" and not isinstance(self.quant_method, UnquantizedLinearMethod):
            self.quant_method.load_local(self, name, tensor, shard)
            return
        if name not in ("weight", "bias"):
            raise ValueError(f"unexpected tensor {name!r} for an unquantized linear layer.")
        part, rows = self.local_part(shard, name, tensor)
        copy_rows(self.weight if name == "weight" else self.bias, part, rows, name)

    def _load_whole(self, name: str, tensor: torch.Tensor) -> None:
        if self.sharded:
            self._load_whole_sharded(name, tensor)
            return
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

    def _load_whole_sharded(self, name: str, tensor: torch.Tensor) -> None:
        """A fused checkpoint tensor of a sharded layer: split it by the full shard sizes first."""
        if name == "bias" and self.bias is None:
            raise ValueError("checkpoint has a bias but the layer has none.")
        full_rows = sum(full for _, _, full in self.shard_sources.values())
        if tensor.shape[0] != full_rows:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {full_rows}.")
        start = 0
        for shard, (_, _, full) in self.shard_sources.items():
            self._load_local(shard, name, tensor.narrow(0, start, full))
            start += full
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

    def init_dummy(self, generator: torch.Generator, key: str = "", seed: int = 0) -> None:
        """Random weights; full-precision ones are drawn by ``key`` (the module name) and ``seed``
        alone, so every tensor-parallel split holds its part of the same weights."""
        if isinstance(self.quant_method, UnquantizedLinearMethod):
            in_start, _, in_full = self.input_source
            for shard, (start, local, full) in self.shard_sources.items():
                rows = max(0, min(local, full - start))
                target = self.weight.narrow(0, self.shard_offsets[shard][0], rows)
                fill_normal_slice(target, f"{key}.{shard}", seed, (full, in_full), start, in_start)
        else:
            self.quant_method.init_dummy(self, generator)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        if self.reduce_output:  # partial sums over this rank's columns; the bias goes in once
            out = tp_group().all_reduce(self.quant_method.apply(self, x.reshape(-1, self.in_features), None))
            if self.bias is not None:
                out = out + self.bias
        else:
            out = self.quant_method.apply(self, x.reshape(-1, self.in_features), self.bias)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={type(self.quant_method).__name__}")


class MergedLinear(Linear):
    """A linear layer whose output rows are the concatenation of named shards."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "",
                 parallel: str = "replicated", shard_rows: Optional[dict[str, tuple[int, int]]] = None) -> None:
        super().__init__(in_features, dict(shard_sizes), bias, quant_config, prefix, parallel, shard_rows)
