"""The block manager under random operations, checked against a model of the block tables held.

Every step is one of: allocate a table (taking the cached prefix ``cached_prefix`` finds, which shares blocks
another table holds or revives evictable ones), register a table's full blocks in the prefix cache, grow a
table (``append_slot``), free a table, allocate when only evictable blocks are left (eviction), and
``reset_prefix_cache``. After each, every block must be in exactly one of in use / free / evictable, its
reference count must be the number of held tables containing it, and the prefix cache must agree with the
blocks' keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from minicpmv.engine.block_manager import BlockManager
from tests.unit.test_block_manager import keys_for

BLOCK_SIZE = 4


@dataclass
class Held:
    """A table the test holds, with the tokens it stands for (so that its full blocks have keys)."""

    tokens: list[int]
    table: list[int]
    registered: int = 0  # leading blocks registered so far
    keys: list[bytes] = field(default_factory=list)


def check(manager: BlockManager, held: list[Held]) -> None:
    free, evictable = list(manager._free), list(manager._evictable)
    assert len(free) == len(set(free)), "a block is twice in the free list"
    in_use = {b.block_id for b in manager.blocks if b.ref_count > 0}
    assert all(b.ref_count >= 0 for b in manager.blocks), [b.ref_count for b in manager.blocks]
    assert not in_use & set(free), f"in use and free: {in_use & set(free)}"
    assert not in_use & set(evictable), f"in use and evictable: {in_use & set(evictable)}"
    assert not set(free) & set(evictable), "free and evictable"
    assert in_use | set(free) | set(evictable) == set(range(manager.num_blocks)), "a block went missing"
    # Reference counts are the number of held tables containing the block (a table holds a block once).
    for entry in held:
        assert len(entry.table) == len(set(entry.table)), entry.table
    counts = [0] * manager.num_blocks
    for entry in held:
        for block_id in entry.table:
            counts[block_id] += 1
    assert [b.ref_count for b in manager.blocks] == counts
    # The prefix cache and the blocks' keys agree; unused cached blocks are exactly the evictable ones.
    keyed = {b.key: b.block_id for b in manager.blocks if b.key is not None}
    assert len(keyed) == sum(1 for b in manager.blocks if b.key is not None), "two blocks with one key"
    assert keyed == manager._cached
    assert set(evictable) == {b.block_id for b in manager.blocks if b.key is not None and b.ref_count == 0}
    assert all(manager.blocks[b].key is None for b in free)
    assert manager.num_free_blocks == manager.num_blocks - len(in_use) == len(free) + len(evictable)
    assert manager.num_used_blocks == len(in_use)
    assert manager.num_cached_blocks == len(keyed)


def taken_in_order(new: list[int], free_before: list[int], evictable_before: list[int]) -> None:
    """``new`` blocks were handed out free ones first, then evictable ones least recently used first."""
    from_free = min(len(new), len(free_before))
    assert set(new[:from_free]) <= set(free_before)
    assert new[from_free:] == evictable_before[: len(new) - from_free]


def run_random_ops(seed: int, steps: int, num_blocks: int = 24) -> dict[str, int]:
    rng = random.Random(seed)
    manager = BlockManager(num_blocks=num_blocks, block_size=BLOCK_SIZE)
    held: list[Held] = []
    # A few prompts sharing prefixes, so that cached prefixes are found and blocks are shared.
    stems = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    seen = {"shared": 0, "revived": 0, "evicted": 0, "append_refused": 0, "reset": 0}

    def new_tokens() -> list[int]:
        stem = rng.choice(stems)
        return stem[: rng.randrange(1, len(stem) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(0, 9))]

    for _ in range(steps):
        op = rng.choices(["allocate", "register", "append", "free", "evict", "reset"], [6, 5, 4, 4, 1, 0.3])[0]
        if op in ("allocate", "evict"):
            if op == "evict":  # free every table, so that the next allocation must take evictable blocks
                for entry in held:
                    manager.free(entry.table)
                held.clear()
                check(manager, held)
            tokens = new_tokens()
            keys = keys_for(tokens, BLOCK_SIZE)
            cached = manager.cached_prefix(keys, len(tokens))
            assert len(cached) <= (len(tokens) - 1) // BLOCK_SIZE
            for block_id, key in zip(cached, keys, strict=False):
                assert manager.blocks[block_id].key == key
            if not manager.can_allocate(len(tokens), cached):
                with pytest.raises(RuntimeError):
                    manager.allocate(len(tokens), cached)
                continue
            shared = sum(1 for b in cached if manager.blocks[b].ref_count > 0)
            revived = len(cached) - shared
            cached_before = manager.num_cached_blocks
            only_evictable = not manager._free
            free_before = list(manager._free)
            evictable_before = [b for b in manager._evictable if b not in cached]
            table = manager.allocate(len(tokens), cached)
            assert table[: len(cached)] == cached and len(table) == manager.blocks_for(len(tokens))
            taken_in_order(table[len(cached) :], free_before, evictable_before)
            seen["shared"] += shared
            seen["revived"] += revived
            if only_evictable and len(table) > len(cached):
                assert manager.num_cached_blocks < cached_before  # took an evictable block
                seen["evicted"] += 1
            held.append(Held(tokens, table, registered=len(cached)))
        elif op == "register" and held:
            # The engine registers a block once full and computed: here, all of a table's full blocks.
            entry = rng.choice(held)
            entry.keys = keys_for(entry.tokens, BLOCK_SIZE)
            for index in range(entry.registered, len(entry.keys)):
                manager.register(entry.table[index], entry.keys[index])
            entry.registered = len(entry.keys)
        elif op == "append" and held:
            entry = rng.choice(held)
            grown = entry.tokens + [rng.randrange(50) for _ in range(rng.randrange(1, 7))]
            before, free_before, evictable_before = list(entry.table), list(manager._free), list(manager._evictable)
            if manager.append_slot(entry.table, len(grown)):
                assert entry.table[: len(before)] == before and len(entry.table) == manager.blocks_for(len(grown))
                taken_in_order(entry.table[len(before) :], free_before, evictable_before)
                entry.tokens = grown
            else:
                assert entry.table == before
                seen["append_refused"] += 1
        elif op == "free" and held:
            entry = held.pop(rng.randrange(len(held)))
            manager.free(entry.table)
            assert entry.table == []
        elif op == "reset":
            manager.reset_prefix_cache()
            assert not manager._evictable
            seen["reset"] += 1
        check(manager, held)
    for entry in held:
        manager.free(entry.table)
    held.clear()
    check(manager, held)
    assert manager.num_free_blocks == num_blocks
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_every_invariant(seed):
    seen = run_random_ops(seed, steps=600)
    # The run exercised what it is meant to: sharing, reviving cached blocks, eviction, refusals, resets.
    assert seen["shared"] > 0 and seen["revived"] > 0 and seen["evicted"] > 0, seen
    assert seen["append_refused"] > 0 and seen["reset"] > 0, seen


def test_a_block_one_sharer_frees_stays_in_use_for_the_other_and_is_not_handed_out():
    manager = BlockManager(num_blocks=6, block_size=4)
    tokens = list(range(12))
    keys = keys_for(tokens, 4)
    first = manager.allocate(12, [])
    for block_id, key in zip(first, keys, strict=True):
        manager.register(block_id, key)
    second = manager.allocate(13, manager.cached_prefix(keys, 13))
    shared = list(first)
    assert second[:3] == shared and [manager.blocks[b].ref_count for b in shared] == [2, 2, 2]
    manager.free(first)
    assert [manager.blocks[b].ref_count for b in shared] == [1, 1, 1]
    assert not set(shared) & (set(manager._free) | set(manager._evictable))
    assert manager.num_free_blocks == 6 - 4 and manager.num_used_blocks == 4
    # Taking every free block hands out none of the second sequence's.
    other = manager.allocate(8, [])
    assert not set(other) & set(second)
    assert not manager.can_allocate(1, [])
    manager.free(second)
    assert [manager.blocks[b].ref_count for b in shared] == [0, 0, 0]
    assert set(shared) <= set(manager._evictable)  # cached, unused: evictable
    manager.free(other)
    assert manager.num_free_blocks == 6
