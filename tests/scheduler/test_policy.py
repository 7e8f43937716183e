"""The waiting queue's order and its lazy removal."""

from __future__ import annotations

from loomserve.scheduler.policy import WaitingQueue
from loomserve.scheduler.request import Request
from loomserve.shared.messages import SamplingParams


def _request(rid: str, arrival: float, priority: int = 0) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=4), arrival_time=arrival, priority=priority)


def test_a_removed_entry_stays_dead_when_its_id_is_reused() -> None:
    queue = WaitingQueue("fcfs")
    old = _request("x", arrival=1.0)
    queue.push(old)
    queue.push(_request("y", arrival=2.0))
    assert queue.remove(old)
    new = _request("x", arrival=3.0)  # the same id, queued again behind y
    queue.push(new)
    assert [r.request_id for r in queue] == ["y", "x"] and list(queue)[1] is new
    assert len(queue) == 2 and queue.num_tokens == 6
    assert queue.pop().request_id == "y"
    assert queue.pop() is new
    assert queue.peek() is None and len(queue) == 0 and queue.num_tokens == 0


def test_priority_orders_before_arrival_and_fcfs_ignores_it() -> None:
    for policy, expected in (("priority", ["b", "a", "c"]), ("fcfs", ["a", "b", "c"])):
        queue = WaitingQueue(policy)
        for r in (_request("a", 1.0, priority=5), _request("b", 2.0, priority=0), _request("c", 3.0, priority=5)):
            queue.push(r)
        assert [queue.pop().request_id for _ in range(3)] == expected
