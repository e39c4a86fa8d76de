"""A token embedding split by vocabulary rows across tensor-parallel ranks.

Each rank holds rows ``[start, start + local)`` of the (padded) vocabulary; a token outside its
range looks up zeros, and one all-reduce sums the ranks' rows into every token's embedding.
On one rank it is a plain embedding lookup.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from octavo.layers.quantization.base import copy_rows
from octavo.layers.sharded_init import fill_normal_slice
from octavo.worker.parallel_state import tp_group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        group = tp_group()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.vocab_start, self.num_local = group.padded_shard(num_embeddings)
        self.num_real = max(0, min(self.num_local, num_embeddings - self.vocab_start))  # rows before padding
        self.sharded = group.world_size > 1
        dtype = torch.get_default_dtype()
        self.weight = nn.Parameter(torch.zeros(self.num_local, embedding_dim, dtype=dtype), requires_grad=False)

    def load_weight(self, tensor: torch.Tensor) -> None:
        """Keep this rank's rows of the full checkpoint embedding."""
        if tuple(tensor.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"has shape {tuple(tensor.shape)}, the model expects "
                             f"{(self.num_embeddings, self.embedding_dim)}.")
        copy_rows(self.weight, tensor.narrow(0, self.vocab_start, self.num_real), (0, self.num_real), "weight")

    def init_dummy(self, key: str, seed: int) -> None:
        fill_normal_slice(self.weight[: self.num_real], key, seed, (self.num_embeddings, self.embedding_dim),
                          self.vocab_start)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return nn.functional.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.num_local)
        embedded = nn.functional.embedding(local_ids.masked_fill(outside, 0), self.weight)
        embedded.masked_fill_(outside.unsqueeze(-1), 0.0)
        return tp_group().all_reduce(embedded)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows {self.vocab_start}..{self.vocab_start + self.num_local}"


def gather_vocab_logits(local_logits: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """The full-vocabulary logits from each rank's rows of a vocabulary-parallel LM head, on
    rank 0 (``None`` on the others), without the padding columns."""
    group = tp_group()
    if group.world_size == 1:
        return local_logits
    logits = group.gather_last_dim(local_logits)
    return logits[..., :vocab_size] if logits is not None else None
