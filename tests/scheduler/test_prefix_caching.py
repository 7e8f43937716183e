"""KVCacheManager with automatic prefix caching: hash chains, sharing, eviction, tenants, fork."""

import pytest

from loomserve.scheduler.kv_cache_manager import KVCacheManager, hash_block_tokens, root_block_hash
from loomserve.scheduler.request import Request
from loomserve.shared.messages import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, token_ids: list[int], cache_salt: str = "") -> Request:
    return Request(request_id, list(token_ids), SamplingParams(max_tokens=16), cache_salt=cache_salt)


def admit(manager: KVCacheManager, request: Request) -> list[int] | None:
    """What the scheduler does for a waiting request: look up, allocate the rest, compute it."""
    hit_ids, num_hit_tokens = manager.get_computed_blocks(request)
    new_ids = manager.allocate_slots(request, request.num_tokens - num_hit_tokens, hit_ids)
    if new_ids is not None:
        request.num_computed_tokens = request.num_tokens
    return new_ids


def decode(manager: KVCacheManager, request: Request, token_id: int) -> list[int] | None:
    """Append a sampled token and schedule it, as one decode step does."""
    request.append_output_token(token_id)
    new_ids = manager.allocate_slots(request, 1)
    if new_ids is not None:
        request.num_computed_tokens += 1
    return new_ids


def expected_chain(
    token_ids: list[int], cache_salt: str = "", block_size: int = BLOCK_SIZE
) -> list[bytes]:
    hashes = []
    parent = root_block_hash(cache_salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def ref_counts(manager: KVCacheManager) -> list[int]:
    return [block.ref_count for block in manager.pool.blocks]


Snapshot = tuple[list[int], list[tuple[int, bytes | None]], dict[str, list[int]], list[list[bytes]]]


def snapshot(manager: KVCacheManager, *requests: Request) -> Snapshot:
    """Everything allocate_slots or fork could change."""
    return (
        [block.block_id for block in manager.pool.free_queue],
        [(block.ref_count, block.block_hash) for block in manager.pool.blocks],
        {request.request_id: manager.get_block_ids(request.request_id) for request in requests},
        [list(request.block_hashes) for request in requests],
    )


# -- hash chain ------------------------------------------------------------


def test_hashes_are_sha256_digests_and_the_chain_matches_the_definition() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(10)))
    admit(manager, request)
    assert request.block_hashes == expected_chain(list(range(10)))
    assert len(request.block_hashes) == 2 and all(len(h) == 32 for h in request.block_hashes)


def test_same_tokens_same_hashes_and_one_changed_token_changes_the_chain_from_its_block_on() -> None:
    tokens = list(range(16))
    for changed_block in range(4):
        altered = list(tokens)
        altered[changed_block * BLOCK_SIZE + 2] = 99
        same, different = expected_chain(tokens), expected_chain(altered)
        assert expected_chain(list(tokens)) == same
        assert same[:changed_block] == different[:changed_block]
        assert all(a != b for a, b in zip(same[changed_block:], different[changed_block:], strict=True))


def test_salt_enters_only_the_first_block_but_changes_every_hash() -> None:
    tokens = list(range(12))
    public, salted = expected_chain(tokens), expected_chain(tokens, "tenant-a")
    assert all(a != b for a, b in zip(public, salted, strict=True))
    # Blocks after the first are hashed from their parent alone, without the salt.
    for k in (1, 2):
        block = tokens[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE]
        assert salted[k] == hash_block_tokens(salted[k - 1], block)
    assert salted[0] == hash_block_tokens(root_block_hash("tenant-a"), tokens[:BLOCK_SIZE])
    assert root_block_hash("") != root_block_hash("tenant-a")


def test_extra_keys_enter_the_hash_with_their_types() -> None:
    parent, block = root_block_hash(""), [1, 2, 3, 4]
    plain = hash_block_tokens(parent, block)
    assert hash_block_tokens(parent, block, ()) == plain
    lora_a = hash_block_tokens(parent, block, ("lora-a",))
    assert lora_a == hash_block_tokens(parent, tuple(block), ("lora-a",))
    assert lora_a != plain
    assert lora_a != hash_block_tokens(parent, block, ("lora-b",))
    typed = {hash_block_tokens(parent, block, (key,)) for key in (1, "1", b"1")}
    assert len(typed) == 3
    assert hash_block_tokens(parent, block, ("a", "b")) != hash_block_tokens(parent, block, ("ab",))


# -- sharing -----------------------------------------------------------------


def test_two_requests_sharing_a_prefix_share_its_blocks() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(10)))
    assert admit(manager, first) == [0, 1, 2]
    second = make_request("b", [*range(8), 50, 51, 52])
    assert manager.get_computed_blocks(second) == ([0, 1], 8)
    assert manager.allocate_slots(second, 3, [0, 1]) == [0, 1, 3]
    assert ref_counts(manager)[:4] == [2, 2, 1, 1]
    assert manager.num_used_blocks == 4 and manager.num_free_blocks == 6
    manager.check_invariants()


def test_a_partial_block_is_never_shared_until_it_fills() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(6)))
    assert admit(manager, first) == [0, 1]
    assert manager.pool.blocks[1].block_hash is None
    longer = [*range(8), 60, 61]
    assert manager.get_computed_blocks(make_request("b", longer)) == ([0], 4)

    decode(manager, first, 6)
    assert manager.pool.blocks[1].block_hash is None
    assert decode(manager, first, 7) == []  # tokens 0..7: block 1 is now full and cached
    assert manager.pool.blocks[1].block_hash == first.block_hashes[1]
    assert manager.get_computed_blocks(make_request("c", longer)) == ([0, 1], 8)
    manager.check_invariants()


def test_a_block_is_cached_when_scheduled_full_not_when_computed() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(10)))
    assert manager.allocate_slots(request, 6) == [0, 1]  # a first chunk of 6 of 10 tokens
    assert manager.get_computed_blocks(make_request("b", list(range(10)))) == ([0], 4)
    request.num_computed_tokens = 6
    assert manager.allocate_slots(request, 4) == [2]
    assert manager.get_computed_blocks(make_request("c", list(range(10)))) == ([0, 1], 8)
    assert manager.pool.blocks[2].block_hash is None
    manager.check_invariants()


def test_the_whole_prompt_is_never_matched() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(8))))
    assert manager.pool.num_cached_blocks == 2
    assert manager.get_computed_blocks(make_request("b", list(range(8)))) == ([0], 4)
    assert manager.get_computed_blocks(make_request("c", list(range(9)))) == ([0, 1], 8)
    assert manager.get_computed_blocks(make_request("d", [0])) == ([], 0)


def test_counters_count_tokens_and_hits_once_per_admission() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(10))))
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (10, 0)
    second = make_request("b", list(range(9)))
    for _ in range(3):  # a head-of-line request looked up again every step until it fits
        assert manager.get_computed_blocks(second) == ([0, 1], 8)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (10, 0)
    admit(manager, second)
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (19, 8)
    admit(manager, make_request("c", [7, *range(9)]))
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (29, 8)
    decode(manager, second, 5)  # later allocations of a request count nothing
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (29, 8)


def test_identical_prompts_admitted_together_keep_one_cached_copy() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    first, second = make_request("a", list(range(9))), make_request("b", list(range(9)))
    assert manager.get_computed_blocks(first) == ([], 0)
    assert manager.get_computed_blocks(second) == ([], 0)
    assert manager.allocate_slots(first, 9, []) == [0, 1, 2]
    assert manager.allocate_slots(second, 9, []) == [3, 4, 5]
    assert [manager.pool.blocks[i].block_hash is not None for i in range(6)] == [
        True, True, False, False, False, False
    ]
    manager.free(second)
    # The duplicate copies are free but not cached, so they are reused first.
    assert [block.block_id for block in manager.pool.free_queue][:3] == [3, 4, 5]
    manager.check_invariants()


# -- free, hit after free, eviction ----------------------------------------


def test_hit_after_free_reuses_the_cached_block() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(10)))
    admit(manager, first)
    manager.free(first)
    assert manager.num_free_blocks == 6 and manager.num_used_blocks == 0
    assert manager.get_block_ids("a") == []
    second = make_request("b", list(range(10)))
    assert manager.get_computed_blocks(second) == ([0, 1], 8)
    assert manager.allocate_slots(second, 2, [0, 1]) == [0, 1, 2]
    assert ref_counts(manager)[:3] == [1, 1, 1]
    assert manager.num_free_blocks == 3
    manager.check_invariants()


def test_free_queues_a_requests_last_block_for_eviction_first() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    first = make_request("a", list(range(7)))
    assert admit(manager, first) == [0, 1, 2, 3]
    manager.free(first)
    # Block 3 holds 1 of 2 tokens (not cached) and goes first; then cached 2, 1, 0.
    assert [block.block_id for block in manager.pool.free_queue] == [3, 2, 1, 0]

    other = make_request("b", [90, 91, 92])
    assert admit(manager, other) == [3, 2]  # evicts block 2, tokens 4..5 of "a"
    assert manager.pool.blocks[2].block_hash is None
    again = make_request("c", list(range(7)))
    assert manager.get_computed_blocks(again) == ([0, 1], 4)
    manager.check_invariants()


def test_an_evicted_block_is_missed_by_a_later_request() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(5)))
    admit(manager, first)
    manager.free(first)
    hog = make_request("b", [50] * 12)
    assert admit(manager, hog) == [1, 2, 0]
    manager.free(hog)
    assert manager.get_computed_blocks(make_request("c", list(range(5)))) == ([], 0)
    manager.check_invariants()


def test_a_hit_block_is_revived_from_the_middle_of_the_eviction_queue() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=2)
    first = make_request("a", [1, 2, 3, 4, 5])
    second = make_request("b", [7, 8, 9])
    admit(manager, first)
    admit(manager, second)
    manager.free(first)
    manager.free(second)
    # Empty blocks first (2, then 4), then a's cached blocks (1, 0), then b's (3); 5 was never used.
    assert [block.block_id for block in manager.pool.free_queue] == [4, 2, 5, 1, 0, 3]
    again = make_request("c", [1, 2, 3, 4, 6])
    assert admit(manager, again) == [0, 1, 4]
    assert [block.block_id for block in manager.pool.free_queue] == [2, 5, 3]
    manager.check_invariants()


# -- tenants -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("writer_salt", "reader_salt", "expect_hit"),
    [
        ("tenant-a", "tenant-a", True),
        ("tenant-a", "tenant-b", False),
        ("", "", True),
        ("", "tenant-a", False),
        ("tenant-a", "", False),
    ],
)
def test_a_cached_prefix_is_visible_to_its_own_tenant_only(
    writer_salt: str, reader_salt: str, expect_hit: bool
) -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, make_request("writer", list(range(9)), writer_salt))
    reader = make_request("reader", list(range(9)), reader_salt)
    expected = ([0, 1], 8) if expect_hit else ([], 0)
    assert manager.get_computed_blocks(reader) == expected


# -- allocation failure, reset -----------------------------------------------


def test_failed_allocation_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    cached = make_request("a", list(range(9)))
    admit(manager, cached)
    manager.free(cached)
    holder = make_request("h", [70, 71])
    admit(manager, holder)
    hungry = make_request("b", [*range(8), *range(100, 110)])
    hit_ids, num_hit_tokens = manager.get_computed_blocks(hungry)
    assert (hit_ids, num_hit_tokens) == ([0, 1], 8)
    before = snapshot(manager, cached, holder, hungry)
    # Needs 2 revived + 3 fresh blocks; 3 are free.
    assert manager.allocate_slots(hungry, 10, hit_ids) is None
    assert snapshot(manager, cached, holder, hungry) == before
    assert manager.allocate_slots(holder, 2) == []  # fits in its block: nothing to do
    assert manager.allocate_slots(holder, 15) is None
    assert snapshot(manager, cached, holder, hungry) == before
    manager.check_invariants()


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(9)))
    admit(manager, request)
    assert not manager.reset_prefix_cache()
    assert manager.pool.num_cached_blocks == 2
    manager.free(request)
    assert manager.reset_prefix_cache()
    assert manager.pool.num_cached_blocks == 0
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    manager.check_invariants()


def test_computed_blocks_evicted_before_allocation_are_refused() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(9)))
    admit(manager, first)
    manager.free(first)
    late = make_request("b", list(range(9)))
    hit_ids, _ = manager.get_computed_blocks(late)
    assert hit_ids == [0, 1]
    admit(manager, make_request("c", [50] * 12))  # takes every block, evicting 0 and 1
    with pytest.raises(ValueError):
        manager.allocate_slots(late, 1, hit_ids)


def test_get_block_ids_returns_a_copy() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", [1, 2, 3]))
    manager.get_block_ids("a").append(2)
    assert manager.get_block_ids("a") == [0]
    assert manager.get_block_ids("unknown") == []


def test_computed_blocks_are_taken_only_by_a_request_holding_none() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(9))))
    running = make_request("b", [5, 5, 5])
    admit(manager, running)
    with pytest.raises(ValueError):
        manager.allocate_slots(running, 1, [0])


# -- decode, preemption, fork -------------------------------------------------


def test_decode_allocates_a_block_only_at_a_block_boundary() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    request = make_request("a", [1, 2, 3])
    assert admit(manager, request) == [0]
    assert decode(manager, request, 4) == []
    assert manager.pool.blocks[0].block_hash == request.block_hashes[0]
    assert decode(manager, request, 5) == [1]
    assert [decode(manager, request, t) for t in (6, 7, 8, 9)] == [[], [], [], [2]]
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert request.block_hashes == expected_chain(request.token_ids)
    manager.check_invariants()


def test_preempted_request_resumes_from_its_cached_blocks_including_outputs() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", [1, 2, 3, 4, 5, 6])
    admit(manager, request)
    for token_id in (7, 8, 9, 10, 11, 12):
        decode(manager, request, token_id)
    assert manager.get_block_ids("a") == [0, 1, 2]
    manager.free(request)
    request.num_computed_tokens = 0
    request.num_preemptions += 1
    request.append_output_token(13)  # sampled by the step that finished as it was preempted
    request.append_output_token(14)

    assert manager.get_computed_blocks(request) == ([0, 1, 2], 12)
    assert manager.allocate_slots(request, 2, [0, 1, 2]) == [0, 1, 2, 3]
    assert request.block_hashes == expected_chain(request.token_ids)
    manager.check_invariants()


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent = make_request("p", list(range(10)))
    assert admit(manager, parent) == [0, 1, 2]
    child = make_request("c", list(range(10)))
    assert manager.fork(parent, child) == [(2, 3)]
    assert manager.get_block_ids("c") == [0, 1, 3]
    assert child.num_computed_tokens == 10
    assert child.block_hashes == parent.block_hashes[:2]
    assert ref_counts(manager)[:4] == [2, 2, 1, 1]
    manager.check_invariants()

    # Each continues in its own last block; both fill and get cached under their own tokens.
    decode(manager, parent, 20)
    decode(manager, child, 30)
    decode(manager, parent, 21)
    decode(manager, child, 31)
    assert manager.pool.blocks[2].block_hash == expected_chain([*range(10), 20, 21])[2]
    assert manager.pool.blocks[3].block_hash == expected_chain([*range(10), 30, 31])[2]
    manager.free(parent)
    assert ref_counts(manager)[:4] == [1, 1, 0, 1]
    manager.check_invariants()


def test_fork_at_a_block_boundary_copies_nothing() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    parent = make_request("p", list(range(8)))
    admit(manager, parent)
    child = make_request("c", [*range(8), 42])
    assert manager.fork(parent, child) == []
    assert manager.get_block_ids("c") == [0, 1]
    assert manager.allocate_slots(child, 1) == [2]
    manager.check_invariants()


def test_fork_without_a_free_block_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    parent = make_request("p", list(range(6)))
    admit(manager, parent)
    child = make_request("c", list(range(6)))
    before = snapshot(manager, parent, child)
    assert manager.fork(parent, child) is None
    assert snapshot(manager, parent, child) == before
    assert child.num_computed_tokens == 0
    manager.check_invariants()


def test_fork_rejects_a_child_that_does_not_continue_the_parent() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent = make_request("p", list(range(6)), "tenant-a")
    admit(manager, parent)
    with pytest.raises(ValueError):
        manager.fork(parent, make_request("c1", [9, *range(1, 6)], "tenant-a"))
    with pytest.raises(ValueError):
        manager.fork(parent, make_request("c2", list(range(6)), "tenant-b"))
    with pytest.raises(ValueError):
        manager.fork(make_request("x", [1]), make_request("c3", [1]))


def test_transfer_hands_the_table_over_without_copies() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent = make_request("p", list(range(10)))
    admit(manager, parent)
    first = make_request("c0", list(range(10)))
    last = make_request("c1", list(range(10)))
    assert manager.fork(parent, first) == [(2, 3)]
    manager.transfer(parent, last)
    assert manager.get_block_ids("p") == []
    assert manager.get_block_ids("c1") == [0, 1, 2]
    assert last.num_computed_tokens == 10 and last.block_hashes == parent.block_hashes[:2]
    assert ref_counts(manager)[:4] == [2, 2, 1, 1]
    manager.check_invariants()
    assert decode(manager, last, 5) == []  # token 11 still fits block 2
    assert decode(manager, last, 6) == []
    assert manager.pool.blocks[2].block_hash == expected_chain([*range(10), 5, 6])[2]
    manager.free(first)
    manager.free(last)
    assert ref_counts(manager) == [0] * 8
    manager.check_invariants()


def test_transfer_rejects_a_target_that_does_not_continue_the_source() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    source = make_request("s", list(range(6)))
    admit(manager, source)
    with pytest.raises(ValueError):
        manager.transfer(source, make_request("t", [9, *range(1, 6)]))
    assert manager.get_block_ids("s") == [0, 1]  # unchanged
    with pytest.raises(ValueError):
        manager.transfer(make_request("x", [1]), make_request("y", [1]))
    manager.check_invariants()


# -- prefix caching off ------------------------------------------------------


def test_everything_works_without_prefix_caching() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = make_request("a", list(range(9)))
    assert admit(manager, first) == [0, 1, 2]
    second = make_request("b", list(range(9)))
    assert manager.get_computed_blocks(second) == ([], 0)
    assert manager.allocate_slots(second, 9, []) == [3, 4, 5]
    assert manager.allocate_slots(make_request("c", [1]), 1) is None
    child = make_request("a2", list(range(9)))
    manager.free(second)
    assert manager.fork(first, child) == [(2, 3)]
    manager.free(first)
    assert ref_counts(manager) == [1, 1, 0, 1, 0, 0]
    assert first.block_hashes == [] and manager.pool.num_cached_blocks == 0
    assert manager.prefix_cache_queries == manager.prefix_cache_hits == 0
    manager.check_invariants()


def test_capacity_and_counts() -> None:
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    assert manager.max_tokens_ever() == 20
    assert (manager.num_free_blocks, manager.num_used_blocks) == (5, 0)
    admit(manager, make_request("a", list(range(7))))
    assert (manager.num_free_blocks, manager.num_used_blocks) == (3, 2)


def test_check_invariants_catches_a_freed_block_left_in_a_table() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(5)))
    admit(manager, request)
    manager.pool.release([1])
    with pytest.raises(AssertionError):
        manager.check_invariants()
