"""The in-process engine driver, over a real engine on the CPU (dummy weights, tiny shape)."""

from __future__ import annotations

import pytest

from bench.harness import engine as harness
from loomserve.local_engine import LocalEngine
from loomserve.shared.config import SchedulerConfig, WorkerConfig


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine(SchedulerConfig(), WorkerConfig(model="llama-tiny", load_format="dummy", device="cpu",
                                                       kv_cache_gb=0.02, max_model_len=1024), "llama-tiny")


def test_warmup_requests_fit_the_model() -> None:
    assert [len(p) for p, _ in harness.warmup_requests()] == list(harness.WARMUP_PROMPTS)
    short = harness.warmup_requests(400)
    assert [len(p) for p, _ in short] == [n for n in harness.WARMUP_PROMPTS if n + 64 <= 400]
    assert short[0] == harness.warmup_requests()[0]  # the same prompts, whatever is left out


def test_run_to_the_end_and_summarise(engine: LocalEngine) -> None:
    requests = [([1, 2, 3, 4, 5], 4), ([7] * 40, 6), ([9] * 3, 1)]
    stats = harness.run_workload(engine, requests, SchedulerConfig(max_num_seqs=2), False)
    assert (stats.output_tokens, stats.prompt_tokens) == (11, 48)
    assert len(stats.ttft_s) == len(stats.e2e_s) == 3 and stats.graph_steps == 0
    summary = harness.summarise(stats)
    assert summary["output_tokens_per_s"] == pytest.approx(11 / stats.duration_s)
    assert summary["ttft_p50_s"] <= summary["e2e_p95_s"] and summary["eager_steps"] == stats.steps


def test_execute_times_split_each_step(engine: LocalEngine) -> None:
    requests = [([1, 2, 3, 4, 5], 4), ([7] * 40, 6)]
    with harness.ExecuteTimes(engine.runner) as times:
        harness.run_workload(engine, requests, SchedulerConfig(max_num_seqs=4), False)
    summary = times.summary()
    # Every step that sampled was finalized once; on the CPU the forward pass is host work.
    assert summary["steps"] == len(times.forward_ms) >= 6
    assert summary["mean_wait_ms"] == 0.0
    assert 0.0 < summary["mean_host_ms"] <= summary["mean_forward_ms"]
    assert engine.runner.finalize == times.finalize  # unwrapped again


def test_batch1_decode_against_its_roofline(engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shorter than the real request: the full one takes half a minute on two busy cores.
    monkeypatch.setattr(harness, "BATCH1_PROMPT", 64)
    monkeypatch.setattr(harness, "BATCH1_TOKENS", 24)
    copy_bw = 1e10
    result = harness.batch1_decode(engine, False, copy_bw)
    assert result["tokens_per_s"] == pytest.approx(1000.0 / result["median_step_ms"])
    assert result["median_step_ms"] <= result["p90_step_ms"]
    assert result["bytes_per_step"] > harness.weight_bytes_per_step(engine.runner)  # weights plus KV cache
    assert result["fraction_of_roofline"] == pytest.approx(result["tokens_per_s"] * result["bytes_per_step"] / copy_bw)
