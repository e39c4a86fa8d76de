"""Linear layers that fuse several checkpoint matrices into one matmul.

Checkpoints store q/k/v (and gate/up) separately; one wider matmul is faster,
so the loader copies each checkpoint tensor into its slice of the fused weight.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """A linear layer whose output rows are the concatenation of named shards."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        offset, size = self.shard_offsets[shard]
        target = getattr(self, param)
        if target is None:
            raise ValueError(f"checkpoint has a {param} for shard {shard!r} but the layer has none.")
        if tensor.shape[0] != size or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(
                f"shard {shard!r} {param} has shape {tuple(tensor.shape)}, expected ({size}, {tuple(target.shape[1:])})."
            )
        with torch.no_grad():
            target[offset : offset + size].copy_(tensor)
