"""Scheduler and model runner in one process, joined by a function call instead of
ZeroMQ: for tests that watch the batches and for engine-only benchmarks (what
the service costs without its gateway and sockets)."""

from __future__ import annotations

import time
from pathlib import Path

from scheduler.kv_cache_manager import KVCacheManager
from scheduler.request import Request
from scheduler.scheduler import Scheduler
from shared.config import SchedulerConfig, WorkerConfig
from shared.messages import RequestOutput, SamplingParams
from worker.device import DeviceInfo
from worker.model_runner import ModelRunner
from worker.parallel import SINGLE, TensorParallel


class LocalEngine:
    def __init__(self, scheduler_config: SchedulerConfig, worker_config: WorkerConfig,
                 model_path: Path | str, record_batches: bool = False, tp: TensorParallel = SINGLE) -> None:
        """``tp``: this process's rank of a tensor-parallel group; every rank runs its own
        engine on the same requests, and the identical schedulers keep the ranks in step."""
        self.runner = ModelRunner(worker_config, model_path, DeviceInfo.resolve(worker_config), tp=tp)
        # Every rank's scheduler must see the same cache, as the service's one scheduler does.
        num_blocks = tp.all_min(self.runner.num_blocks, self.runner.device)
        kv_cache = KVCacheManager(num_blocks, self.runner.block_size, scheduler_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, kv_cache, self.runner.max_model_len, record_batches)

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    priority: int = 0, tenant: str = "") -> None:
        self.scheduler.add_request(Request(request_id, list(prompt_token_ids), sampling,
                                           arrival_time=time.monotonic(), priority=priority,
                                           cache_salt=tenant))

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        return self.scheduler.abort_requests(request_ids)

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        return self.scheduler.update_from_output(plan, self.runner.execute(plan))

    def run_until_idle(self) -> dict[str, tuple[list[int], str]]:
        """Step until no request is left; each request's output tokens and finish reason."""
        tokens: dict[str, list[int]] = {}
        reasons: dict[str, str] = {}
        while self.scheduler.has_work():
            for out in self.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    reasons[out.request_id] = out.finish_reason
        return {rid: (tokens.get(rid, []), reason) for rid, reason in reasons.items()}
