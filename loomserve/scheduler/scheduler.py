"""Iteration-level continuous batching under one token budget.

Every step spends at most ``max_num_batched_tokens`` new tokens on at most
``max_num_seqs`` sequences, in three phases:

    1. running requests: the parents of parallel sampling that are ready fork into
       their choices (parallel_sampling.py), then decodes take one token each and
       requests in the middle of a chunked prefill (or a recompute) what is left;
    2. waiting requests, if the batching policy lets them join (batching.py):
       admitted in policy order while budget, seats and KV blocks last; a prompt
       longer than the budget left is split across steps;
    3. the plan (plan_builder.py): each request whole once, then only what changed.
       Making it commits the step, so that the next plan can be made before this
       one's result is back (async_scheduling.py).

There are no prefill and decode phases: a long prompt only takes what the
decodes leave, so running streams keep their pace. When a running request needs
a KV block and none is free, the policy's victim is preempted: its blocks are
freed and it goes back to the waiting queue, to be recomputed later (reusing
what the prefix cache still holds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from loomserve.scheduler.async_scheduling import InFlightTokens
from loomserve.scheduler.batching import batching_policy
from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.parallel_sampling import ParallelSampling
from loomserve.scheduler.plan_builder import PlanBuilder
from loomserve.scheduler.policy import WaitingQueue, pick_victim
from loomserve.scheduler.request import Request, RequestStatus
from loomserve.shared.config import SchedulerConfig
from loomserve.shared.messages import (
    CHOICE_SEPARATOR,
    BatchPlan,
    ErrorInfo,
    RequestOutput,
    StepResult,
    TokenLogprobs,
    choice_request_ids,
)

log = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_scheduled_tokens: int = 0  # tokens computed (prompt and output), over all steps
    num_forks: int = 0  # requests of n > 1 split into their choices
    num_block_copies: int = 0  # partial blocks copied on write by those forks
    max_batch_size: int = 0
    # Request ids of each step, kept only when tracing batches (tests, debugging).
    batch_history: list[list[str]] = field(default_factory=list)


@dataclass(slots=True)
class _Step:
    """What the step being scheduled has taken so far."""

    budget: int  # tokens left
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # by request id
    requests: list[Request] = field(default_factory=list)  # the same requests, in order
    preempted: bool = False  # a running request lost its blocks to make room

    def add(self, request: Request, num_new: int) -> None:
        self.num_scheduled_tokens[request.request_id] = num_new
        self.requests.append(request)
        self.budget -= num_new


class AdmissionError(Exception):
    """A request that can never run; ``error`` says why, with the HTTP status."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        max_model_len: int,
        record_batches: bool = False,
    ) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.waiting = WaitingQueue(config.policy)
        self.batching = batching_policy(config.batching)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._record_batches = record_batches
        self.plans = PlanBuilder()
        self.parallel = ParallelSampling(kv_cache)
        self.in_flight = InFlightTokens(lookahead=config.async_scheduling)

    # -- admission and abort -------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue ``request``, or raise AdmissionError if it can never run."""
        if request.request_id in self.requests or self.in_flight.holds_any(request.request_id, request.n):
            raise AdmissionError(ErrorInfo(400, f"request id {request.request_id!r} is already in use"))
        if CHOICE_SEPARATOR in request.request_id:
            raise AdmissionError(ErrorInfo(
                400, f"request id {request.request_id!r} contains {CHOICE_SEPARATOR!r}, which separates the "
                     f"choices of a request with n > 1; choose another id"))
        prompt_len = request.num_prompt_tokens
        total = prompt_len + request.sampling.max_tokens
        if prompt_len == 0:
            raise AdmissionError(ErrorInfo(400, "the prompt is empty"))
        if not 1 <= request.n <= self.config.max_num_seqs:
            raise AdmissionError(ErrorInfo(
                400, f"n = {request.n} choices can never run: n must be between 1 and the "
                     f"{self.config.max_num_seqs} sequences a step may hold (--max-num-seqs)"))
        if total > self.max_model_len:
            raise AdmissionError(ErrorInfo(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{prompt_len} prompt tokens + {request.sampling.max_tokens} max_tokens = "
                f"{total}; shorten the prompt or lower max_tokens",
            ))
        capacity = self.kv_cache.max_tokens_ever()
        if request.n == 1 and total > capacity:
            raise AdmissionError(ErrorInfo(
                400,
                f"{prompt_len} prompt tokens + {request.sampling.max_tokens} max_tokens = {total} "
                f"tokens can never fit in the KV cache ({capacity} tokens); lower max_tokens",
            ))
        if (error := self.parallel.fit_error(request)) is not None:
            raise AdmissionError(error)
        queued, queued_tokens = len(self.waiting), self.waiting.num_tokens
        if queued >= self.config.max_waiting_requests or queued_tokens + prompt_len > self.config.max_waiting_tokens:
            raise AdmissionError(ErrorInfo(
                503,
                f"the queue is full ({queued} requests, {queued_tokens} prompt tokens waiting; limits "
                f"{self.config.max_waiting_requests} and {self.config.max_waiting_tokens}); retry later",
                type="queue_full",
                retry_after_s=self.config.queue_full_retry_after_s,
            ))
        request.max_num_tokens = min(total, self.max_model_len)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.parallel.add(request)
        self.waiting.push(request)

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        """End the given requests; the id of a forked request ends each of its choices."""
        outputs = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            ending = [request] if request is not None else self.parallel.choices(request_id)
            for request in ending:
                self._finish(request, "abort")
                outputs += [RequestOutput(i, [], "abort") for i in choice_request_ids(request.request_id, request.n)]
        return outputs

    def expire_waiting(self, now: float) -> list[RequestOutput]:
        """End requests that waited past their queue deadline (never started ones only)."""
        expired = [r for r in self.waiting if r.queue_deadline is not None and now >= r.queue_deadline
                   and r.status is RequestStatus.WAITING]
        outputs = []
        for request in expired:
            waited = now - request.arrival_time
            self._finish(request, "error")
            error = ErrorInfo(
                503, f"the request waited {waited:.1f} s in the queue, past its queue timeout; retry later",
                type="queue_timeout", retry_after_s=self.config.queue_full_retry_after_s)
            outputs += [RequestOutput(i, [], "error", error=error)
                        for i in choice_request_ids(request.request_id, request.n)]
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (the worker group is gone)."""
        error = ErrorInfo(503, message, type="engine_error")
        outputs = []
        for request in list(self.requests.values()):
            self._finish(request, "error")
            outputs += [RequestOutput(i, [], "error", error=error)
                        for i in choice_request_ids(request.request_id, request.n)]
        self.plans.clear()
        self.in_flight.clear()
        return outputs

    # -- one step ------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def schedule(self) -> BatchPlan | None:
        """Choose this step's tokens and commit them; None when there is nothing to compute."""
        step = _Step(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        # After a preemption this step, admitting would only evict again.
        if not step.preempted and self.batching.may_admit(len(self.running)):
            self._admit_waiting(step)
        return self._build_plan(step)

    # -- 1. running requests ---------------------------------------------------

    def _schedule_running(self, step: _Step) -> None:
        """Fork the parents that are ready, then schedule the decodes, then the prefills
        (chunked, or recomputing after a preemption)."""
        for parent in self.parallel.ready_to_fork():
            if parent.status is RequestStatus.RUNNING:  # not preempted by the fork of another
                self._fork(parent, step)
        for request in self._schedule_decodes(step):
            if step.budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted to make room for another
            num_left = len(request.token_ids) + request.num_pending - request.num_computed_tokens
            if request.n > 1:
                num_left -= 1  # a parent stops one token short: each choice computes the last one
            num_new = min(num_left, step.budget)
            blocks = self._allocate_or_preempt(request, num_new, step)
            if blocks is not None:
                self.plans.unsent_blocks[request.request_id] += blocks
                step.add(request, num_new)

    def _schedule_decodes(self, step: _Step) -> list[Request]:
        """Give each running decode its token, in running order, while the budget lasts;
        return the running requests that prefill instead.

        This loop runs once per running sequence per step: it is kept to a few attribute
        reads per decode. ``num_pending`` counts tokens still in flight (async_scheduling.py).
        """
        budget = step.budget
        scheduled = step.num_scheduled_tokens
        scheduled_requests = step.requests
        kv_cache = self.kv_cache
        unsent = self.plans.unsent_blocks
        running = RequestStatus.RUNNING
        prefilling = []
        for request in self.running[:]:  # a copy: preemption removes from self.running
            pending = request.num_pending
            if len(request.token_ids) + pending - request.num_computed_tokens != 1:
                prefilling.append(request)
                continue
            if budget == 0:
                break
            if request.status is not running:
                continue  # preempted earlier in this loop
            if pending and len(request.token_ids) + pending >= request.max_num_tokens:
                continue  # its last token is in flight
            blocks = kv_cache.allocate_slots(request, 1)
            if blocks is None:
                blocks = self._allocate_or_preempt(request, 1, step)
                if blocks is None:
                    continue
            if blocks:
                unsent[request.request_id] += blocks
            scheduled[request.request_id] = 1
            scheduled_requests.append(request)
            budget -= 1
        step.budget = budget
        return prefilling

    def _fork(self, parent: Request, step: _Step) -> list[Request]:
        """Split ``parent`` into its running choices (parallel_sampling.py), preempting others
        until the blocks its partial block is copied to are free; [] if ``parent`` itself is
        the policy's victim. The parent ends here, without an output of its own."""
        num_copies = self.parallel.num_copies(parent)
        while self.kv_cache.num_free_blocks < num_copies:
            victim = self._pick_victim(step)
            self._preempt(victim, step)
            if victim is parent:
                return []
        children, copies = self.parallel.fork(parent)
        self.plans.copy_blocks(copies)
        self.stats.num_forks += 1
        self.stats.num_block_copies += len(copies)
        self.running.remove(parent)
        del self.requests[parent.request_id]
        self.plans.stop_sending(parent.request_id)
        self.plans.finish(parent.request_id)
        parent.status = RequestStatus.FINISHED
        for child in children:
            self.requests[child.request_id] = child
            self.running.append(child)
            self.plans.send_whole(child.request_id, self.kv_cache.get_block_ids(child.request_id))
        return children

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> list[int] | None:
        """Allocate ``num_new`` slots for a running request, preempting others (never one
        already scheduled this step) until it fits. None if ``request`` itself was preempted."""
        while True:
            blocks = self.kv_cache.allocate_slots(request, num_new)
            if blocks is not None:
                return blocks
            victim = self._pick_victim(step)
            self._preempt(victim, step)
            if victim is request:
                return None

    def _pick_victim(self, step: _Step) -> Request:
        """The running request that the policy would serve last, of those not scheduled this step."""
        scheduled = step.num_scheduled_tokens
        return pick_victim(self.config.policy, [r for r in self.running if r.request_id not in scheduled])

    def _preempt(self, request: Request, step: _Step) -> None:
        self.kv_cache.free(request)
        self.running.remove(request)
        self.parallel.free_seats(request)
        self.plans.stop_sending(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.preempted_ns.append(time.time_ns())
        step.preempted = True
        self.stats.num_preemptions += 1
        # The worker keeps its sampling state (a seeded generator continues) but
        # must be sent the request's tokens and new blocks again on resumption.
        self.waiting.push(request)
        log.debug("preempted %s after %d tokens", request.request_id, request.num_tokens)

    # -- 2. waiting requests ---------------------------------------------------

    def _admit_waiting(self, step: _Step) -> None:
        """Admit waiting requests in policy order while budget (unless the batching policy
        admits past it), seats and KV blocks last. The head of the line waits for blocks:
        later arrivals do not jump it."""
        kv_cache = self.kv_cache
        max_num_seqs = self.config.max_num_seqs
        past_budget = self.batching.admits_past_budget
        while step.budget > 0 or past_budget:
            head = self.waiting.peek()
            if head is None or len(self.running) + self.parallel.num_reserved_seqs + head.n > max_num_seqs:
                return
            if head.num_pending:
                return  # preempted with tokens in flight: it resumes once they are back
            computed_blocks, num_computed = kv_cache.get_computed_blocks(head)
            num_left = head.num_tokens - num_computed - (1 if head.n > 1 else 0)  # a parent stops one short
            num_new = min(num_left, step.budget)
            blocks = kv_cache.allocate_slots(head, num_new, computed_blocks)
            if blocks is None:
                return
            self._start_running(head, num_computed, blocks)
            if head.n > 1 and num_left == 0:  # a one-token prompt, or all of it cached: fork now
                self._schedule_new_choices(self._fork(head, step), step)
            elif num_new:
                step.add(head, num_new)

    def _start_running(self, request: Request, num_computed: int, block_ids: list[int]) -> None:
        """Move the head of the waiting queue to the running requests, with its first blocks."""
        self.waiting.pop()
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_computed
            request.first_scheduled_ns = time.time_ns()
        request.num_computed_tokens = num_computed
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.plans.send_whole(request.request_id, block_ids)
        self.parallel.hold_seats(request)

    def _schedule_new_choices(self, children: list[Request], step: _Step) -> None:
        """Schedule the last prompt token of choices forked at admission, while budget and
        blocks last (no preemption: the rest go with the next step's decodes)."""
        for child in children:
            if step.budget == 0:
                return
            blocks = self.kv_cache.allocate_slots(child, 1)
            if blocks is None:
                return
            self.plans.unsent_blocks[child.request_id] += blocks
            step.add(child, 1)

    # -- 3. the plan -----------------------------------------------------------

    def _build_plan(self, step: _Step) -> BatchPlan | None:
        if not step.requests:
            return None
        stats = self.stats
        stats.num_steps += 1
        stats.num_scheduled_tokens += self.config.max_num_batched_tokens - step.budget
        stats.max_batch_size = max(stats.max_batch_size, len(step.requests))
        if self._record_batches:
            stats.batch_history.append(list(step.num_scheduled_tokens))
        return self.plans.build(step.requests, step.num_scheduled_tokens, self.in_flight.lookahead)

    # -- results ---------------------------------------------------------------

    def update_from_output(self, result: StepResult) -> list[RequestOutput]:
        """Append the tokens of a plan's result (plans are answered in order); return what
        the clients see. A request preempted since the plan still takes its token."""
        requests = self.requests
        outputs = []
        logprobs: list[list[TokenLogprobs] | None] = result.logprobs or [None] * len(result.request_ids)
        for request_id, token_ids, token_logprobs in zip(
            result.request_ids, result.sampled_token_ids, logprobs, strict=True
        ):
            request = requests.get(request_id)
            if request is None:  # it ended (stop, abort) while this token was in flight
                self.in_flight.drop_result(request_id)
                continue
            request.num_pending -= 1
            if not token_ids:
                continue
            cached = 0
            if request.first_token_ns is None:
                request.first_token_ns = time.time_ns()
                cached = request.num_cached_tokens
                if request.parent is not None and request.parent.first_token_ns is None:
                    request.parent.first_token_ns = request.first_token_ns  # the group's first token (traces)
            if len(token_ids) == 1:  # the common case, spelled out: one call less per token
                token_id = token_ids[0]
                request.token_ids.append(token_id)
                reason = self._stop_reason(request, token_id) if (
                    len(request.token_ids) >= request.max_num_tokens or token_id in request.sampling.stop_token_ids
                ) else None
                emitted = token_ids
            else:
                emitted = []
                reason = None
                for token_id in token_ids:
                    request.token_ids.append(token_id)
                    emitted.append(token_id)
                    reason = self._stop_reason(request, token_id)
                    if reason is not None:
                        break
                if token_logprobs is not None:
                    token_logprobs = token_logprobs[: len(emitted)]
            if reason is not None:
                self._finish(request, reason)
            outputs.append(RequestOutput(request_id, emitted, reason, token_logprobs, cached))
        return outputs

    def _stop_reason(self, request: Request, token_id: int) -> str | None:
        """Why ``request`` ends after appending ``token_id``, or None if it goes on."""
        params = request.sampling
        if token_id in params.stop_token_ids and request.num_output_tokens >= params.min_tokens:
            return "stop"
        if len(request.token_ids) >= request.max_num_tokens:
            return "length"
        return None

    def _finish(self, request: Request, reason: str) -> None:
        request_id = request.request_id
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self.plans.stop_sending(request_id)
            self.parallel.free_seats(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        self.parallel.forget(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request_id]
        self.in_flight.ended(request)
        self.plans.finish(request_id)

    # -- introspection -------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def is_idle_and_empty(self) -> bool:
        """No request anywhere and every KV block free (tests assert this after each run)."""
        return (
            not self.requests
            and not self.running
            and len(self.waiting) == 0
            and self.parallel.is_empty()
            and self.in_flight.is_empty()
            and self.kv_cache.num_used_blocks == 0
        )
