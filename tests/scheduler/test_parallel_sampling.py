"""Parallel sampling (n > 1): one prefill, a fork with copy on write, n independent choices.

Block ids are exact (block size 4, blocks handed out from 0 upwards). The fake
worker of test_scheduler samples from the context it reads back through each
block table and from the request's seed, so the choices of one prompt diverge:
had two choices shared a block they both write, their outputs would differ from
those of separate requests with the seeds ``seed + i``.
"""

from __future__ import annotations

import random

import pytest

from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.parallel_sampling import ParallelSampling, choice_seed
from loomserve.scheduler.request import Request, RequestStatus
from loomserve.scheduler.scheduler import AdmissionError
from tests.scheduler.test_scheduler import assert_scheduler_empty, make, request, run

BLOCK_SIZE = 4


# -- the unit alone, over a KV cache manager ----------------------------------------


def running_parent(kv: KVCacheManager, rid: str, prompt: list[int], n: int, seed: int | None = None) -> Request:
    """A parent admitted and computed up to its last prompt token, as the scheduler leaves it."""
    parent = request(rid, prompt, 6, n=n, seed=seed)
    parent.max_num_tokens = len(prompt) + 6
    assert kv.allocate_slots(parent, len(prompt) - 1) is not None
    parent.num_computed_tokens = len(prompt) - 1
    parent.status = RequestStatus.RUNNING
    return parent


def test_fork_shares_full_blocks_and_copies_the_partial_one_for_all_but_the_last_choice() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE)
    parallel = ParallelSampling(kv)
    parent = running_parent(kv, "p", list(range(1, 11)), n=3, seed=5)  # 9 computed: blocks 0, 1 and 1/4 of 2
    parallel.add(parent)
    parallel.hold_seats(parent)
    assert parallel.num_reserved_seqs == 2
    assert parallel.ready_to_fork() == [parent]
    assert parallel.num_copies(parent) == 2

    children, copies = parallel.fork(parent)
    assert copies == [(2, 3), (2, 4)]
    assert [(c.request_id, kv.get_block_ids(c.request_id), c.num_computed_tokens, c.sampling.seed)
            for c in children] == [("p#0", [0, 1, 3], 9, 5), ("p#1", [0, 1, 4], 9, 6), ("p#2", [0, 1, 2], 9, 7)]
    assert all(c.parent is parent and c.status is RequestStatus.RUNNING and c.n == 1 for c in children)
    assert kv.get_block_ids("p") == []  # the last choice took the parent's table
    assert [block.ref_count for block in kv.pool.blocks[:5]] == [3, 3, 1, 1, 1]
    assert parallel.num_reserved_seqs == 0 and parallel.parents == {} and parallel.ready_to_fork() == []
    assert parallel.choices("p") == children
    kv.check_invariants()

    for child in children:
        parallel.forget(child)
        kv.free(child)
    assert parallel.choices("p") == [] and parallel.is_empty()
    assert kv.num_free_blocks == 16


def test_a_block_aligned_prompt_forks_without_copies() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE)
    parallel = ParallelSampling(kv)
    parent = running_parent(kv, "p", list(range(1, 10)), n=3)  # 8 computed: blocks 0 and 1, full
    parallel.add(parent)
    assert parallel.num_copies(parent) == 0
    children, copies = parallel.fork(parent)
    assert copies == []
    # No seed: the choices sample alike unless their sampling differs (greedy, here).
    assert [(kv.get_block_ids(c.request_id), c.sampling.seed) for c in children] == [
        ([0, 1], None), ([0, 1], None), ([0, 1], None)]
    assert [block.ref_count for block in kv.pool.blocks[:3]] == [3, 3, 0]
    kv.check_invariants()


def test_only_running_parents_at_their_last_prompt_token_are_ready() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE)
    parallel = ParallelSampling(kv)
    ready = running_parent(kv, "ready", [1, 2, 3], n=2)
    chunked = running_parent(kv, "chunked", [4, 5, 6, 7, 8], n=2)
    chunked.num_computed_tokens = 2  # the rest of its prompt comes next step
    waiting = request("waiting", [9, 9], 3, n=2)
    for parent in (ready, chunked, waiting):
        parallel.add(parent)
    assert parallel.ready_to_fork() == [ready]
    parallel.forget(waiting)
    assert set(parallel.parents) == {"ready", "chunked"}


def test_a_parent_holds_a_seat_per_choice_while_it_runs() -> None:
    parallel = ParallelSampling(KVCacheManager(16, BLOCK_SIZE))
    single, parent = request("one", [1], 3), request("p", [1], 3, n=4)
    parallel.hold_seats(single)
    parallel.hold_seats(parent)
    assert parallel.num_reserved_seqs == 3
    parallel.free_seats(parent)  # preempted: back to the queue, seats and all
    parallel.free_seats(single)
    assert parallel.num_reserved_seqs == 0


def test_fit_error_counts_shared_prompt_blocks_once() -> None:
    parallel = ParallelSampling(KVCacheManager(10, BLOCK_SIZE))
    # 9 prompt tokens + 11 = 20 tokens, 5 blocks each; the first 2 blocks (8 tokens) are shared.
    assert parallel.fit_error(request("two", list(range(9)), 11, n=2)) is None  # 2 + 2 x 3 = 8
    error = parallel.fit_error(request("three", list(range(9)), 11, n=3))  # 2 + 3 x 3 = 11
    assert error is not None and error.status == 400
    assert "need 11 blocks of 4 tokens" in error.message and "(10 blocks, 40 tokens)" in error.message


def test_choice_seeds_wrap_past_64_bits() -> None:
    assert [choice_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert choice_seed(2**64 - 1, 1) == 0 and choice_seed(2**64 - 2, 3) == 1


# -- through the scheduler --------------------------------------------------------------


def separate(prompt: list[int], max_tokens: int, n: int, seed: int) -> dict[str, list[int]]:
    """The outputs of n separate requests with seeds seed .. seed + n - 1, under the ids of choices."""
    sched, worker = make(num_blocks=256, budget=64, max_seqs=16)
    for i in range(n):
        sched.add_request(request(f"p#{i}".replace("#", "_"), prompt, max_tokens, seed=seed + i))
    return {rid.replace("_", "#"): out for rid, out in run(sched, worker).items()}


def test_the_prompt_is_prefilled_once_then_forked_with_exact_blocks_and_copies() -> None:
    prompt = list(range(1, 11))  # 10 tokens: the parent computes 9, block 2 holds one of them
    sched, worker = make(num_blocks=16, block_size=BLOCK_SIZE, budget=32)
    sched.add_request(request("p", prompt, 6, n=3, seed=5))

    first = sched.schedule()
    assert first is not None
    assert first.num_scheduled_tokens == {"p": 9}
    assert [(r.request_id, r.block_ids, r.num_computed_tokens) for r in first.new_requests] == [("p", [0, 1, 2], 0)]
    assert first.block_copies == []
    assert sched.update_from_output(worker.execute(first)) == []  # a parent samples nothing

    second = sched.schedule()
    assert second is not None
    assert second.finished_request_ids == ["p"]
    # Full blocks 0 and 1 are shared; the partial block 2 is copied for two choices and kept by the last.
    assert second.block_copies == [(2, 3), (2, 4)]
    assert [(r.request_id, r.block_ids, r.num_computed_tokens, r.sampling.seed) for r in second.new_requests] == [
        ("p#0", [0, 1, 3], 9, 5), ("p#1", [0, 1, 4], 9, 6), ("p#2", [0, 1, 2], 9, 7)]
    assert second.num_scheduled_tokens == {"p#0": 1, "p#1": 1, "p#2": 1}
    assert [block.ref_count for block in sched.kv_cache.pool.blocks[:5]] == [3, 3, 1, 1, 1]
    sched.kv_cache.check_invariants()
    outputs: dict[str, list[int]] = {}
    for out in sched.update_from_output(worker.execute(second)):
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, tokens in run(sched, worker).items():
        outputs.setdefault(rid, []).extend(tokens)

    assert outputs == separate(prompt, 6, 3, seed=5)
    assert len({tuple(tokens) for tokens in outputs.values()}) == 3, "the seeds should make the choices differ"
    assert sched.stats.num_forks == 1 and sched.stats.num_block_copies == 2
    # 9 prompt tokens once, then 6 tokens per choice (its last prompt token and 5 outputs fed back)
    assert sched.stats.num_scheduled_tokens == 9 + 3 * 6
    assert sched.kv_cache.prefix_cache_queries == 10
    assert_scheduler_empty(sched)


def test_a_prompt_ending_a_block_early_forks_without_copies() -> None:
    prompt = list(range(1, 10))  # 9 tokens: the parent's 8 fill blocks 0 and 1
    sched, worker = make(num_blocks=16, block_size=BLOCK_SIZE, budget=32)
    sched.add_request(request("p", prompt, 4, n=3, seed=1))
    first = sched.schedule()
    assert first is not None
    sched.update_from_output(worker.execute(first))
    second = sched.schedule()
    assert second is not None
    assert second.block_copies == []
    assert [(r.request_id, r.block_ids) for r in second.new_requests] == [
        ("p#0", [0, 1, 2]), ("p#1", [0, 1, 3]), ("p#2", [0, 1, 4])]
    outputs: dict[str, list[int]] = {}
    for out in sched.update_from_output(worker.execute(second)):
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, tokens in run(sched, worker).items():
        outputs.setdefault(rid, []).extend(tokens)
    assert outputs == separate(prompt, 4, 3, seed=1)
    assert sched.stats.num_block_copies == 0
    assert_scheduler_empty(sched)


def test_a_one_token_prompt_forks_at_admission() -> None:
    sched, worker = make(num_blocks=16, block_size=BLOCK_SIZE, budget=32)
    sched.add_request(request("p", [7], 5, n=3, seed=11))
    first = sched.schedule()
    assert first is not None
    assert first.finished_request_ids == [] and first.block_copies == []  # the parent never reached the worker
    assert [(r.request_id, r.block_ids, r.num_computed_tokens) for r in first.new_requests] == [
        ("p#0", [0], 0), ("p#1", [1], 0), ("p#2", [2], 0)]
    assert first.num_scheduled_tokens == {"p#0": 1, "p#1": 1, "p#2": 1}
    outputs: dict[str, list[int]] = {}
    for out in sched.update_from_output(worker.execute(first)):
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, tokens in run(sched, worker).items():
        outputs.setdefault(rid, []).extend(tokens)
    assert outputs == separate([7], 5, 3, seed=11)
    assert_scheduler_empty(sched)


def test_a_fully_cached_prompt_forks_at_admission_on_the_cached_blocks() -> None:
    prompt = list(range(1, 10))  # 9 tokens: 8 of them are two cached blocks
    sched, worker = make(num_blocks=16, block_size=BLOCK_SIZE, budget=32)
    sched.add_request(request("warm", prompt, 1))
    run(sched, worker)
    sched.add_request(request("p", prompt, 3, n=2, seed=3))
    plan = sched.schedule()
    assert plan is not None
    assert plan.num_scheduled_tokens == {"p#0": 1, "p#1": 1}
    cached = sched.kv_cache.get_block_ids("p#0")[:2]
    assert [r.block_ids[:2] for r in plan.new_requests] == [cached, cached]
    assert [r.num_computed_tokens for r in plan.new_requests] == [8, 8]
    outputs: dict[str, list[int]] = {}
    for out in sched.update_from_output(worker.execute(plan)):
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, tokens in run(sched, worker).items():
        outputs.setdefault(rid, []).extend(tokens)
    assert outputs == separate(prompt, 3, 2, seed=3)
    assert_scheduler_empty(sched)


def test_unseeded_greedy_choices_all_equal_the_single_answer() -> None:
    prompt = list(range(3, 17))
    sched, worker = make(num_blocks=32, block_size=BLOCK_SIZE, budget=8)  # the prompt is chunked
    sched.add_request(request("one", prompt, 9))
    sched.add_request(request("p", prompt, 9, n=4))
    outputs = run(sched, worker)
    assert set(outputs) == {"one", "p#0", "p#1", "p#2", "p#3"}
    assert all(outputs[f"p#{i}"] == outputs["one"] for i in range(4))
    assert_scheduler_empty(sched)


@pytest.mark.parametrize("when", ["waiting", "prefilling", "decoding"])
def test_aborting_the_parent_id_ends_every_choice(when: str) -> None:
    sched, worker = make(num_blocks=32, block_size=BLOCK_SIZE, budget=8, max_seqs=4)
    sched.add_request(request("busy", [1, 2, 3], 20, n=4 if when == "waiting" else 1))
    sched.add_request(request("p", list(range(20)), 20, n=3))
    steps = {"waiting": 1, "prefilling": 2, "decoding": 5}[when]
    for _ in range(steps):
        plan = sched.schedule()
        assert plan is not None
        sched.update_from_output(worker.execute(plan))
    outs = sched.abort_requests(["p"])
    assert sorted((o.request_id, o.finish_reason) for o in outs) == [
        ("p#0", "abort"), ("p#1", "abort"), ("p#2", "abort")]
    assert sched.abort_requests(["p"]) == []
    run(sched, worker)
    assert_scheduler_empty(sched)


def test_aborting_one_choice_leaves_the_others_running() -> None:
    prompt = list(range(1, 11))
    sched, worker = make(num_blocks=32, block_size=BLOCK_SIZE, budget=32)
    sched.add_request(request("p", prompt, 8, n=3, seed=2))
    outputs: dict[str, list[int]] = {}
    for _ in range(3):
        plan = sched.schedule()
        assert plan is not None
        for out in sched.update_from_output(worker.execute(plan)):
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [(o.request_id, o.finish_reason) for o in sched.abort_requests(["p#1"])] == [("p#1", "abort")]
    for rid, tokens in run(sched, worker).items():
        outputs.setdefault(rid, []).extend(tokens)
    expected = separate(prompt, 8, 3, seed=2)
    assert outputs["p#0"] == expected["p#0"] and outputs["p#2"] == expected["p#2"]
    assert outputs["p#1"] == expected["p#1"][: len(outputs["p#1"])] and len(outputs["p#1"]) == 2
    assert_scheduler_empty(sched)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preempted_choices_recompute_and_give_the_same_outputs(prefix_caching: bool) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(50) for _ in range(rng.randint(1, 14))] for _ in range(5)]
    big, big_worker = make(num_blocks=512, budget=64, max_seqs=16, prefix_caching=prefix_caching)
    small, small_worker = make(num_blocks=22, budget=16, max_seqs=16, prefix_caching=prefix_caching)
    for sched in (big, small):
        for i, prompt in enumerate(prompts):
            sched.add_request(request(f"r{i}", prompt, 20, arrival=i, n=1 + i % 3, seed=100 * i))
    expected = run(big, big_worker)
    got = run(small, small_worker)
    assert big.stats.num_preemptions == 0
    assert small.stats.num_preemptions > 0 and small.stats.num_forks == big.stats.num_forks == 3
    assert got == expected
    assert len(expected) == sum(1 + i % 3 for i in range(5))
    assert_scheduler_empty(small)


def test_a_parent_holds_seats_for_all_its_choices() -> None:
    sched, worker = make(num_blocks=64, block_size=BLOCK_SIZE, budget=64, max_seqs=4)
    sched.add_request(request("p", [1, 2, 3, 4, 5], 10, n=3, arrival=0))
    sched.add_request(request("q", [6, 7], 10, n=2, arrival=1))
    sched.add_request(request("r", [8, 9], 10, arrival=2))
    first = sched.schedule()
    assert first is not None
    # p takes 3 seats; q (2 seats) waits at the head of the line, r does not jump it.
    assert set(first.num_scheduled_tokens) == {"p"}
    sched.update_from_output(worker.execute(first))
    second = sched.schedule()
    assert second is not None
    assert set(second.num_scheduled_tokens) == {"p#0", "p#1", "p#2"}
    sched.update_from_output(worker.execute(second))
    run(sched, worker)
    assert sched.stats.max_batch_size <= 4
    assert_scheduler_empty(sched)


def test_admission_counts_n() -> None:
    sched, _ = make(num_blocks=10, block_size=BLOCK_SIZE, max_seqs=8)
    sched.add_request(request("fits", list(range(9)), 11, n=1))  # 5 blocks
    # 2 shared blocks + 3 choices x 3 blocks = 11 > 10
    with pytest.raises(AdmissionError, match=r"n = 3 choices .* need 11 blocks .* can never fit in the KV cache"):
        sched.add_request(request("three", list(range(9)), 11, n=3))
    sched.add_request(request("two", list(range(9)), 11, n=2))  # 2 + 2 x 3 = 8 blocks
    with pytest.raises(AdmissionError, match="n = 9 choices can never run"):
        sched.add_request(request("many", [1], 1, n=9))
    with pytest.raises(AdmissionError, match="n = 0"):
        sched.add_request(request("none", [1], 1, n=0))
    with pytest.raises(AdmissionError, match="contains '#'"):
        sched.add_request(request("a#1", [1], 1))
    sched.abort_requests(["fits", "two"])
    assert_scheduler_empty(sched)


def test_errors_before_the_fork_end_every_choice() -> None:
    sched, worker = make(num_blocks=32, block_size=BLOCK_SIZE, max_seqs=3)
    sched.add_request(request("busy", [1, 2], 30, n=3))
    late = request("late", [3, 4], 5, n=2, arrival=100.0)
    late.queue_deadline = 110.0
    sched.add_request(late)
    plan = sched.schedule()
    assert plan is not None
    sched.update_from_output(worker.execute(plan))
    expired = sched.expire_waiting(now=111.0)
    assert [(o.request_id, o.finish_reason) for o in expired] == [("late#0", "error"), ("late#1", "error")]
    failed = sched.fail_all("the worker group is gone")
    assert sorted(o.request_id for o in failed) == ["busy#0", "busy#1", "busy#2"]
    assert all(o.error is not None and o.error.status == 503 for o in failed)
    assert_scheduler_empty(sched)


def test_random_parallel_requests_with_aborts_and_preemptions_leave_nothing_behind() -> None:
    rng = random.Random(11)
    sched, worker = make(num_blocks=24, block_size=BLOCK_SIZE, budget=24, max_seqs=10)
    num_aborted = 0
    for i in range(300):
        if rng.random() < 0.6:
            prompt = [rng.randrange(3) for _ in range(rng.randint(1, 20))]
            sched.add_request(request(f"r{i}", prompt, rng.randint(1, 12), arrival=i,
                                      n=rng.choice([1, 1, 2, 3, 4]), seed=rng.randrange(1000)))
        if sched.requests and rng.random() < 0.1:
            victim = rng.choice(sorted(sched.requests))  # a request, a parent or one choice
            if rng.random() < 0.5:
                victim = victim.partition("#")[0]  # a choice's parent: all its choices
            num_aborted += len(sched.abort_requests([victim]))
        plan = sched.schedule()
        if plan is not None:
            sched.update_from_output(worker.execute(plan))
        sched.kv_cache.check_invariants()
    run(sched, worker)
    stats = sched.stats
    assert stats.num_forks > 50 and stats.num_preemptions > 20 and stats.num_block_copies > 20, stats
    assert num_aborted > 20
    assert_scheduler_empty(sched)
