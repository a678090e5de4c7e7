"""The block manager alone: allocation, reference counts, the prefix cache's keys and its LRU eviction."""

from __future__ import annotations

import pytest

from minicpmv.engine.block_manager import BlockManager, block_key


def keys_for(tokens: list[int], size: int, contents=()) -> list[bytes]:
    """Keys of the full blocks of ``tokens``; ``contents``: (start, end, key) image spans."""
    keys: list[bytes] = []
    for index in range(len(tokens) // size):
        start, end = index * size, (index + 1) * size
        inside = [(c, max(start, a) - a, max(a - start, 0)) for a, b, c in contents if a < end and b > start]
        keys.append(block_key(keys[-1] if keys else None, tokens[start:end], inside))
    return keys


def test_keys_chain_over_the_whole_prefix():
    a = keys_for(list(range(12)), 4)
    b = keys_for([0, 1, 2, 99, *range(4, 12)], 4)
    assert a[0] != b[0] and a[1] != b[1] and a[2] != b[2]  # one token in block 0 changes every later key
    assert keys_for(list(range(12)), 4) == a


def test_image_content_is_part_of_the_key():
    tokens = [7] * 8  # placeholders: the same id whatever the image
    page = keys_for(tokens, 4, [(0, 8, "page-A#0")])
    other = keys_for(tokens, 4, [(0, 8, "page-B#0")])
    shifted = keys_for(tokens, 4, [(2, 8, "page-A#0")])
    assert page[0] != other[0] and page[1] != other[1]
    assert page[0] != shifted[0]


def test_allocate_and_free_count_blocks():
    manager = BlockManager(num_blocks=10, block_size=4)
    table = manager.allocate(9, [])
    assert len(table) == 3 and manager.num_free_blocks == 7
    assert manager.append_slot(table, 13) and len(table) == 4
    manager.free(table)
    assert table == [] and manager.num_free_blocks == 10


def test_cached_blocks_are_shared_then_kept_until_evicted_least_recently_used_first():
    manager = BlockManager(num_blocks=6, block_size=4)
    tokens = list(range(12))
    keys = keys_for(tokens, 4)
    first = manager.allocate(12, [])
    blocks = list(first)  # free() empties the table it is given
    for block, key in zip(first, keys, strict=True):
        manager.register(block, key)
    hits = manager.cached_prefix(keys, 12)
    assert hits == first[:2]  # never the block holding the last token: its logits must be computed
    second = manager.allocate(12, hits)
    assert second[:2] == first[:2] and manager.blocks[first[0]].ref_count == 2
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 6 and manager.num_cached_blocks == 3  # free, but still findable
    assert manager.cached_prefix(keys, 13) == blocks  # a longer prompt may use all three
    # Needing every block evicts the cached ones, oldest first; then nothing is found any more.
    manager.allocate(24, [])
    assert manager.num_cached_blocks == 0 and manager.cached_prefix(keys, 13) == []


def test_can_allocate_counts_cached_blocks_that_are_free_and_the_reserve():
    manager = BlockManager(num_blocks=4, block_size=4)
    table = manager.allocate(8, [])
    first = table[0]
    keys = keys_for(list(range(8)), 4)
    manager.register(first, keys[0])
    manager.free(table)
    cached = manager.cached_prefix(keys, 9)
    assert cached == [first]
    assert manager.can_allocate(16, cached) and not manager.can_allocate(16, cached, reserve=1)
    assert not manager.can_allocate(17, [])


def test_disabled_prefix_caching_never_hits():
    manager = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    table = manager.allocate(8, [])
    keys = keys_for(list(range(8)), 4)
    manager.register(table[0], keys[0])
    assert manager.cached_prefix(keys, 9) == []


def test_pool_must_have_a_block():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)
