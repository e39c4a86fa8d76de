"""This process's place in a tensor-parallel group, and the collectives the layers use.

Layers read the group when they are built (how many rows of each weight this rank holds) and
when they run (the all-reduce after a row-parallel projection, the gather of the vocabulary
shards of the logits). Outside tensor parallelism the group is rank 0 of 1 and every
collective is the identity, so single-device models never touch ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def shard(self, size: int, what: str) -> tuple[int, int]:
        """(start, size) of this rank's equal share of ``size`` rows; they must divide evenly."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) is not divisible by tensor_parallel_size ({self.world_size}).")
        local = size // self.world_size
        return self.rank * local, local

    def padded_shard(self, size: int) -> tuple[int, int]:
        """(start, size) of this rank's share of ``size`` rows padded up to a multiple of the
        world size (a vocabulary): the last ranks may hold padding rows past ``size``."""
        local = -(-size // self.world_size)
        return self.rank * local, local

    def attention_heads(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(start, count) of this rank's query heads and of its key/value heads. Key/value heads
        are split like the query heads, or, where there are fewer of them than ranks, each rank
        keeps a copy of the one its query heads read."""
        query = self.shard(num_heads, "the number of attention heads")
        if num_kv_heads >= self.world_size:
            return query, self.shard(num_kv_heads, "the number of key/value heads")
        if self.world_size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({self.world_size}) must be a multiple of the number of "
                             f"key/value heads ({num_kv_heads}) when it exceeds it.")
        return query, (self.rank * num_kv_heads // self.world_size, 1)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op on one rank)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks, in place (a no-op on one rank)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather_last_dim(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """Concatenate every rank's ``tensor`` along its last dimension, on rank 0 only (the other
        ranks get ``None``)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.is_first else None
        dist.gather(tensor, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.is_first else None

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=0)
        return tensor


_GROUP = TensorParallelGroup()


def tp_group() -> TensorParallelGroup:
    return _GROUP


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float) -> TensorParallelGroup:
    """Join the group (NCCL on CUDA, gloo on CPU). ``timeout_s`` bounds every collective, so a
    rank that stops answering fails the others instead of hanging them."""
    global _GROUP
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; tensor parallelism "
                           "needs its own process group (one engine with tensor_parallel_size > 1 per process).")
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = dict(device_id=device) if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **options)
    _GROUP = TensorParallelGroup(rank, world_size)
    return _GROUP


def destroy_tensor_parallel() -> None:
    global _GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = TensorParallelGroup()
