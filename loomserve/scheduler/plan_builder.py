"""A step's scheduled tokens as the ``BatchPlan`` the workers run: full data once, then diffs.

The workers keep each request's tokens, sampling parameters and block table between
steps. So a request goes out whole once (``new_requests``: when it is admitted, when it
is re-admitted after a preemption, and each choice of a fork); after that a plan carries
only what changed (``cached_requests``: the blocks allocated since the last plan that
carried it, and the computed-token count to continue from). A request that ended is
named once, in the next plan, so that the workers drop it.
"""

from __future__ import annotations

from loomserve.scheduler.request import Request
from loomserve.shared.messages import BatchPlan, CachedRequestData, NewRequestData


class PlanBuilder:
    """What the workers know of each request, and what the next plan must tell them."""

    def __init__(self) -> None:
        self._step_id = 0
        # Block ids allocated to a running request that no plan has carried yet. The
        # scheduler appends to these lists itself: that happens once per sequence per step.
        self.unsent_blocks: dict[str, list[int]] = {}
        # Running since it was last sent whole (admitted, re-admitted, or a new choice).
        self._needs_full_data: set[str] = set()
        # Sent whole once: the workers hold its state until a plan names it finished.
        self._known_to_worker: set[str] = set()
        self._finished: list[str] = []  # ended since the last plan
        self._block_copies: list[tuple[int, int]] = []  # (src, dst), made before the next plan runs

    def send_whole(self, request_id: str, block_ids: list[int]) -> None:
        """The request runs (again) on ``block_ids``: the next plan that schedules it sends it whole."""
        self.unsent_blocks[request_id] = block_ids
        self._needs_full_data.add(request_id)

    def stop_sending(self, request_id: str) -> None:
        """The request stopped running (preempted, ended or forked): none of its blocks go out."""
        del self.unsent_blocks[request_id]
        self._needs_full_data.discard(request_id)

    def finish(self, request_id: str) -> None:
        """The request ended: the next plan tells the workers to drop it, if they hold it."""
        if request_id in self._known_to_worker:
            self._known_to_worker.discard(request_id)
            self._finished.append(request_id)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self._block_copies = self._block_copies + copies  # a new list: the last plan may hold the old one

    def clear(self) -> None:
        """Forget everything: the worker group is gone."""
        self.unsent_blocks.clear()
        self._needs_full_data.clear()
        self._known_to_worker.clear()
        self._finished = []
        self._block_copies = []

    def build(self, requests: list[Request], num_scheduled_tokens: dict[str, int], lookahead: bool) -> BatchPlan:
        """The plan computing ``num_scheduled_tokens`` of ``requests`` (in that order), and its commitment.

        Progress counts from now, since the next plan may be made before this one's result
        is back: each request's ``num_computed_tokens`` advances by its scheduled tokens, and
        one that gets a token sampled counts it in ``num_pending``.
        """
        new_requests: list[NewRequestData] = []
        cached_requests: list[CachedRequestData] = []
        unsent = self.unsent_blocks
        needs_full_data = self._needs_full_data
        for request in requests:
            rid = request.request_id
            blocks = unsent[rid]
            if blocks:
                unsent[rid] = []
            else:
                blocks = []  # not the list in unsent: later blocks are appended to that one
            computed = request.num_computed_tokens
            if rid in needs_full_data:
                needs_full_data.discard(rid)
                self._known_to_worker.add(rid)
                new_requests.append(NewRequestData(
                    request_id=rid,
                    token_ids=list(request.token_ids),
                    sampling=request.sampling,
                    block_ids=blocks,
                    num_computed_tokens=computed,
                    traceparent=request.traceparent,
                ))
            else:
                cached_requests.append(CachedRequestData(rid, blocks, computed))
            computed += num_scheduled_tokens[rid]
            request.num_computed_tokens = computed
            if computed == len(request.token_ids) + request.num_pending and request.n == 1:
                request.num_pending += 1  # all its tokens computed: the worker samples one
        self._step_id += 1
        plan = BatchPlan(
            step_id=self._step_id,
            new_requests=new_requests,
            cached_requests=cached_requests,
            num_scheduled_tokens=num_scheduled_tokens,
            finished_request_ids=self._finished,
            block_copies=self._block_copies,
            lookahead=lookahead,
        )
        self._finished = []
        if self._block_copies:
            self._block_copies = []
        return plan
