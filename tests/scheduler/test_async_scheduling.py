"""Asynchronous scheduling: the next plan is made before the last one's result is back.

The fake worker (``TokenCacheWorker``) answers each plan as soon as it is made, but the
scheduler only sees a result after it made the plan after (two in flight, as the
scheduler server keeps them). Outputs must equal those of one step at a time, through
preemptions, stop tokens, length limits, parallel sampling and aborts.
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from loomserve.scheduler.async_scheduling import InFlightTokens
from loomserve.scheduler.request import RequestStatus
from loomserve.scheduler.scheduler import AdmissionError, Scheduler
from loomserve.shared.messages import StepResult
from tests.scheduler.test_scheduler import (
    VOCAB,
    TokenCacheWorker,
    assert_scheduler_empty,
    make,
    random_prompts,
    request,
    run,
)


def make_async(**kwargs: object) -> tuple[Scheduler, TokenCacheWorker]:
    return make(**kwargs, async_scheduling=True)  # type: ignore[arg-type]


def run_async(sched: Scheduler, worker: TokenCacheWorker, depth: int = 2,
              abort_at: dict[int, str] | None = None) -> dict[str, list[int]]:
    """Keep ``depth`` plans in flight; apply each result after the plans made since."""
    outputs: dict[str, list[int]] = {}
    in_flight: deque[StepResult] = deque()
    steps = 0
    while True:
        while len(in_flight) < depth:
            plan = sched.schedule()
            if plan is None:
                break
            assert plan.lookahead
            assert sum(plan.num_scheduled_tokens.values()) <= sched.config.max_num_batched_tokens
            assert len(plan.num_scheduled_tokens) <= sched.config.max_num_seqs
            in_flight.append(worker.execute(plan))
        if not in_flight:
            return outputs
        for out in sched.update_from_output(in_flight.popleft()):
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        sched.kv_cache.check_invariants()
        steps += 1
        if abort_at and steps in abort_at:
            for out in sched.abort_requests([abort_at[steps]]):
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)


def test_a_lookahead_plan_continues_from_the_pending_token_up_to_max_tokens() -> None:
    sched, worker = make_async()
    sched.add_request(request("a", [3, 1, 4, 1, 5], max_tokens=3))
    first = sched.schedule()
    assert first is not None and first.num_scheduled_tokens == {"a": 5}
    second = sched.schedule()  # before the first result: a decode of the token being sampled
    assert second is not None and second.num_scheduled_tokens == {"a": 1}
    assert second.cached_requests[0].num_computed_tokens == 5
    third = sched.schedule()
    assert third is not None and third.num_scheduled_tokens == {"a": 1}
    req = sched.requests["a"]
    assert (req.num_computed_tokens, req.num_pending, len(req.token_ids)) == (7, 3, 5)
    assert sched.schedule() is None  # its third and last token is in flight
    outputs = [sched.update_from_output(worker.execute(plan)) for plan in (first, second, third)]
    assert [[o.finish_reason for o in outs] for outs in outputs] == [[None], [None], ["length"]]
    assert [t for outs in outputs for o in outs for t in o.new_token_ids] == run(*_sync("a", [3, 1, 4, 1, 5], 3))["a"]
    assert_scheduler_empty(sched)


def _sync(rid: str, prompt: list[int], max_tokens: int) -> tuple[Scheduler, TokenCacheWorker]:
    sched, worker = make()
    sched.add_request(request(rid, prompt, max_tokens))
    return sched, worker


def test_a_stop_token_wastes_the_step_in_flight_and_the_id_waits_for_it() -> None:
    sched, _ = make_async()
    stop = 7
    sched.add_request(request("a", [1, 2, 3], max_tokens=10, stop=[stop]))
    first, second = sched.schedule(), sched.schedule()
    assert first is not None and second is not None
    (out,) = sched.update_from_output(StepResult(first.step_id, ["a"], [[stop]]))
    assert out.finish_reason == "stop" and out.new_token_ids == [stop]
    with pytest.raises(AdmissionError, match="already in use"):  # its second token is still in flight
        sched.add_request(request("a", [9], max_tokens=1))
    assert sched.update_from_output(StepResult(second.step_id, ["a"], [[5]])) == []  # dropped
    sched.add_request(request("a", [9], max_tokens=1))
    third = sched.schedule()
    assert third is not None and third.finished_request_ids == ["a"] and third.new_requests[0].token_ids == [9]
    (out,) = sched.update_from_output(StepResult(third.step_id, ["a"], [[4]]))
    assert out.finish_reason == "length"
    assert_scheduler_empty(sched)


def test_a_request_preempted_with_a_token_in_flight_takes_it_and_resumes_after() -> None:
    # Three blocks of 4: two 3-token prompts, then both need a second block at position 4.
    sched, worker = make_async(num_blocks=3, block_size=4, budget=16)
    sched.add_request(request("a", [1, 2, 3], max_tokens=6, arrival=0.0))
    sched.add_request(request("b", [4, 5, 6], max_tokens=6, arrival=1.0))
    results = deque(worker.execute(p) for p in (sched.schedule(), sched.schedule()) if p is not None)
    assert len(results) == 2
    outputs: dict[str, list[int]] = {}
    for out in sched.update_from_output(results.popleft()):
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    third = sched.schedule()  # a takes the last block; b, the latest, is preempted
    assert third is not None and third.num_scheduled_tokens == {"a": 1}
    b = sched.requests["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_pending == 1
    results.append(worker.execute(third))
    fourth = sched.schedule()  # b still waits for its token in flight
    assert fourth is not None and "b" not in fourth.num_scheduled_tokens
    results.append(worker.execute(fourth))
    for out in sched.update_from_output(results.popleft()):
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert b.num_pending == 0 and len(outputs["b"]) == 2  # the preempted request got its token
    while results:
        for out in sched.update_from_output(results.popleft()):
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, tokens in run_async(sched, worker).items():
        outputs.setdefault(rid, []).extend(tokens)
    reference, ref_worker = make(num_blocks=64, block_size=4)
    reference.add_request(request("a", [1, 2, 3], max_tokens=6))
    reference.add_request(request("b", [4, 5, 6], max_tokens=6))
    assert outputs == run(reference, ref_worker)
    assert sched.stats.num_preemptions >= 1
    assert_scheduler_empty(sched)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_requests_give_the_same_outputs_as_one_step_at_a_time(prefix_caching: bool) -> None:
    """Shared prefixes, stop tokens, n > 1 with seeds, aborts, and a cache so small that
    requests are preempted with tokens in flight."""
    rng = random.Random(11)
    prompts = random_prompts(24, seed=5, shared_prefix=6)
    specs = []
    for i, prompt in enumerate(prompts):
        n = 2 if i % 6 == 0 else 1
        specs.append((f"r{i}", prompt, rng.randint(1, 14), [rng.randrange(VOCAB)] if i % 3 == 0 else None, n,
                      i if n > 1 else None))

    def submit(sched: Scheduler) -> None:
        for rid, prompt, max_tokens, stop, n, seed in specs:
            sched.add_request(request(rid, prompt, max_tokens, arrival=float(len(sched.requests)), stop=stop,
                                      n=n, seed=seed))

    reference, ref_worker = make(num_blocks=256, prefix_caching=prefix_caching, budget=24, max_seqs=6)
    submit(reference)
    expected = run(reference, ref_worker)

    sched, worker = make_async(num_blocks=30, prefix_caching=prefix_caching, budget=24, max_seqs=6)
    submit(sched)
    assert run_async(sched, worker) == expected
    assert sched.stats.num_preemptions > 0
    assert_scheduler_empty(sched)

    aborted, worker = make_async(num_blocks=30, prefix_caching=prefix_caching, budget=24, max_seqs=6)
    submit(aborted)
    outputs = run_async(aborted, worker, abort_at={3: "r1", 6: "r0", 9: "r4"})
    assert set(outputs) == set(expected)
    assert_scheduler_empty(aborted)


# -- the bookkeeping alone -------------------------------------------------------------


def test_an_ended_request_holds_its_id_and_its_choices_ids_until_its_tokens_are_back() -> None:
    in_flight = InFlightTokens(lookahead=True)
    ended = request("a#1", [1, 2], max_tokens=4)
    ended.num_pending = 2
    in_flight.ended(ended)
    in_flight.ended(request("b", [3], max_tokens=4))  # nothing in flight: nothing held
    assert in_flight.holds_any("a#1", 1) and in_flight.holds_any("a", 2)  # a parent of choices a#0, a#1
    assert not in_flight.holds_any("a", 1) and not in_flight.holds_any("b", 1)
    in_flight.drop_result("a#1")
    assert in_flight.holds_any("a", 2)
    in_flight.drop_result("a#1")
    assert not in_flight.holds_any("a", 2) and in_flight.is_empty()


def test_clear_forgets_every_token_in_flight() -> None:
    in_flight = InFlightTokens(lookahead=False)
    ended = request("a", [1], max_tokens=4)
    ended.num_pending = 1
    in_flight.ended(ended)
    in_flight.clear()
    assert in_flight.is_empty() and not in_flight.holds_any("a", 1)
