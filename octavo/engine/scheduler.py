"""Iteration-level scheduling: which sequences run this step, and how many tokens each.

The policy, in order:
1. Running sequences first, in the order they (re)joined: a decode needs one token, an
   unfinished prompt its next chunk. If the cache cannot hold them, the newest
   running sequence is preempted (its blocks freed, recomputed later) until the
   older ones fit.
2. Then waiting sequences, first come first served, while the step's token
   budget and ``max_num_seqs`` allow. A long prompt takes what is left of the
   budget and continues next step (chunked prefill). A prompt that does not fit
   in the cache waits; nothing jumps the queue.
3. A prompt's chunk leaves one token of the budget for each decode behind it, and with
   ``long_prefill_token_threshold`` set it takes at most that many tokens while other
   requests wait: one long prompt never stalls the others.

Prefill and decode are not separate phases: every sequence simply has
``num_tokens - num_computed_tokens`` tokens left to run.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from octavo.engine.request import Sequence, SequenceStatus
from octavo.kv_cache.manager import KVCacheManager, PrefixHit


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        long_prefill_token_threshold: Optional[int] = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management ---------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take a sequence out of the queues for good and release its blocks."""
        seq.status = status
        seq.writable_until = 0
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache.free(seq.seq_id)
        self.kv_cache.forget(seq.seq_id)

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            if not seq.is_finished:
                self.finish(seq, SequenceStatus.FINISHED_ABORTED)

    # ---- the policy ---------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        running = self.running
        seqs, counts = batch.seqs, batch.num_new_tokens

        # A prompt's chunk leaves one token for every decode behind it in the running order;
        # counted when the first chunk needs it (a pure decode step never does).
        decodes_behind: Optional[int] = None
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            index += 1
            # Sequence.finishes_when_pending_arrive and num_uncomputed_tokens, inlined (hot).
            pending, num_known = seq.num_pending_tokens, len(seq.token_ids)
            if pending and num_known - seq.num_prompt_tokens + pending >= seq.max_tokens:
                continue  # its last token is still on the device; it finishes on arrival
            num_computed = seq.num_computed_tokens
            num_uncomputed = num_known + pending - num_computed
            if num_uncomputed == 1:
                if decodes_behind is not None:
                    decodes_behind -= 1
                if num_computed < seq.writable_until:
                    # The common decode step: its slot is allocated and its own, no manager call.
                    seqs.append(seq)
                    counts.append(1)
                    budget -= 1
                    continue
                num_new = 1
            else:
                if decodes_behind is None:
                    decodes_behind = sum(other.num_uncomputed_tokens == 1 for other in running[index:])
                num_new = min(num_uncomputed, self._chunk_limit(budget - decodes_behind, len(self.waiting)))
                if num_new <= 0:
                    continue
            copies = self._allocate_or_preempt(seq, num_new, batch)
            if copies is None:
                break  # ``seq`` itself was preempted: it was the newest
            seqs.append(seq)
            counts.append(num_new)
            batch.block_copies.extend(copies)
            budget -= num_new

        # Admitting new work right after preempting would only thrash.
        if batch.num_preempted == 0:
            budget = self._admit_waiting(batch, budget)
        return batch

    def _chunk_limit(self, budget: int, num_waiting_behind: int) -> int:
        """Tokens one sequence may take now: the budget, capped while others wait."""
        cap = self.long_prefill_token_threshold
        return min(budget, cap) if cap is not None and num_waiting_behind > 0 else budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, batch: ScheduledBatch):
        while True:
            copies = self.kv_cache.allocate_slots(seq.seq_id, seq.num_computed_tokens, num_new)
            if copies is not None:
                seq.writable_until = self.kv_cache.num_allocated_slots(seq.seq_id)
                return copies
            victim = self.running.pop()
            self._preempt(victim)
            batch.num_preempted += 1
            if victim is seq:
                return None

    def _preempt(self, seq: Sequence) -> None:
        """Recompute policy: drop the K/V and put the sequence back at the head of the queue."""
        self.kv_cache.free(seq.seq_id)
        seq.writable_until = 0
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> int:
        if not self.waiting:
            return budget
        # Siblings waiting to fork from running sequences will need seats too.
        num_seats_taken = len(self.running) + sum(len(seq.pending_forks) for seq in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if num_seats_taken + 1 + len(seq.pending_forks) > self.max_num_seqs:
                break
            if seq.params.prompt_logprobs is not None:
                hit = PrefixHit([], 0)  # every prompt position must run to get its logprobs
            else:
                hit = self.kv_cache.find_cached_prefix(seq.seq_id, seq.token_ids, seq.cache_salt_key)
            num_computed = hit.num_tokens
            remaining = seq.num_tokens - num_computed
            if remaining > budget and not self.enable_chunked_prefill:
                break
            num_new = min(remaining, self._chunk_limit(budget, len(self.waiting) - 1))
            copies = self.kv_cache.allocate_slots(seq.seq_id, num_computed, num_new, hit)
            if copies is None:
                break
            seq.writable_until = self.kv_cache.num_allocated_slots(seq.seq_id)
            self.waiting.popleft()
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_prompt_tokens = min(num_computed, seq.num_prompt_tokens)
                if seq.count_prefix_stats:
                    self.kv_cache.record_prefix_query(seq.num_prompt_tokens, seq.num_cached_prompt_tokens)
            seq.num_computed_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seats_taken += 1 + len(seq.pending_forks)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            batch.block_copies.extend(copies)
            budget -= num_new
        return budget

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Start a sequence's pending siblings: they share its blocks and run from the next step."""
        children, parent.pending_forks = parent.pending_forks, []
        parent.writable_until = 0  # its partly filled block becomes shared: the next write copies it
        for order, child in enumerate(children):
            child.writable_until = 0
            child.fork_from(parent)
            if parent.status is SequenceStatus.RUNNING:
                self.kv_cache.fork(parent.seq_id, child.seq_id, child.num_computed_tokens)
                self.running.append(child)
            else:
                # The parent was preempted while its step was in flight: the child recomputes
                # the prompt too, queued right behind it.
                child.num_computed_tokens = 0
                child.status = SequenceStatus.WAITING
                self.waiting.insert(self.waiting.index(parent) + 1 + order, child)
        return children

    def on_step_launched(self, batch: ScheduledBatch) -> None:
        """The batch's tokens are (being) computed: advance the progress counters."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if not seq.is_finished:
                seq.num_computed_tokens += num_new

    def cache_full_blocks(self, seqs: Iterable[Sequence]) -> None:
        """Index the blocks that filled up, once the host knows every token in them."""
        for seq in seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished, or preempted while its step was in flight
            self.kv_cache.cache_full_blocks(
                seq.seq_id, seq.token_ids, min(seq.num_computed_tokens, len(seq.token_ids)), seq.cache_salt_key
            )

    def kv_slot_usage(self) -> tuple[int, int]:
        """(allocated, filled) token slots over running sequences."""
        allocated = sum(self.kv_cache.num_allocated_slots(seq.seq_id) for seq in self.running)
        return allocated, sum(seq.num_computed_tokens for seq in self.running)

    def kv_waste_slots(self) -> int:
        """Allocated-but-unfilled token slots over running sequences (PagedAttention's waste)."""
        allocated, filled = self.kv_slot_usage()
        return allocated - filled
