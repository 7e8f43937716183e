"""Scheduler and model runner in one process, joined by a function call instead of
ZeroMQ: for tests that watch the batches and for engine-only benchmarks (what
the service costs without its gateway and sockets)."""

from __future__ import annotations

import time
from pathlib import Path

from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.request import Request
from loomserve.scheduler.scheduler import Scheduler
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.shared.messages import RequestOutput, SamplingParams
from loomserve.worker.device import DeviceInfo
from loomserve.worker.model_runner import LaunchedStep, ModelRunner
from loomserve.worker.parallel import SINGLE, TensorParallel


class LocalEngine:
    def __init__(self, scheduler_config: SchedulerConfig, worker_config: WorkerConfig,
                 model_path: Path | str, record_batches: bool = False, tp: TensorParallel = SINGLE) -> None:
        """``tp``: this process's rank of a tensor-parallel group; every rank runs its own
        engine on the same requests, and the identical schedulers keep the ranks in step."""
        self.runner = ModelRunner(worker_config, model_path, DeviceInfo.resolve(worker_config),
                                  scheduler_config.step_limits(), tp=tp)
        self.reset(scheduler_config, record_batches)

    @classmethod
    def over(cls, runner: ModelRunner, scheduler_config: SchedulerConfig, record_batches: bool = False) -> LocalEngine:
        """An engine over an existing runner (whose request state is dropped)."""
        engine = cls.__new__(cls)
        engine.runner = runner
        engine.reset(scheduler_config, record_batches)
        return engine

    def reset(self, scheduler_config: SchedulerConfig, record_batches: bool = False) -> None:
        """A fresh scheduler (empty queue, every KV block free) and no request state in the runner."""
        runner = self.runner
        runner.reset()
        # Every rank's scheduler must see the same cache, as the service's one scheduler does.
        num_blocks = runner.tp.all_min(runner.num_blocks, runner.device)
        kv_cache = KVCacheManager(num_blocks, runner.block_size, scheduler_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, kv_cache, runner.max_model_len, record_batches)
        self._held: LaunchedStep | None = None  # launched and sampled, tokens not read yet

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    priority: int = 0, tenant: str = "") -> None:
        self.scheduler.add_request(Request(request_id, list(prompt_token_ids), sampling,
                                           arrival_time=time.monotonic(), priority=priority,
                                           cache_salt=tenant))

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        return self.scheduler.abort_requests(request_ids)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._held is not None

    def step(self) -> list[RequestOutput]:
        """One step's outputs. With asynchronous scheduling the step after is planned and its
        forward pass queued before this one's tokens are read, as the service's worker does."""
        runner = self.runner
        held, self._held = self._held, None
        if held is None:
            plan = self.scheduler.schedule()
            if plan is None:
                return []
            held = runner.launch(plan)
            runner.sample(held)
        after = None
        if self.scheduler.config.async_scheduling:
            plan = self.scheduler.schedule()
            if plan is not None:
                after = runner.launch(plan)
        outputs = self.scheduler.update_from_output(runner.finalize(held))
        if after is not None:
            runner.sample(after)
            self._held = after
        return outputs

    def run_until_idle(self) -> dict[str, tuple[list[int], str]]:
        """Step until no request is left; each request's output tokens and finish reason."""
        tokens: dict[str, list[int]] = {}
        reasons: dict[str, str] = {}
        while self.has_work():
            for out in self.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    reasons[out.request_id] = out.finish_reason
        return {rid: (tokens.get(rid, []), reason) for rid, reason in reasons.items()}
