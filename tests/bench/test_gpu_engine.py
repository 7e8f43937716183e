"""bench.gpu_engine's step timing, over a real engine on the CPU (dummy weights, tiny shape)."""

from __future__ import annotations

from bench import gpu_engine
from loomserve.local_engine import LocalEngine
from loomserve.shared.config import SchedulerConfig, WorkerConfig


def test_execute_times_split_each_step() -> None:
    engine = LocalEngine(SchedulerConfig(), WorkerConfig(model="llama-tiny", load_format="dummy", device="cpu",
                                                         kv_cache_gb=0.01, max_model_len=256), "llama-tiny")
    requests = [([1, 2, 3, 4, 5], 4), ([7] * 40, 6)]
    with gpu_engine.ExecuteTimes(engine.runner) as times:
        gpu_engine.run_workload(engine, requests, SchedulerConfig(max_num_seqs=4), False)
    summary = times.summary()
    # Every step that sampled was finalized once; on the CPU the forward pass is host work.
    assert summary["steps"] == len(times.forward_ms) >= 6
    assert summary["mean_wait_ms"] == 0.0
    assert 0.0 < summary["mean_host_ms"] <= summary["mean_forward_ms"]
    assert engine.runner.finalize == times.finalize  # unwrapped again
