"""Asynchronous scheduling: the next plan is made before the last one's result is back.

A plan commits its requests' progress when it is made (plan_builder.py): a request that
gets a token sampled counts it in ``Request.num_pending`` until ``update_from_output()``
applies the workers' ``StepResult`` and appends it. So with
``SchedulerConfig.async_scheduling`` the scheduler server keeps two plans in flight, and
a decode continues from a token only the workers know yet (``BatchPlan.lookahead`` tells
them to hold its result). What that costs, and where it is paid:

    cost                                                      where
    --------------------------------------------------------  -------------------------------
    a request that samples a stop token has computed one      its result is dropped
    token more                                                (InFlightTokens.drop_result)
    one whose pending tokens reach max_tokens is not          Scheduler._schedule_decodes
    scheduled again
    a request preempted with tokens in flight waits for       Scheduler._admit_waiting
    them before it is re-admitted
    a request id whose tokens are still in flight after it    InFlightTokens.holds_any
    ended is not taken again until they are back

With one plan at a time ``num_pending`` is 0 whenever a plan is made, and none of this
happens. The checks on ``num_pending`` stay inline in the scheduler's loops, which run
once per sequence per step.
"""

from __future__ import annotations

from loomserve.scheduler.request import Request
from loomserve.shared.messages import choice_request_ids


class InFlightTokens:
    """Whether plans are made ahead, and the ended requests whose tokens are still in flight."""

    def __init__(self, lookahead: bool) -> None:
        self.lookahead = lookahead
        self._draining: dict[str, int] = {}  # request id -> tokens in flight

    def ended(self, request: Request) -> None:
        """``request`` ended: the results of its tokens in flight are to be dropped."""
        if request.num_pending:
            self._draining[request.request_id] = request.num_pending

    def drop_result(self, request_id: str) -> None:
        """A token came back for a request that is no more."""
        left = self._draining.pop(request_id, 0) - 1
        if left > 0:
            self._draining[request_id] = left

    def holds_any(self, request_id: str, n: int) -> bool:
        """Whether tokens are still in flight for ``request_id`` or one of its ``n`` choices."""
        return bool(self._draining) and any(i in self._draining for i in choice_request_ids(request_id, n))

    def clear(self) -> None:
        """Forget them all: the worker group is gone, and its results with it."""
        self._draining.clear()

    def is_empty(self) -> bool:
        return not self._draining
