"""What attention needs to know about a flat, unpadded batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class AttentionMetadata:
    """Token ``t`` of the step belongs to sequence ``b`` where
    ``query_start_loc[b] <= t < query_start_loc[b + 1]``; its K/V goes to cache slot
    ``slot_mapping[t]``. Sequence ``b`` has ``seq_lens[b]`` tokens in the cache after
    the write, the new ones last; its blocks are ``block_tables[b]``.
    """

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64; < 0 = padding, not written
    max_query_len: int
    max_seq_len: int
    # Host copies so the reference path can loop without device syncs.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # The batch's first ``num_decodes`` sequences run one query token each. A mixed batch
    # lists them first so that attention can hand them to the decode kernel as one block and
    # the rest, described by ``prefill``, to the prefill kernel.
    num_decodes: int = 0
    prefill: Optional["PrefillPart"] = None  # set only for a mixed batch
    # What a backend derives from this metadata once per step and reuses in every layer.
    per_step: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class PrefillPart:
    """The sequences after the leading decodes of a mixed batch, indexed from 0."""

    query_start_loc: torch.Tensor  # [num_prefills + 1] int32, starting at 0
    seq_lens: torch.Tensor  # [num_prefills] int32
    block_tables: torch.Tensor  # [num_prefills, max_blocks_per_seq] int32
