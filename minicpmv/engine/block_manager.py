"""Which KV blocks each sequence owns, and the prefix cache over full blocks.

The KV pool (``kv_pool.py``) is a fixed set of blocks of ``block_size`` token slots. A sequence's KV lives in
the blocks of its block table, in order; it never moves while the sequence runs. This class only does the
bookkeeping (no tensors): free blocks, reference counts, and the prefix cache.

Prefix cache: once a block is full and its KV computed, it gets a key, a hash chained over every earlier
block of the sequence, its own token ids and the content of the images whose embeddings sit at its
positions (image placeholders are all the same token id, so the ids alone can't tell two pages apart). A
later sequence whose leading blocks have the same keys takes those blocks (reference count + 1) instead of
computing them: a follow-up question about the same page prefills only its new tokens. Blocks no sequence
uses stay cached until a new block is needed and none is free; the least recently used goes first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None  # set once the block is full, computed and in the prefix cache


def block_key(parent: bytes | None, token_ids: Seq[int], contents: Seq[tuple[str, int, int]]) -> bytes:
    """The prefix-cache key of a full block: ``parent`` (the previous block's key, None for the first),
    its token ids and, for every image span it holds, (content key, offset into the span of the block's first
    position in it, offset into the block where the span starts or 0)."""
    digest = hashlib.sha256(parent or b"")
    digest.update(len(token_ids).to_bytes(4, "little"))
    digest.update(b"".join(int(t).to_bytes(4, "little") for t in token_ids))
    for content, span_offset, block_offset in contents:
        digest.update(f"|{content}@{span_offset}+{block_offset}".encode())
    return digest.digest()


class BlockManager:
    """Allocation of ``num_blocks`` blocks; thread-confined to the engine loop."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # no content worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest first
        self._cached: dict[bytes, int] = {}  # key -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # ---------------------------------------------------------------- state

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached but unused and so evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- allocation

    def cached_prefix(self, keys: Seq[bytes], num_tokens: int) -> list[int]:
        """Block ids of the longest run of leading full blocks found in the cache, for a sequence of
        ``num_tokens`` whose full blocks have ``keys``. At least the last token is always left to compute
        (its logits are needed), so a hit on every block drops the last one."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in keys[: (num_tokens - 1) // self.block_size]:
            block_id = self._cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, num_tokens: int, cached: Seq[int], reserve: int = 0) -> bool:
        """Whether a sequence of ``num_tokens`` taking the ``cached`` blocks fits, leaving ``reserve`` free."""
        taken_from_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        new = self.blocks_for(num_tokens) - len(cached)
        return new + taken_from_free + reserve <= self.num_free_blocks

    def allocate(self, num_tokens: int, cached: Seq[int]) -> list[int]:
        """A block table for ``num_tokens``: the ``cached`` blocks (shared) then fresh ones. Check
        ``can_allocate`` first; raises RuntimeError when the pool is short."""
        if not self.can_allocate(num_tokens, cached):
            raise RuntimeError("KV pool exhausted")
        self.prefix_queries += num_tokens
        self.prefix_hits += len(cached) * self.block_size
        table = []
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._evictable.pop(block_id, None)
            block.ref_count += 1
            table.append(block_id)
        for _ in range(self.blocks_for(num_tokens) - len(cached)):
            table.append(self._take())
        return table

    def append_slot(self, table: list[int], num_tokens: int) -> bool:
        """Grow ``table`` so that it holds ``num_tokens``; False (nothing changed) when the pool is short."""
        needed = self.blocks_for(num_tokens) - len(table)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            table.append(self._take())
        return True

    def free(self, table: list[int]) -> None:
        """Release a sequence's blocks (last first, so its tail is evicted before its shared head)."""
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.key is not None and self._cached.get(block.key) == block_id:
                self._evictable[block_id] = None
            else:
                block.key = None
                self._free.append(block_id)
        table.clear()

    def register(self, block_id: int, key: bytes) -> None:
        """``block_id`` is full and computed: make it findable by ``key`` (first one computed wins)."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.key is not None or key in self._cached:
            return
        block.key = key
        self._cached[key] = block_id

    def _take(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self._cached[block.key]
            block.key = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence uses (for tests and benchmarks)."""
        for block_id in list(self._evictable):
            block = self.blocks[block_id]
            del self._cached[block.key]
            block.key = None
            self._free.append(block_id)
        self._evictable.clear()
