"""Per-sequence block tables on top of the block pool.

Tables grow on demand as tokens are scheduled, forks share blocks by reference
count, and the first write into a shared, partly filled block copies it first
(copy-on-write). Full blocks are indexed by a chained hash so that a later
sequence with the same prefix reuses them instead of recomputing.
"""

from __future__ import annotations

from collections import abc
from dataclasses import dataclass
from typing import Optional, Sequence

from octavo.kv_cache.block_pool import BlockPool, KVBlock, PrefixHasher


@dataclass
class KVCacheStats:
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens found
    num_shared_blocks: int  # blocks referenced by more than one sequence
    blocks_saved_by_sharing: int  # references beyond the first, summed
    # Token slots in running sequences' blocks, as each sequence sees its table (filled in by the engine,
    # which knows how many tokens each has computed): the gap is PagedAttention's internal waste.
    num_allocated_slots: int = 0
    num_filled_slots: int = 0

    @property
    def num_wasted_slots(self) -> int:
        return self.num_allocated_slots - self.num_filled_slots

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks


@dataclass
class PrefixHit:
    blocks: list[KVBlock]
    num_tokens: int


class BatchBlockTables(abc.Sequence):
    """The block tables of a batch's sequences (anything with a ``seq_id``), each read when it
    is indexed: a steady decode step reads only the few that just grew."""

    def __init__(self, manager: "KVCacheManager", seqs: Sequence) -> None:
        self._manager, self._seqs = manager, seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def __getitem__(self, row: int) -> list[int]:
        return self._manager.block_table(self._seqs[row].seq_id)


def _writable(block: KVBlock) -> bool:
    """Whether a sequence may write into a partly computed block in place: only if nobody
    else holds it and it is not in the prefix index. (An indexed block can be partly
    computed for a forked child whose parent filled it with a step in flight; writing the
    child's tokens there would change what the index promises.)"""
    return block.ref_count == 1 and block.block_hash is None


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hasher: Optional[PrefixHasher] = None,
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.hasher = hasher or PrefixHasher()
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[int, list[KVBlock]] = {}
        # The same tables as plain block ids, kept in step so the runner reads them without copying.
        self._block_ids: dict[int, list[int]] = {}
        # Per sequence: hashes of its full blocks, in order (the chain), and how many are indexed.
        self._block_hashes: dict[int, list[bytes]] = {}
        self._num_indexed: dict[int, int] = {}  # leading blocks of each table already offered to the index
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's physical block ids, in order (a live view: do not modify)."""
        return self._block_ids.get(seq_id, [])

    def num_allocated_slots(self, seq_id: int) -> int:
        return len(self.tables.get(seq_id, ())) * self.block_size

    # ---- prefix cache -------------------------------------------------------------------
    def _hash_chain(
        self, seq_id: int, token_ids: Sequence[int], num_full_blocks: int, extra_keys: Optional[bytes]
    ) -> list[bytes]:
        """Hashes of the first ``num_full_blocks`` blocks, extending the memoised chain."""
        hashes = self._block_hashes.setdefault(seq_id, [])
        size = self.block_size
        while len(hashes) < num_full_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else None
            tokens = token_ids[index * size : (index + 1) * size]
            hashes.append(self.hasher.block_hash(parent, tokens, extra_keys))
        return hashes

    def find_cached_prefix(
        self, seq_id: int, token_ids: Sequence[int], extra_keys: Optional[bytes] = None
    ) -> PrefixHit:
        """Longest run of cached full blocks at the start of ``token_ids``.

        At least one token is always left to compute: the model must run on the
        last prompt token to produce the logits of the first output token.
        """
        if not self.enable_prefix_caching:
            return PrefixHit([], 0)
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self._hash_chain(seq_id, token_ids, max_blocks, extra_keys)
        blocks: list[KVBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(blocks, len(blocks) * self.block_size)

    def record_prefix_query(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(
        self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int, extra_keys: Optional[bytes] = None
    ) -> None:
        """Index blocks whose every slot now holds computed K/V."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        first_new = self._num_indexed.get(seq_id, 0)
        if num_full <= first_new:
            return  # the common decode step: no block filled up
        hashes = self._hash_chain(seq_id, token_ids, num_full, extra_keys)
        for index in range(first_new, num_full):
            self.pool.cache_block(table[index], hashes[index])
        self._num_indexed[seq_id] = num_full

    # ---- allocation ---------------------------------------------------------------------
    def allocate_slots(
        self,
        seq_id: int,
        num_computed_tokens: int,
        num_new_tokens: int,
        prefix_hit: Optional[PrefixHit] = None,
    ) -> Optional[list[tuple[int, int]]]:
        """Make room to write tokens ``[num_computed, num_computed + num_new)``.

        Returns the (source, destination) block copies that copy-on-write needs
        before the step runs, or ``None`` (with nothing changed) if the pool has
        too few free blocks.
        """
        table = self.tables.get(seq_id)
        if table is not None and prefix_hit is None:
            # The common decode step: the slot is already allocated in a block this sequence owns.
            size = self.block_size
            fits = num_computed_tokens + num_new_tokens <= len(table) * size
            if fits and (num_computed_tokens % size == 0 or _writable(table[num_computed_tokens // size])):
                return []
        table = self.tables.setdefault(seq_id, [])
        hit_blocks = prefix_hit.blocks if prefix_hit else []
        if hit_blocks and table:
            raise RuntimeError("a prefix hit can only seed an empty block table.")
        num_owned = len(table) + len(hit_blocks)
        num_new_blocks = max(0, self.blocks_for_tokens(num_computed_tokens + num_new_tokens) - num_owned)
        write_index = num_computed_tokens // self.block_size
        needs_copy = (
            num_computed_tokens % self.block_size != 0
            and write_index < len(table)
            and not _writable(table[write_index])
        )
        # Reviving a free cached block takes it out of the free queue, so it counts too.
        num_revived = sum(1 for block in hit_blocks if block.ref_count == 0)
        if num_new_blocks + int(needs_copy) + num_revived > self.pool.num_free_blocks:
            if not table:
                del self.tables[seq_id]
            return None
        ids = self._block_ids.setdefault(seq_id, [])
        for block in hit_blocks:
            self.pool.share(block)
        table.extend(hit_blocks)
        ids.extend(block.block_id for block in hit_blocks)
        copies: list[tuple[int, int]] = []
        if needs_copy:
            shared = table[write_index]
            private = self.pool.allocate()
            copies.append((shared.block_id, private.block_id))
            self.pool.free(shared)
            table[write_index] = private
            ids[write_index] = private.block_id
        new_blocks = self.pool.allocate_many(num_new_blocks)
        table.extend(new_blocks)
        ids.extend(block.block_id for block in new_blocks)
        return copies

    def fork(self, parent_seq_id: int, child_seq_id: int, num_tokens: Optional[int] = None) -> None:
        """Give the child, by reference, the parent's blocks that hold its first ``num_tokens``
        tokens (default: all); writes copy later. A block the parent already took for a step
        still in flight is not the child's."""
        if child_seq_id in self.tables:
            raise RuntimeError(f"sequence {child_seq_id} already has a block table.")
        parent = self.tables[parent_seq_id]
        num_blocks = len(parent) if num_tokens is None else self.blocks_for_tokens(num_tokens)
        shared = parent[:num_blocks]
        for block in shared:
            self.pool.share(block)
        self.tables[child_seq_id] = list(shared)
        self._block_ids[child_seq_id] = self._block_ids[parent_seq_id][:num_blocks]
        self._num_indexed[child_seq_id] = min(self._num_indexed.get(parent_seq_id, 0), num_blocks)
        if parent_seq_id in self._block_hashes:
            self._block_hashes[child_seq_id] = self._block_hashes[parent_seq_id][:num_blocks]

    def free(self, seq_id: int) -> None:
        """Release a finished, aborted or preempted sequence's blocks (tail first, so
        the end of a prefix is evicted before its start)."""
        table = self.tables.pop(seq_id, None)
        self._block_ids.pop(seq_id, None)
        self._num_indexed.pop(seq_id, None)
        if table:
            self.pool.free_all(reversed(table))

    def forget(self, seq_id: int) -> None:
        """Drop memoised hashes once a sequence is gone for good."""
        self._block_hashes.pop(seq_id, None)

    # ---- stats --------------------------------------------------------------------------
    def stats(self) -> KVCacheStats:
        references = [block.ref_count for block in self.pool.blocks if block.ref_count > 0]
        return KVCacheStats(
            num_blocks=self.pool.num_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            num_free_blocks=self.pool.num_free_blocks,
            num_cached_blocks=self.pool.num_cached_blocks,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_shared_blocks=sum(1 for count in references if count > 1),
            blocks_saved_by_sharing=sum(count - 1 for count in references),
        )
