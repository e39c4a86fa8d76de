"""Block pool and KV cache manager: reference counts, copy-on-write, prefix index, no leaks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from octavo.kv_cache.block_pool import BlockPool, PrefixHasher
from octavo.kv_cache.manager import KVCacheManager

BLOCK_SIZE = 4


def test_pool_allocate_free_is_lifo_for_plain_blocks_and_detects_double_free():
    pool = BlockPool(4)
    a, b = pool.allocate(), pool.allocate()
    assert pool.num_free_blocks == 2
    pool.free(a)
    assert pool.allocate() is a  # a plain freed block is reused first
    pool.free(a)
    pool.free(b)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(b)
    pool.check_invariants()


def test_cached_blocks_survive_free_until_evicted_lru():
    pool = BlockPool(3)
    blocks = [pool.allocate() for _ in range(3)]
    for index, block in enumerate(blocks):
        pool.cache_block(block, bytes([index]) * 32)
    for block in blocks:
        pool.free(block)
    assert pool.lookup(bytes([1]) * 32) is blocks[1]
    pool.share(blocks[1])  # a prefix hit revives it
    assert pool.num_free_blocks == 2
    first = pool.allocate()  # evicts the least recently freed cached block
    assert first is blocks[0] and pool.lookup(bytes([0]) * 32) is None
    assert pool.num_evictions == 1
    pool.check_invariants()


def test_hasher_is_chained_seeded_and_salted():
    hasher = PrefixHasher(seed=b"s" * 32)
    first = hasher.block_hash(None, [1, 2, 3, 4])
    assert hasher.block_hash(None, [1, 2, 3, 4]) == first
    assert hasher.block_hash(first, [5, 6, 7, 8]) != hasher.block_hash(None, [5, 6, 7, 8])
    assert hasher.block_hash(None, [1, 2, 3, 4], b"salt") != first
    assert PrefixHasher().block_hash(None, [1, 2, 3, 4]) != first  # per-process seed


def test_fork_shares_blocks_and_first_write_copies_partial_block():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    assert manager.allocate_slots(0, 0, 6) == []  # 2 blocks, second half full
    manager.fork(0, 1)
    parent = manager.block_table(0)
    assert manager.block_table(1) == parent
    assert manager.stats().num_shared_blocks == 2
    copies = manager.allocate_slots(1, 6, 1)  # child writes position 6, inside the shared block
    assert copies == [(parent[1], manager.block_table(1)[1])]
    assert manager.block_table(1)[0] == parent[0]  # the full block stays shared
    assert manager.block_table(1)[1] != parent[1]
    assert manager.allocate_slots(0, 6, 1) == []  # the parent now owns its block alone
    manager.free(0)
    manager.free(1)
    assert manager.num_free_blocks == 8


def test_allocation_failure_changes_nothing():
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    assert manager.allocate_slots(0, 0, 8) == []
    before = manager.block_table(0)
    assert manager.allocate_slots(0, 8, 1) is None
    assert manager.block_table(0) == before
    assert manager.allocate_slots(1, 0, 1) is None
    assert 1 not in manager.tables


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token_to_compute():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    tokens = list(range(100, 112))  # exactly three full blocks
    manager.allocate_slots(0, 0, len(tokens))
    manager.cache_full_blocks(0, tokens, len(tokens))
    manager.free(0)
    hit = manager.find_cached_prefix(1, tokens)
    assert hit.num_tokens == 8  # the last block is recomputed to produce logits
    assert manager.allocate_slots(1, hit.num_tokens, 4, hit) == []
    assert manager.find_cached_prefix(2, tokens, extra_keys=b"other-salt").num_tokens == 0
    assert manager.find_cached_prefix(3, [7] + tokens[1:]).num_tokens == 0  # chained: first block differs


class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / prefix-hit sequences never leak or double-free."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = KVCacheManager(num_blocks=24, block_size=BLOCK_SIZE)
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.next_id = 0

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @rule(length=st.integers(1, 20), vocab=st.integers(1, 3))
    def add_sequence(self, length, vocab):
        seq_id = self._new_id()
        tokens = [i % vocab for i in range(length)]  # small vocab: prefixes repeat often
        hit = self.manager.find_cached_prefix(seq_id, tokens)
        copies = self.manager.allocate_slots(seq_id, hit.num_tokens, len(tokens) - hit.num_tokens, hit)
        if copies is None:
            self.manager.forget(seq_id)
            return
        self.tokens[seq_id] = tokens
        self.computed[seq_id] = len(tokens)
        self.manager.cache_full_blocks(seq_id, tokens, len(tokens))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), count=st.integers(1, 6))
    def append(self, data, count):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        if self.manager.allocate_slots(seq_id, self.computed[seq_id], count) is None:
            return
        self.tokens[seq_id] += [seq_id % 5] * count
        self.computed[seq_id] += count
        self.manager.cache_full_blocks(seq_id, self.tokens[seq_id], self.computed[seq_id])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.manager.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.computed[child] = self.computed[parent]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.free(seq_id)
        self.manager.forget(seq_id)
        del self.tokens[seq_id], self.computed[seq_id]

    @invariant()
    def reference_counts_match_tables(self):
        pool = self.manager.pool
        pool.check_invariants()
        references = Counter(block.block_id for table in self.manager.tables.values() for block in table)
        for block in pool.blocks:
            assert block.ref_count == references.get(block.block_id, 0)
        assert pool.num_free_blocks == pool.num_blocks - len(references)
        for seq_id, table in self.manager.tables.items():
            assert len(table) == -(-self.computed[seq_id] // BLOCK_SIZE)
            assert self.manager.block_table(seq_id) == [block.block_id for block in table]

    def teardown(self):
        for seq_id in list(self.tokens):
            self.manager.free(seq_id)
        assert self.manager.pool.num_free_blocks == self.manager.pool.num_blocks
        assert all(block.ref_count == 0 for block in self.manager.pool.blocks)


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_gpu_share_ignores_memory_other_engines_hold(monkeypatch):
    """The KV budget is this engine's share minus its own weights (measured in this process) and
    activation peak: a second engine gets the same budget as the first, not what the first left."""
    from octavo.worker import kv_cache_memory

    gib = 2**30
    total = 80 * gib
    card = {"free": 56 * gib, "reserved": 24 * gib}  # another engine in this process holds 24 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card["free"], total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: card["reserved"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    device = torch.device("cuda")
    reserved_at_start = kv_cache_memory.check_cuda_share(device, 0.3)
    card["free"] -= 2 * gib  # this engine loads 2 GiB of weights...
    card["reserved"] += 2 * gib
    card["free"] -= 10 * gib  # ...while another process takes 10 GiB, which is not this engine's
    assert kv_cache_memory.cuda_kv_cache_bytes(device, 0.3, gib, reserved_at_start) == int(total * 0.3) - 3 * gib
    # Never more than is free now.
    card["free"] = 5 * gib
    assert kv_cache_memory.cuda_kv_cache_bytes(device, 0.3, gib, reserved_at_start) == 4 * gib
    # A share larger than what is free at start is refused up front, with the numbers to change.
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.9 asks for 72.00 GiB, but only 5.00 GiB"):
        kv_cache_memory.check_cuda_share(device, 0.9)
    # Weights that leave nothing of the share for the cache are refused too.
    card.update(free=40 * gib, reserved=24 * gib + 23 * gib)
    with pytest.raises(RuntimeError, match="no GPU memory left for the KV cache"):
        kv_cache_memory.cuda_kv_cache_bytes(device, 0.3, 2 * gib, reserved_at_start)
