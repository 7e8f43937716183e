"""The plan builder alone: full data once, then diffs; ended requests named once; progress committed."""

from __future__ import annotations

from loomserve.scheduler.plan_builder import PlanBuilder
from loomserve.scheduler.request import Request
from loomserve.shared.messages import SamplingParams


def request(rid: str, prompt: list[int], n: int = 1) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=8, seed=3), n=n)


def test_a_request_goes_out_whole_once_then_as_new_blocks_and_its_progress() -> None:
    plans = PlanBuilder()
    a = request("a", [1, 2, 3, 4, 5])
    plans.send_whole("a", [4, 7])
    first = plans.build([a], {"a": 5}, lookahead=False)
    assert first.step_id == 1 and not first.lookahead
    assert [(r.request_id, r.token_ids, r.block_ids, r.num_computed_tokens, r.sampling.seed)
            for r in first.new_requests] == [("a", [1, 2, 3, 4, 5], [4, 7], 0, 3)]
    assert first.cached_requests == [] and first.num_scheduled_tokens == {"a": 5}
    assert (a.num_computed_tokens, a.num_pending) == (5, 1)  # its whole prompt: a token is sampled

    sent = first.new_requests[0].block_ids
    plans.unsent_blocks["a"] += [9]  # the scheduler allocated a block for its next token
    assert sent == [4, 7], "a later block must not reach a plan already made"
    second = plans.build([a], {"a": 1}, lookahead=True)
    assert second.step_id == 2 and second.lookahead and second.new_requests == []
    assert [(c.request_id, c.new_block_ids, c.num_computed_tokens) for c in second.cached_requests] == [("a", [9], 5)]
    assert (a.num_computed_tokens, a.num_pending) == (6, 2)  # a decode of the token in flight
    third = plans.build([a], {"a": 1}, lookahead=True)
    assert [(c.new_block_ids, c.num_computed_tokens) for c in third.cached_requests] == [([], 6)]


def test_a_prefill_chunk_and_a_parent_sample_nothing() -> None:
    plans = PlanBuilder()
    chunked, parent = request("c", list(range(10))), request("p", list(range(6)), n=2)
    plans.send_whole("c", [0, 1])
    plans.send_whole("p", [2, 3])
    plans.build([chunked, parent], {"c": 8, "p": 5}, lookahead=False)
    assert (chunked.num_computed_tokens, chunked.num_pending) == (8, 0)
    assert (parent.num_computed_tokens, parent.num_pending) == (5, 0)


def test_ended_requests_are_named_once_and_only_if_the_workers_hold_them() -> None:
    plans = PlanBuilder()
    a = request("a", [1, 2])
    plans.send_whole("a", [0])
    plans.send_whole("b", [1])
    plans.build([a], {"a": 2}, lookahead=False)  # b was admitted but never scheduled
    for rid in ("a", "b"):
        plans.stop_sending(rid)
        plans.finish(rid)
    c = request("c", [5])
    plans.send_whole("c", [2])
    assert plans.build([c], {"c": 1}, lookahead=False).finished_request_ids == ["a"]
    assert plans.build([c], {"c": 1}, lookahead=False).finished_request_ids == []


def test_a_preempted_request_is_sent_whole_again_on_new_blocks() -> None:
    plans = PlanBuilder()
    a = request("a", [1, 2, 3])
    plans.send_whole("a", [0])
    plans.build([a], {"a": 3}, lookahead=False)
    plans.stop_sending("a")  # preempted: the workers keep its sampling state, not its blocks
    a.num_computed_tokens = 0
    plans.send_whole("a", [5])
    plan = plans.build([a], {"a": 3}, lookahead=False)
    assert [(r.request_id, r.block_ids, r.num_computed_tokens) for r in plan.new_requests] == [("a", [5], 0)]
    assert plan.finished_request_ids == []


def test_block_copies_go_out_with_the_next_plan_only() -> None:
    plans = PlanBuilder()
    a = request("a", [1])
    plans.send_whole("a", [0])
    first = plans.build([a], {"a": 1}, lookahead=False)
    plans.copy_blocks([(2, 3)])
    plans.copy_blocks([(2, 4)])
    assert first.block_copies == [], "copies must not reach a plan already made"
    assert plans.build([a], {"a": 1}, lookahead=False).block_copies == [(2, 3), (2, 4)]
    assert plans.build([a], {"a": 1}, lookahead=False).block_copies == []


def test_clear_forgets_what_the_workers_held() -> None:
    plans = PlanBuilder()
    a = request("a", [1])
    plans.send_whole("a", [0])
    plans.build([a], {"a": 1}, lookahead=False)
    plans.copy_blocks([(0, 1)])
    plans.finish("a")
    plans.clear()
    b = request("b", [2])
    plans.send_whole("b", [0])
    plan = plans.build([b], {"b": 1}, lookahead=False)
    assert plan.finished_request_ids == [] and plan.block_copies == []
    assert [r.request_id for r in plan.new_requests] == ["b"]
