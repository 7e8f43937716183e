"""BlockPool and FreeBlockQueue: allocation order, free ordering, LRU eviction, O(1) removal."""

import time

import pytest

from loomserve.scheduler.block_pool import BlockPool, FreeBlockQueue, KVBlock


def queue_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_queue]


def cached_pool(num_blocks: int) -> BlockPool:
    """A pool whose blocks were all used, cached under hash bytes([id]), and freed in id order."""
    pool = BlockPool(num_blocks)
    block_ids = pool.allocate(num_blocks)
    for block_id in block_ids:
        assert pool.register(block_id, bytes([block_id]))
    pool.release(block_ids)
    return pool


def test_allocation_hands_out_ids_in_order() -> None:
    pool = BlockPool(5)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert pool.num_free_blocks == 2
    assert [block.ref_count for block in pool.blocks] == [1, 1, 1, 0, 0]
    pool.check_invariants()


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(ValueError):
        pool.allocate(2)
    assert queue_ids(pool) == [2]
    pool.check_invariants()


def test_release_puts_empty_blocks_first_and_cached_blocks_last_in_order() -> None:
    pool = BlockPool(6)
    block_ids = pool.allocate(4)
    assert pool.register(0, b"h0")
    assert pool.register(1, b"h1")
    # Released in eviction order, last block first, as the manager does.
    pool.release(reversed(block_ids))
    # 3 then 2 (empty) each go to the front; 1 then 0 (cached) to the back.
    assert queue_ids(pool) == [2, 3, 4, 5, 1, 0]
    pool.check_invariants()


def test_lru_eviction_order_is_exact_and_forgets_hashes() -> None:
    pool = BlockPool(4)
    for block_id in pool.allocate(4):
        assert pool.register(block_id, bytes([block_id]))
    pool.release([2])
    pool.release([0])
    pool.release([3])
    assert queue_ids(pool) == [2, 0, 3]
    assert pool.num_cached_blocks == 4

    assert pool.allocate(1) == [2]
    assert pool.blocks[2].block_hash is None and pool.lookup(bytes([2])) is None
    assert pool.lookup(bytes([0])) == 0
    assert pool.allocate(2) == [0, 3]
    assert pool.num_cached_blocks == 1  # block 1, still in use
    pool.check_invariants()


def test_take_reference_revives_a_free_cached_block_from_the_middle() -> None:
    pool = cached_pool(5)
    assert queue_ids(pool) == [0, 1, 2, 3, 4]
    blocks = pool.blocks

    pool.take_reference(2)
    assert queue_ids(pool) == [0, 1, 3, 4]
    assert blocks[1].next_free is blocks[3] and blocks[3].prev_free is blocks[1]
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    pool.take_reference(2)
    assert blocks[2].ref_count == 2
    pool.release([2])
    assert queue_ids(pool) == [0, 1, 3, 4]
    pool.release([2])
    # Freed again: now the most recently used, evicted last.
    assert queue_ids(pool) == [0, 1, 3, 4, 2]
    assert pool.allocate(4) == [0, 1, 3, 4]
    pool.check_invariants()


def test_removal_from_the_middle_does_not_scan_the_queue() -> None:
    blocks = [KVBlock(i) for i in range(200_000)]
    queue = FreeBlockQueue(blocks)
    start = time.perf_counter()
    for block in blocks[50_000:60_000]:
        queue.remove(block)
    elapsed = time.perf_counter() - start
    # A list scan would walk ~55,000 nodes per removal: many seconds for these 10,000.
    assert elapsed < 0.5
    assert len(queue) == 190_000
    assert blocks[49_999].next_free is blocks[60_000]
    assert blocks[60_000].prev_free is blocks[49_999]


def test_queue_ends_and_misuse() -> None:
    a, b, c = KVBlock(0), KVBlock(1), KVBlock(2)
    queue = FreeBlockQueue([a])
    queue.append(b)
    queue.appendleft(c)
    assert [block.block_id for block in queue] == [2, 0, 1]
    with pytest.raises(ValueError):
        queue.append(a)
    assert queue.popleft() is c
    queue.remove(b)
    with pytest.raises(ValueError):
        queue.remove(b)
    assert queue.popleft() is a
    with pytest.raises(IndexError):
        queue.popleft()
    assert len(queue) == 0 and list(queue) == []


def test_a_hash_indexes_one_block() -> None:
    pool = BlockPool(3)
    pool.allocate(3)
    assert pool.register(0, b"same")
    assert not pool.register(1, b"same")
    assert pool.blocks[1].block_hash is None and pool.lookup(b"same") == 0
    with pytest.raises(ValueError):
        pool.register(0, b"other")
    pool.release([0, 1])
    # The unindexed duplicate is recycled before the cached original.
    assert queue_ids(pool) == [1, 0]
    pool.check_invariants()


def test_a_free_block_cannot_be_registered() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.register(0, b"h")


def test_release_more_often_than_referenced_raises() -> None:
    pool = BlockPool(2)
    (block_id,) = pool.allocate(1)
    pool.release([block_id])
    with pytest.raises(ValueError):
        pool.release([block_id])


def test_forget_all_hashes_only_when_nothing_is_in_use() -> None:
    pool = BlockPool(2)
    pool.allocate(2)
    pool.register(0, b"h")
    pool.release([1])
    assert not pool.forget_all_hashes()
    assert pool.lookup(b"h") == 0
    pool.release([0])
    assert pool.forget_all_hashes()
    assert pool.lookup(b"h") is None and pool.blocks[0].block_hash is None
    pool.check_invariants()


def test_check_invariants_catches_a_wrong_reference_count() -> None:
    pool = BlockPool(2)
    pool.allocate(1)
    pool.blocks[1].ref_count = 1
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_an_empty_block_behind_a_cached_one() -> None:
    pool = cached_pool(2)
    pool.blocks[1].block_hash = None
    pool._index.pop(bytes([1]))
    with pytest.raises(AssertionError):
        pool.check_invariants()
