"""The scheduler with the real KV cache manager and a fake worker, no torch.

``TokenCacheWorker`` behaves like the model runner where it matters: it keeps
per-request state from plans (new requests once, then diffs), applies the
plan's block copies, writes each computed token into a fake KV cache through
the block table, and "samples" the next token as a function of the whole
context read back from the cache and of the request's seed. A wrong block
table, a shared block overwritten (a missing copy on write: choices of one
prompt differ by their seeds), or a bad prefix-cache hit therefore changes the
outputs, which the tests compare against a run with a large cache or against
separate requests.
"""

from __future__ import annotations

import random

import pytest

from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.request import Request, RequestStatus
from loomserve.scheduler.scheduler import AdmissionError, Scheduler
from loomserve.shared.config import SchedulerConfig
from loomserve.shared.messages import BatchPlan, SamplingParams, StepResult

VOCAB = 50


class TokenCacheWorker:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.cache: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.tokens: dict[str, list[int]] = {}
        self.tables: dict[str, list[int]] = {}
        self.seeds: dict[str, int] = {}

    def execute(self, plan: BatchPlan) -> StepResult:
        for rid in plan.finished_request_ids:
            self.tokens.pop(rid, None)
            self.tables.pop(rid, None)
        start = {}
        for new in plan.new_requests:
            self.tokens[new.request_id] = list(new.token_ids)
            self.tables[new.request_id] = list(new.block_ids)
            self.seeds[new.request_id] = new.sampling.seed or 0
            start[new.request_id] = new.num_computed_tokens
        for cached in plan.cached_requests:
            self.tables[cached.request_id].extend(cached.new_block_ids)
            start[cached.request_id] = cached.num_computed_tokens
        for src, dst in plan.block_copies:
            self.cache[dst] = list(self.cache[src])
        ids, sampled = [], []
        bs = self.block_size
        for rid, n in plan.num_scheduled_tokens.items():
            tokens, table = self.tokens[rid], self.tables[rid]
            for pos in range(start[rid], start[rid] + n):
                self.cache[table[pos // bs]][pos % bs] = tokens[pos]
            end = start[rid] + n
            if end == len(tokens):
                context = [self.cache[table[p // bs]][p % bs] for p in range(end)]
                assert None not in context, f"{rid} reads an unwritten slot"
                token = (sum((i + 1) * (t or 0) for i, t in enumerate(context)) * 31 + end
                         + 7 * self.seeds[rid]) % VOCAB
                tokens.append(token)
                ids.append(rid)
                sampled.append([token])
        return StepResult(plan.step_id, ids, sampled)


def make(num_blocks: int = 64, block_size: int = 4, budget: int = 32, max_seqs: int = 8,
         prefix_caching: bool = True, policy: str = "fcfs", batching: str = "continuous",
         async_scheduling: bool = False) -> tuple[Scheduler, TokenCacheWorker]:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy,
                             enable_prefix_caching=prefix_caching, batching=batching,
                             async_scheduling=async_scheduling)
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    return Scheduler(config, kv, max_model_len=4096, record_batches=True), TokenCacheWorker(num_blocks, block_size)


def request(rid: str, prompt: list[int], max_tokens: int, priority: int = 0, arrival: float = 0.0,
            stop: list[int] | None = None, n: int = 1, seed: int | None = None) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop or [], seed=seed)
    return Request(rid, prompt, sampling, arrival_time=arrival, priority=priority, n=n)


def run(sched: Scheduler, worker: TokenCacheWorker, max_steps: int = 10_000) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        plan = sched.schedule()
        if plan is None:
            break
        assert sum(plan.num_scheduled_tokens.values()) <= sched.config.max_num_batched_tokens
        assert len(plan.num_scheduled_tokens) <= sched.config.max_num_seqs
        assert plan.lookahead == sched.config.async_scheduling
        for out in sched.update_from_output(worker.execute(plan)):
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return outputs


def assert_scheduler_empty(sched: Scheduler) -> None:
    """No request anywhere, every block free, every reference count 0."""
    assert sched.is_idle_and_empty()
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks
    sched.kv_cache.check_invariants()


def random_prompts(n: int, seed: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(VOCAB) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def test_prefill_then_one_token_per_step_under_the_budget() -> None:
    sched, worker = make(budget=16)
    sched.add_request(request("a", list(range(10)), 3))
    sched.add_request(request("b", list(range(20, 30)), 3))
    plan = sched.schedule()
    assert plan is not None
    # a's whole prompt, then as much of b's as the budget leaves (chunked prefill).
    assert plan.num_scheduled_tokens == {"a": 10, "b": 6}
    sched.update_from_output(worker.execute(plan))
    plan = sched.schedule()
    assert plan is not None
    # decodes first, then the rest of b's prompt
    assert plan.num_scheduled_tokens == {"a": 1, "b": 4}
    assert [n.request_id for n in plan.new_requests] == []
    sched.update_from_output(worker.execute(plan))
    run(sched, worker)
    assert_scheduler_empty(sched)


def test_new_request_data_is_sent_once_then_only_diffs() -> None:
    sched, worker = make(block_size=4)
    sched.add_request(request("a", list(range(7)), 5))
    first = sched.schedule()
    assert first is not None
    assert [n.request_id for n in first.new_requests] == ["a"]
    assert first.new_requests[0].block_ids == sched.kv_cache.get_block_ids("a")
    sched.update_from_output(worker.execute(first))
    second = sched.schedule()
    assert second is not None
    assert second.new_requests == []
    assert [c.request_id for c in second.cached_requests] == ["a"]
    assert second.cached_requests[0].new_block_ids == []  # token 8 still fits block 2
    sched.update_from_output(worker.execute(second))
    third = sched.schedule()
    assert third is not None
    assert len(third.cached_requests[0].new_block_ids) == 1  # token 9 opens a new block


def test_requests_join_and_leave_at_step_granularity() -> None:
    sched, worker = make(budget=64)
    sched.add_request(request("long", [1, 2, 3], 8))
    sched.add_request(request("short", [4, 5], 2))
    steps = []
    for step in range(12):
        if step == 3:
            sched.add_request(request("late", [6, 7, 8], 3))
        plan = sched.schedule()
        if plan is None:
            break
        steps.append(sorted(plan.num_scheduled_tokens))
        sched.update_from_output(worker.execute(plan))
    assert steps[0] == ["long", "short"]
    assert steps[1] == ["long", "short"]  # short decodes its 2nd token and leaves
    assert steps[2] == ["long"]
    assert steps[3] == ["late", "long"]  # late joins while long is decoding
    assert "late" not in steps[6] and "long" in steps[6]
    assert_scheduler_empty(sched)


def test_max_num_seqs_caps_the_batch() -> None:
    sched, worker = make(max_seqs=3, budget=512)
    for i in range(7):
        sched.add_request(request(f"r{i}", [i + 1] * 5, 4))
    outputs = run(sched, worker)
    assert sched.stats.max_batch_size == 3
    assert all(len(outputs[f"r{i}"]) == 4 for i in range(7))
    assert_scheduler_empty(sched)


def test_stop_token_and_length() -> None:
    sched, worker = make()
    sched.add_request(request("a", [3, 1, 4], 50))
    outputs = run(sched, worker)
    stop_at = outputs["a"][4]
    sched2, worker2 = make()
    sched2.add_request(request("a", [3, 1, 4], 50, stop=[stop_at]))
    out2 = run(sched2, worker2)
    first = outputs["a"].index(stop_at)
    assert out2["a"] == outputs["a"][: first + 1]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_a_tiny_cache_gives_the_same_outputs(prefix_caching: bool) -> None:
    prompts = random_prompts(12, seed=1, shared_prefix=9)
    big, big_worker = make(num_blocks=512, budget=64, max_seqs=12, prefix_caching=prefix_caching)
    for i, p in enumerate(prompts):
        big.add_request(request(f"r{i}", p, 30, arrival=i))
    expected = run(big, big_worker)
    assert big.stats.num_preemptions == 0

    small, small_worker = make(num_blocks=24, budget=64, max_seqs=12, prefix_caching=prefix_caching)
    for i, p in enumerate(prompts):
        small.add_request(request(f"r{i}", p, 30, arrival=i))
    got = run(small, small_worker)
    assert small.stats.num_preemptions > 0
    assert got == expected
    assert_scheduler_empty(small)


def test_preemption_victim_is_lowest_priority_then_latest() -> None:
    sched, worker = make(num_blocks=8, block_size=4, budget=64, policy="priority")
    sched.add_request(request("urgent", [1] * 8, 20, priority=0, arrival=2))
    sched.add_request(request("early", [2] * 8, 20, priority=5, arrival=0))
    sched.add_request(request("late", [3] * 8, 20, priority=5, arrival=1))
    preempted: list[set[str]] = []
    for _ in range(200):
        plan = sched.schedule()
        if plan is None:
            break
        before = sched.stats.num_preemptions
        sched.update_from_output(worker.execute(plan))
        if before and len(preempted) < before:
            preempted.append({r.request_id for r in sched.waiting})
    assert preempted and preempted[0] == {"late"}
    assert_scheduler_empty(sched)


def test_abort_while_waiting_prefilling_and_decoding_frees_everything() -> None:
    sched, worker = make(budget=8, max_seqs=2)
    sched.add_request(request("decoding", [1, 2, 3], 50))
    sched.add_request(request("prefilling", list(range(30)), 50))
    sched.add_request(request("waiting", [4, 5], 50))
    for _ in range(2):
        plan = sched.schedule()
        assert plan is not None
        sched.update_from_output(worker.execute(plan))
    assert {r.request_id for r in sched.running} == {"decoding", "prefilling"}
    assert sched.requests["prefilling"].num_computed_tokens < 30
    outs = sched.abort_requests(["waiting", "prefilling", "decoding", "unknown"])
    assert [(o.request_id, o.finish_reason) for o in outs] == [
        ("waiting", "abort"), ("prefilling", "abort"), ("decoding", "abort")]
    assert_scheduler_empty(sched)
    plan = sched.schedule()
    assert plan is None
    # the worker learns of the ended requests with the next plan
    sched.add_request(request("next", [9], 1))
    plan = sched.schedule()
    assert plan is not None and set(plan.finished_request_ids) == {"prefilling", "decoding"}


def test_admission_refuses_what_can_never_fit() -> None:
    sched, _ = make(num_blocks=4, block_size=4)
    with pytest.raises(AdmissionError, match="can never fit in the KV cache"):
        sched.add_request(request("big", [1] * 10, 10))
    sched.max_model_len = 12
    with pytest.raises(AdmissionError, match="maximum context length is 12"):
        sched.add_request(request("long", [1] * 10, 5))
    with pytest.raises(AdmissionError, match="empty"):
        sched.add_request(request("empty", [], 5))
    assert_scheduler_empty(sched)


def test_many_random_requests_with_aborts_leave_nothing_behind() -> None:
    rng = random.Random(7)
    sched, worker = make(num_blocks=40, block_size=4, budget=48, max_seqs=6)
    live: list[str] = []
    for i in range(300):
        if rng.random() < 0.5:
            rid = f"r{i}"
            prompt = [rng.randrange(3) for _ in range(rng.randint(1, 30))]
            sched.add_request(request(rid, prompt, rng.randint(1, 20), arrival=i))
            live.append(rid)
        if live and rng.random() < 0.15:
            sched.abort_requests([live.pop(rng.randrange(len(live)))])
        plan = sched.schedule()
        if plan is not None:
            for out in sched.update_from_output(worker.execute(plan)):
                if out.finish_reason and out.request_id in live:
                    live.remove(out.request_id)
        sched.kv_cache.check_invariants()
    run(sched, worker)
    assert_scheduler_empty(sched)


def test_static_batching_admits_the_next_batch_only_when_the_whole_batch_ended() -> None:
    sched, worker = make(max_seqs=3, budget=8, batching="static")
    lengths = [2, 9, 4, 3, 3, 3]
    for i, n in enumerate(lengths):
        sched.add_request(request(f"r{i}", [i + 1] * 6, n, arrival=i))
    outputs = run(sched, worker)
    batches = [set(b) for b in sched.stats.batch_history]
    first, second = {"r0", "r1", "r2"}, {"r3", "r4", "r5"}
    end_of_first = max(i for i, b in enumerate(batches) if b & first)
    start_of_second = min(i for i, b in enumerate(batches) if b & second)
    assert start_of_second == end_of_first + 1
    assert all(b <= first or b <= second for b in batches)
    # r1 runs alone after r0 and r2 ended: the slots of a static batch stay empty
    assert batches[end_of_first] == {"r1"}
    # the budget of 8 covers one prompt and a bit: the batch was still admitted whole
    assert {"r0", "r1"} <= batches[0] and "r2" not in batches[0]
    cont, cont_worker = make(max_seqs=3, budget=8)
    for i, n in enumerate(lengths):
        cont.add_request(request(f"r{i}", [i + 1] * 6, n, arrival=i))
    assert run(cont, cont_worker) == outputs
    assert len(cont.stats.batch_history) < len(sched.stats.batch_history)
    assert_scheduler_empty(sched)


def test_a_full_queue_refuses_with_503_and_retry_after() -> None:
    sched, _ = make()
    sched.config = SchedulerConfig(max_waiting_requests=2, max_waiting_tokens=100, queue_full_retry_after_s=3.0)
    sched.add_request(request("a", [1] * 10, 5))
    sched.add_request(request("b", [1] * 10, 5))
    with pytest.raises(AdmissionError) as full:
        sched.add_request(request("c", [1] * 10, 5))
    assert full.value.error.status == 503 and full.value.error.retry_after_s == 3.0
    assert "queue is full" in full.value.error.message
    sched.abort_requests(["b"])
    with pytest.raises(AdmissionError, match="prompt tokens waiting"):
        sched.add_request(request("big", [1] * 95, 5))
    sched.add_request(request("c", [1] * 10, 5))
    sched.abort_requests(["a", "c"])
    assert_scheduler_empty(sched)


def test_queue_timeout_fails_requests_that_never_started() -> None:
    sched, worker = make(max_seqs=1)
    started = request("started", [1, 2], 50)
    sched.add_request(started)
    plan = sched.schedule()
    assert plan is not None
    sched.update_from_output(worker.execute(plan))
    late = request("late", [3, 4], 5, arrival=100.0)
    late.queue_deadline = 110.0
    sched.add_request(late)
    assert sched.expire_waiting(now=105.0) == []
    expired = sched.expire_waiting(now=111.0)
    assert [(o.request_id, o.finish_reason) for o in expired] == [("late", "error")]
    assert expired[0].error is not None and expired[0].error.type == "queue_timeout"
    assert "11.0 s" in expired[0].error.message
    sched.abort_requests(["started"])
    assert_scheduler_empty(sched)


def test_a_head_of_line_request_retried_every_step_is_one_prefix_cache_query() -> None:
    sched, worker = make(num_blocks=6, block_size=4, budget=64)
    sched.add_request(request("first", list(range(12)), 8))  # 5 blocks by its end
    plan = sched.schedule()
    assert plan is not None
    sched.update_from_output(worker.execute(plan))
    sched.add_request(request("second", list(range(20, 30)), 2))  # 3 blocks: waits for "first"
    for _ in range(4):
        plan = sched.schedule()
        assert plan is not None and "second" not in plan.num_scheduled_tokens
        sched.update_from_output(worker.execute(plan))
    assert sched.kv_cache.prefix_cache_queries == 12
    outputs = run(sched, worker)
    assert len(outputs["second"]) == 2
    assert sched.kv_cache.prefix_cache_queries == 12 + 10
    assert_scheduler_empty(sched)


def test_no_request_is_admitted_in_a_step_that_preempted_one() -> None:
    # Three blocks of 4 and two seats: a and b take a block each, c waits for a seat; at
    # position 4 both a and b need a second block, and b, the lowest priority, is preempted.
    sched, worker = make(num_blocks=3, block_size=4, budget=16, max_seqs=2, policy="priority")
    sched.add_request(request("a", [1, 2, 3], 6, priority=0))
    sched.add_request(request("b", [4, 5, 6], 6, priority=5))
    for step in range(2):
        plan = sched.schedule()
        assert plan is not None and set(plan.num_scheduled_tokens) == {"a", "b"}
        sched.update_from_output(worker.execute(plan))
        if step == 0:
            sched.add_request(request("c", [7], 2, priority=1))
    plan = sched.schedule()
    assert plan is not None and plan.num_scheduled_tokens == {"a": 1}
    assert sched.requests["b"].status is RequestStatus.PREEMPTED
    # c, now at the head of the line, would have a seat and a free block, but admitting
    # in the step that evicted would only evict again.
    assert sched.num_running == 1 and sched.kv_cache.num_free_blocks == 1
    sched.update_from_output(worker.execute(plan))
    plan = sched.schedule()
    assert plan is not None and plan.num_scheduled_tokens == {"a": 1, "c": 1}
    sched.update_from_output(worker.execute(plan))
    run(sched, worker)
    assert_scheduler_empty(sched)
