"""Sequence state: the unit the scheduler moves between waiting and running.

A request with ``n`` samples owns ``n`` sequences; each has its own tokens,
block table and progress counter. ``num_computed_tokens`` is how many of
``token_ids`` have K/V in the cache; everything after it still has to run.

With asynchronous scheduling a sampled token may still be on the device when the next
step is planned: ``num_pending_tokens`` counts those. They are part of ``num_tokens``
(the scheduler plans for them) but not of ``token_ids`` until the host receives them.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Optional

import torch

from octavo.sampling_params import SamplingParams

if TYPE_CHECKING:
    from octavo.structured_output import SequenceGrammar


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"


_FINISHED = frozenset(
    {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED}
)


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: int,
        sample_index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        generator: Optional[torch.Generator] = None,
        cache_salt: Optional[str] = None,
        arrival_time: Optional[float] = None,
        count_prefix_stats: bool = True,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.sample_index = sample_index
        self.params = params
        self.max_tokens = max_tokens  # resolved: params.max_tokens or what fits max_model_len
        self.generator = generator
        # Structured output: this sequence's own grammar matcher (SequenceGrammar), if constrained.
        self.grammar: Optional["SequenceGrammar"] = None
        self.cache_salt_key: Optional[bytes] = cache_salt.encode() if cache_salt else None
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.count_prefix_stats = count_prefix_stats  # beam search's own look-ups stay out of the hit rate
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0  # sampled on the device, values not yet on the host
        self.num_cached_prompt_tokens = 0  # from the prefix cache, first scheduling only
        # Token positions below this can be written without asking the KV manager: its blocks are
        # allocated and privately held. Set after each allocation, cleared when blocks are freed
        # or shared (a fork), so a steady decode step skips the manager for most sequences.
        self.writable_until = 0
        self.status = SequenceStatus.WAITING
        self.stop_reason: Optional[int | str] = None
        self.cumulative_logprob = 0.0  # tracked only when reported (logprobs) or ranked (best_of)
        self.num_preemptions = 0
        # Siblings (n > 1, best_of) that fork from this sequence once its prompt is computed,
        # sharing its blocks instead of computing the prompt again.
        self.pending_forks: list[Sequence] = []
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        # Prompt logprobs are gathered by the first sample only; entry 0 (no context) is None.
        self.prompt_logprobs: Optional[list] = (
            [None] if params.prompt_logprobs is not None and sample_index == 0 else None
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finishes_when_pending_arrive(self) -> bool:
        """Its pending tokens reach max_tokens: nothing more to compute for it."""
        return self.num_pending_tokens > 0 and self.num_output_tokens + self.num_pending_tokens >= self.max_tokens

    @property
    def status(self) -> SequenceStatus:
        return self._status

    @status.setter
    def status(self, status: SequenceStatus) -> None:
        self._status = status
        # A plain attribute, kept with the status: read per sequence per step.
        self.is_finished = status in _FINISHED

    def fork_from(self, parent: "Sequence") -> None:
        """Take the parent's progress; the KV manager shares its blocks separately.

        Only tokens the host knows count as computed: with a step in flight the parent has
        already moved on to its first sampled token, which is not the child's.
        """
        self.token_ids = list(parent.token_ids)
        self.num_computed_tokens = min(parent.num_computed_tokens, len(parent.token_ids))
        self.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
        self.first_scheduled_time = parent.first_scheduled_time
        self.status = SequenceStatus.RUNNING

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
