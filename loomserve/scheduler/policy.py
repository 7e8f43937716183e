"""Who goes first and who is preempted: the waiting queue and the choice of victim.

Policies (``--policy``):

    fcfs      order by arrival time; priority values are ignored
    priority  order by (priority, arrival time); a lower value is served first

A preempted request keeps its arrival time, so it returns to the front of the
queue it left. The victim of a preemption is the running request that the
policy would serve last: the lowest priority (highest value), then the latest
arrival.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator

from loomserve.scheduler.request import Request

POLICIES = ("fcfs", "priority")


class WaitingQueue:
    """A priority queue of waiting requests with O(log n) push/pop and lazy removal.

    A heap entry is live while its request id maps to the entry's own push number:
    an entry left behind by ``remove`` stays dead even when a new request reuses the id.
    """

    def __init__(self, policy: str = "fcfs") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; choose one of {POLICIES}")
        self.policy = policy
        self._heap: list[tuple[int, float, int, Request]] = []
        self._members: dict[str, int] = {}  # request id -> push number of its live entry
        self._counter = itertools.count()
        self.num_tokens = 0  # prompt tokens still to compute, for the token bound

    def _key(self, request: Request) -> tuple[int, float, int]:
        priority = request.priority if self.policy == "priority" else 0
        return (priority, request.arrival_time, next(self._counter))

    def push(self, request: Request) -> None:
        entry = (*self._key(request), request)
        heapq.heappush(self._heap, entry)
        self._members[request.request_id] = entry[2]
        self.num_tokens += request.num_tokens

    def _is_live(self, entry: tuple[int, float, int, Request]) -> bool:
        return self._members.get(entry[3].request_id) == entry[2]

    def _drop_removed(self) -> None:
        while self._heap and not self._is_live(self._heap[0]):
            heapq.heappop(self._heap)

    def peek(self) -> Request | None:
        self._drop_removed()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Request:
        self._drop_removed()
        request = heapq.heappop(self._heap)[3]
        del self._members[request.request_id]
        self.num_tokens -= request.num_tokens
        return request

    def remove(self, request: Request) -> bool:
        """Remove ``request`` if queued (its heap entry is skipped when it surfaces)."""
        if request.request_id not in self._members:
            return False
        del self._members[request.request_id]
        self.num_tokens -= request.num_tokens
        return True

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap) if self._is_live(entry))


def preemption_order_key(policy: str, request: Request) -> tuple[int, float]:
    """Larger key = preempted sooner."""
    priority = request.priority if policy == "priority" else 0
    return (priority, request.arrival_time)


def pick_victim(policy: str, candidates: Iterable[Request]) -> Request:
    return max(candidates, key=lambda r: preemption_order_key(policy, r))
