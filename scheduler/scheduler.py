"""Iteration-level continuous batching under one token budget.

Every step spends at most ``max_num_batched_tokens`` new tokens on at most
``max_num_seqs`` sequences, in this order:

    1. running requests that decode (one token each),
    2. running requests in the middle of a chunked prefill (or a recompute),
    3. waiting requests, admitted in policy order while budget, sequences and
       KV blocks last; a prompt longer than the budget left is split across steps.

There are no prefill and decode phases: a long prompt only takes what the
decodes leave, so running streams keep their pace. When a running request needs
a KV block and none is free, the policy's victim is preempted: its blocks are
freed and it goes back to the waiting queue, to be recomputed later (reusing
what the prefix cache still holds).

The scheduler is synchronous with its workers: ``schedule()`` produces one
``BatchPlan``, the worker group runs it, ``update_from_output()`` applies the
``StepResult``. Progress (``num_computed_tokens``) advances only there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from scheduler.kv_cache_manager import KVCacheManager
from scheduler.policy import WaitingQueue, pick_victim
from scheduler.request import Request, RequestStatus
from shared.config import SchedulerConfig
from shared.messages import (
    BatchPlan,
    CachedRequestData,
    ErrorInfo,
    NewRequestData,
    RequestOutput,
    StepResult,
    TokenLogprobs,
)

log = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_rejected: int = 0
    num_scheduled_tokens: int = 0  # tokens computed (prompt and output), over all steps
    max_batch_size: int = 0
    # Request ids of each step, kept only when tracing batches (tests, debugging).
    batch_history: list[list[str]] = field(default_factory=list)


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
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._record_batches = record_batches
        self._step_id = 0
        # Requests that ended since the last plan; the worker drops their state.
        self._finished_since_plan: list[str] = []
        # Requests whose full data the worker holds (sent once in new_requests).
        self._known_to_worker: set[str] = set()
        # Admitted (or re-admitted after preemption) but not yet sent as new data.
        self._needs_full_data: set[str] = set()
        # Block ids allocated to a running request that no plan has carried yet.
        self._unsent_blocks: dict[str, list[int]] = {}

    # -- admission and abort -------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue ``request``, or raise AdmissionError if it can never run."""
        if request.request_id in self.requests:
            raise AdmissionError(ErrorInfo(400, f"request id {request.request_id!r} is already in use"))
        prompt_len = request.num_prompt_tokens
        total = prompt_len + request.sampling.max_tokens
        if prompt_len == 0:
            raise AdmissionError(ErrorInfo(400, "the prompt is empty"))
        if total > self.max_model_len:
            raise AdmissionError(ErrorInfo(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{prompt_len} prompt tokens + {request.sampling.max_tokens} max_tokens = "
                f"{total}; shorten the prompt or lower max_tokens",
            ))
        capacity = self.kv_cache.max_tokens_ever()
        if total > capacity:
            raise AdmissionError(ErrorInfo(
                400,
                f"{prompt_len} prompt tokens + {request.sampling.max_tokens} max_tokens = {total} "
                f"tokens can never fit in the KV cache ({capacity} tokens); lower max_tokens",
            ))
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
        self.waiting.push(request)

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            self.stats.num_aborted += 1
            outputs.append(self._finish(request, "abort"))
        return outputs

    def expire_waiting(self, now: float) -> list[RequestOutput]:
        """End requests that waited past their queue deadline (never started ones only)."""
        expired = [r for r in self.waiting if r.queue_deadline is not None and now >= r.queue_deadline
                   and r.status is RequestStatus.WAITING]
        outputs = []
        for request in expired:
            waited = now - request.arrival_time
            self._finish(request, "error")
            outputs.append(RequestOutput(request.request_id, [], "error", error=ErrorInfo(
                503, f"the request waited {waited:.1f} s in the queue, past its queue timeout; retry later",
                type="queue_timeout", retry_after_s=self.config.queue_full_retry_after_s)))
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (the worker group is gone)."""
        error = ErrorInfo(503, message, type="engine_error")
        outputs = []
        for request in list(self.requests.values()):
            self._finish(request, "error")
            outputs.append(RequestOutput(request.request_id, [], "error", error=error))
        self._known_to_worker.clear()
        self._finished_since_plan.clear()
        self._needs_full_data.clear()
        self._unsent_blocks.clear()
        return outputs

    # -- one step ------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def schedule(self) -> BatchPlan | None:
        """Choose this step's tokens; None when there is nothing to compute."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        scheduled_requests: list[Request] = []
        preemptions_before = self.stats.num_preemptions
        kv_cache = self.kv_cache
        unsent = self._unsent_blocks
        running = RequestStatus.RUNNING

        # Decodes first, in running order, then the prefills. This loop runs once per
        # running sequence per step: it is kept to a few attribute reads per decode.
        prefilling = []
        for request in self.running[:]:  # a copy: preemption removes from self.running
            if len(request.token_ids) - request.num_computed_tokens != 1:
                prefilling.append(request)
                continue
            if budget == 0:
                break
            if request.status is not running:
                continue  # preempted earlier in this loop
            blocks = kv_cache.allocate_slots(request, 1)
            if blocks is None:
                blocks = self._allocate_or_preempt(request, 1, scheduled)
                if blocks is None:
                    continue
            if blocks:
                unsent[request.request_id] += blocks
            scheduled[request.request_id] = 1
            scheduled_requests.append(request)
            budget -= 1
        for request in prefilling:
            if budget == 0:
                break
            if request.status is not running:
                continue
            num_new = min(len(request.token_ids) - request.num_computed_tokens, budget)
            blocks = self._allocate_or_preempt(request, num_new, scheduled)
            if blocks is None:
                continue
            unsent[request.request_id] += blocks
            scheduled[request.request_id] = num_new
            scheduled_requests.append(request)
            budget -= num_new

        # After a preemption this step, admitting would only evict again. A static
        # batch admits only into an empty engine, and admits its whole batch even
        # when the budget is spent: the rest of the prompts are prefilled next steps.
        static = self.config.batching == "static"
        preempted_now = self.stats.num_preemptions > preemptions_before
        admitting = not preempted_now and not (static and self.running)
        while admitting and len(self.running) < self.config.max_num_seqs and (budget > 0 or static):
            head = self.waiting.peek()
            if head is None:
                break
            computed_blocks, num_computed = kv_cache.get_computed_blocks(head)
            num_new = min(head.num_tokens - num_computed, budget)
            blocks = kv_cache.allocate_slots(head, num_new, computed_blocks)
            if blocks is None:
                break  # head of line waits for blocks; later arrivals do not jump it
            self.waiting.pop()
            if head.num_preemptions == 0:
                head.num_cached_tokens = num_computed
                head.first_scheduled_ns = time.time_ns()
            head.num_computed_tokens = num_computed
            head.status = RequestStatus.RUNNING
            self.running.append(head)
            unsent[head.request_id] = blocks
            self._needs_full_data.add(head.request_id)
            if num_new:
                scheduled[head.request_id] = num_new
                scheduled_requests.append(head)
                budget -= num_new

        if not scheduled:
            return None
        new_requests: list[NewRequestData] = []
        cached_requests: list[CachedRequestData] = []
        needs_full_data = self._needs_full_data
        for request in scheduled_requests:
            rid = request.request_id
            blocks = unsent[rid]
            if blocks:
                unsent[rid] = []
            else:
                blocks = []  # not the list in unsent: later blocks are appended to that one
            if rid in needs_full_data:
                needs_full_data.discard(rid)
                self._known_to_worker.add(rid)
                new_requests.append(NewRequestData(
                    request_id=rid,
                    token_ids=list(request.token_ids),
                    sampling=request.sampling,
                    block_ids=blocks,
                    num_computed_tokens=request.num_computed_tokens,
                    traceparent=request.traceparent,
                ))
            else:
                cached_requests.append(CachedRequestData(rid, blocks, request.num_computed_tokens))
        self._step_id += 1
        self.stats.num_steps += 1
        self.stats.num_scheduled_tokens += self.config.max_num_batched_tokens - budget
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(scheduled))
        if self._record_batches:
            self.stats.batch_history.append(list(scheduled))
        plan = BatchPlan(
            step_id=self._step_id,
            new_requests=new_requests,
            cached_requests=cached_requests,
            num_scheduled_tokens=scheduled,
            finished_request_ids=self._finished_since_plan,
        )
        self._finished_since_plan = []
        return plan

    def _allocate_or_preempt(
        self, request: Request, num_new: int, scheduled: dict[str, int]
    ) -> list[int] | None:
        """Allocate ``num_new`` slots for a running request, preempting others
        (never one already scheduled this step) until it fits. Returns None if
        ``request`` itself was the one preempted."""
        while True:
            blocks = self.kv_cache.allocate_slots(request, num_new)
            if blocks is not None:
                return blocks
            candidates = [r for r in self.running if r.request_id not in scheduled]
            victim = pick_victim(self.config.policy, candidates)
            self._preempt(victim)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        self.running.remove(request)
        del self._unsent_blocks[request.request_id]
        self._needs_full_data.discard(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.preempted_ns.append(time.time_ns())
        self.stats.num_preemptions += 1
        # The worker keeps its sampling state (a seeded generator continues) but
        # must be sent the request's tokens and new blocks again on resumption.
        self.waiting.push(request)
        log.debug("preempted %s after %d tokens", request.request_id, request.num_tokens)

    def update_from_output(self, plan: BatchPlan, result: StepResult) -> list[RequestOutput]:
        """Advance the scheduled requests by the worker's result; return what the clients see."""
        requests = self.requests
        running = RequestStatus.RUNNING
        for request_id, num_new in plan.num_scheduled_tokens.items():
            request = requests.get(request_id)
            if request is not None and request.status is running:  # else it ended (abort) meanwhile
                request.num_computed_tokens += num_new
        outputs = []
        logprobs: list[list[TokenLogprobs] | None] = result.logprobs or [None] * len(result.request_ids)
        for request_id, token_ids, token_logprobs in zip(
            result.request_ids, result.sampled_token_ids, logprobs, strict=True
        ):
            request = requests.get(request_id)
            if request is None or request.status is not running or not token_ids:
                continue
            cached = 0
            if request.first_token_ns is None:
                request.first_token_ns = time.time_ns()
                cached = request.num_cached_tokens
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

    def _finish(self, request: Request, reason: str) -> RequestOutput:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            del self._unsent_blocks[request.request_id]
            self._needs_full_data.discard(request.request_id)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]
        self.stats.num_finished += 1
        if request.request_id in self._known_to_worker:
            self._known_to_worker.discard(request.request_id)
            self._finished_since_plan.append(request.request_id)
        return RequestOutput(request.request_id, [], reason)

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
            and self.kv_cache.num_used_blocks == 0
        )
