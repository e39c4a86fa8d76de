"""Physical KV blocks: reference counts, an O(1) free queue, and the prefix-hash index.

A block with ``ref_count == 0`` sits in the free queue in LRU order. If it holds a
full, hashed block it also stays findable in the prefix index until it is handed
out again, so freed prompts can be reused until memory is actually needed.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: Optional[bytes] = None  # set once the block is full and indexed

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count})"


class PrefixHasher:
    """Chained SHA-256 over full blocks: hash(parent, token ids, extra keys).

    Seeded with per-process random bytes so that hashes cannot be predicted or
    precomputed by a client trying to collide with another tenant's prefix.
    """

    def __init__(self, seed: Optional[bytes] = None) -> None:
        self.seed = seed if seed is not None else os.urandom(32)

    def block_hash(
        self, parent: Optional[bytes], token_ids: Sequence[int], extra_keys: Optional[bytes] = None
    ) -> bytes:
        digest = hashlib.sha256(self.seed)
        digest.update(parent or b"\0" * 32)
        digest.update(array("q", token_ids).tobytes())
        if extra_keys:
            digest.update(b"\xff")
            digest.update(extra_keys)
        return digest.digest()


class BlockPool:
    """Owns every physical block of the KV cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, oldest first. OrderedDict gives O(1) pop-front, append and removal.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def shuffle_free_queue(self, rng) -> None:
        """Randomise allocation order (tests use it to prove blocks need not be contiguous)."""
        order = list(self._free.values())
        rng.shuffle(order)
        self._free = OrderedDict((b.block_id, b) for b in order)

    def allocate(self) -> KVBlock:
        """Take the least recently freed block, evicting its cached contents if any."""
        if not self._free:
            raise RuntimeError("KV cache out of blocks; the scheduler must check before allocating.")
        _, block = self._free.popitem(last=False)
        self._evict(block)
        block.ref_count = 1
        return block

    def allocate_many(self, count: int) -> list[KVBlock]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks with {len(self._free)} free.")
        return [self.allocate() for _ in range(count)]

    def share(self, block: KVBlock) -> None:
        """Add a reference (fork or prefix hit); revives a free cached block."""
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def free(self, block: KVBlock) -> None:
        if block.ref_count <= 0:
            raise RuntimeError(f"double free of KV block {block.block_id}.")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block.block_id] = block
            if block.block_hash is None:
                # Nothing worth keeping: hand it out before blocks that hold cached prefixes.
                self._free.move_to_end(block.block_id, last=False)

    def free_all(self, blocks: Iterable[KVBlock]) -> None:
        for block in blocks:
            self.free(block)

    def lookup(self, block_hash: bytes) -> Optional[KVBlock]:
        return self._cached.get(block_hash) if self.enable_caching else None

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Index a block that just became full so later requests can reuse it."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # an identical block is already indexed; this one stays private
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                self.num_evictions += 1
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()

    def check_invariants(self) -> None:
        """Free queue holds exactly the unreferenced blocks; the index points at hashed blocks."""
        free_ids = set(self._free)
        for block in self.blocks:
            assert block.ref_count >= 0, block
            assert (block.ref_count == 0) == (block.block_id in free_ids), block
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, block
