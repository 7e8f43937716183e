"""loomserve's engine in this process (``LocalEngine``: scheduler and model runner, no sockets,
no gateway), driven as the GPU benchmarks drive it.

| what                 | how                                                                        |
|----------------------|----------------------------------------------------------------------------|
| ``run_workload``     | every request queued at once, stepped until all are done; TTFT and E2E of  |
|                      | each from the start, steps that replayed a CUDA graph and their wall time  |
| ``batch1_decode``    | one request (``BATCH1_PROMPT`` prompt tokens, ``BATCH1_TOKENS`` generated) |
|                      | alone: its median step against the bandwidth roofline                      |
| ``ExecuteTimes``     | the runner's part of each step (launch to tokens, host work, device wait)  |
| ``warmup_requests``  | prompts across the prefill kernel's tile sizes, to build kernel variants   |
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.harness.stats import percentile
from bench.workloads import TokenRequest
from loomserve.local_engine import LocalEngine
from loomserve.shared.config import SchedulerConfig
from loomserve.shared.messages import SamplingParams, StepResult
from loomserve.worker.kv_cache import kv_cache_bytes_per_block
from loomserve.worker.model_runner import LaunchedStep, ModelRunner

BENCH_SHAPES = ("llama-3.2-1b", "llama-3.1-8b")
SMOKE_SHAPE = "llama-tiny"  # the CPU smoke runs': proves the code paths, measures nothing
MAX_MODEL_LEN = 8192
BATCH1_PROMPT = 512
BATCH1_TOKENS = 256
# Prompt lengths of the warm-up (query lengths across the prefill kernel's tile sizes),
# run a few at a time so that prompts also join running decodes (mixed steps).
WARMUP_PROMPTS = (3, 17, 40, 100, 300, 1500, 5, 33, 70, 700, 2500, 9)
WARMUP_MAX_SEQS = 4


def forced(num_tokens: int) -> SamplingParams:
    """Greedy, no stop tokens: exactly ``num_tokens`` outputs."""
    return SamplingParams(max_tokens=num_tokens, temperature=0.0)


def random_prompt(rng: np.random.Generator, length: int) -> list[int]:
    return rng.integers(0, 32000, length).tolist()


def warmup_requests(max_model_len: int = MAX_MODEL_LEN) -> list[TokenRequest]:
    """The warm-up's requests that fit ``max_model_len`` with room for their outputs."""
    rng = np.random.default_rng(0)
    return [(random_prompt(rng, n), 8 + 4 * i) for i, n in enumerate(WARMUP_PROMPTS) if n + 64 <= max_model_len]


class ExecuteTimes:
    """Wraps ``runner.finalize`` to collect each step's ``forward_ms``: the runner's share
    of a step from its launch to its tokens read (inputs, forward, sampling; with
    asynchronous scheduling, overlapping the step before), the scheduler's excluded; and
    its parts ``host_ms`` (the runner's own host work on the step) and ``wait_ms`` (waiting
    for the device to hand the tokens over)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.finalize = runner.finalize
        self.forward_ms: list[float] = []
        self.host_ms: list[float] = []
        self.wait_ms: list[float] = []

    def summary(self) -> dict[str, float | int]:
        """Steps timed and their mean launch-to-tokens, host and wait times (ms)."""
        steps = len(self.forward_ms)
        return {"steps": steps, **{f"mean_{name}": statistics.fmean(values) if values else 0.0
                                   for name, values in (("forward_ms", self.forward_ms), ("host_ms", self.host_ms),
                                                        ("wait_ms", self.wait_ms))}}

    def __enter__(self) -> ExecuteTimes:
        def timed(step: LaunchedStep) -> StepResult:
            result = self.finalize(step)
            self.forward_ms.append(result.forward_ms)
            self.host_ms.append(result.host_ms)
            self.wait_ms.append(result.wait_ms)
            return result

        self.runner.finalize = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.finalize = self.finalize  # type: ignore[method-assign]


def weight_bytes_per_step(runner: ModelRunner) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an untied
    embedding table, of which a step reads one row per token."""
    params = {p.data_ptr(): p for p in runner.model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not runner.model_config.tie_word_embeddings:
        total -= runner.model.embed_tokens.weight.numel() * runner.model.embed_tokens.weight.element_size()
    return total


def batch1_decode(
    engine: LocalEngine, graphs: bool, copy_bw: float, profile_out: Path | None = None, async_scheduling: bool = True
) -> dict[str, float]:
    """One request decoding alone: the median wall time of a step (scheduler, forward, sampling,
    the host reading the token) as tokens/s, against the bandwidth roofline: the bytes a step
    must read (``weight_bytes_per_step`` plus the KV cache of the mean context) over
    ``copy_bw``. With ``profile_out``, a cProfile report of its steps is written there (and the
    times are not representative)."""
    runner = engine.runner
    runner.use_cuda_graphs = graphs
    engine.reset(SchedulerConfig(async_scheduling=async_scheduling))
    engine.add_request("b1", random_prompt(np.random.default_rng(1), BATCH1_PROMPT), forced(BATCH1_TOKENS))
    engine.step()  # the prefill, which samples the first token
    step_times = []
    profiler = cProfile.Profile() if profile_out is not None else None
    with ExecuteTimes(runner) as execute_times:
        while engine.has_work():
            begin = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            engine.step()
            if profiler is not None:
                profiler.disable()
            step_times.append(time.perf_counter() - begin)
    if profiler is not None and profile_out is not None:
        with profile_out.open("w") as f:
            stats = pstats.Stats(profiler, stream=f)
            f.write(f"{len(step_times)} decode steps, batch 1, CUDA graphs {'on' if graphs else 'off'}\n")
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(40)
    median = statistics.median(step_times)
    mean_context = BATCH1_PROMPT + (len(step_times) + 1) / 2
    kv_per_token = kv_cache_bytes_per_block(runner.model_config, 1, runner.kv_dtype)
    step_bytes = weight_bytes_per_step(runner) + mean_context * kv_per_token
    roofline = copy_bw / step_bytes
    return {
        "tokens_per_s": 1.0 / median,
        "median_step_ms": median * 1000.0,
        "median_runner_ms": statistics.median(execute_times.forward_ms),
        "p90_step_ms": percentile(step_times, 90) * 1000.0,
        "bytes_per_step": step_bytes,
        "roofline_tokens_per_s": roofline,
        "fraction_of_roofline": (1.0 / median) / roofline,
    }


@dataclass
class RunStats:
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    ttft_s: list[float]
    e2e_s: list[float]
    steps: int
    graph_steps: int
    graph_steps_s: float  # wall time of the steps that replayed a graph
    preemptions: int


def graph_replays(runner: ModelRunner) -> int:
    """CUDA graph replays so far, of decode and of mixed steps."""
    return sum(g.num_replays for g in (runner.graphs, runner.mixed_graphs) if g is not None)


def run_workload(engine: LocalEngine, requests: list[TokenRequest], config: SchedulerConfig, graphs: bool) -> RunStats:
    """Queue every request at once and step until all are done."""
    runner = engine.runner
    runner.use_cuda_graphs = graphs
    engine.reset(config)
    replays_before = graph_replays(runner)
    begin = time.perf_counter()
    for i, (prompt, output_len) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, forced(output_len))
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    output_tokens = 0
    graph_time = 0.0
    step_start = time.perf_counter()
    while engine.has_work():
        replays = graph_replays(runner)
        outputs = engine.step()
        step_end = time.perf_counter()
        if graph_replays(runner) > replays:
            graph_time += step_end - step_start
        step_start = step_end
        now = step_end - begin
        for out in outputs:
            output_tokens += len(out.new_token_ids)
            if out.new_token_ids:
                first.setdefault(out.request_id, now)
            if out.finish_reason is not None:
                done[out.request_id] = now
    duration = time.perf_counter() - begin
    replays = graph_replays(runner) - replays_before
    stats = engine.scheduler.stats
    return RunStats(
        duration_s=duration,
        output_tokens=output_tokens,
        prompt_tokens=sum(len(p) for p, _ in requests),
        ttft_s=sorted(first.values()),
        e2e_s=sorted(done.values()),
        steps=stats.num_steps,
        graph_steps=replays,
        graph_steps_s=graph_time,
        preemptions=stats.num_preemptions,
    )


def summarise(run: RunStats) -> dict[str, float]:
    """A run's throughputs, TTFT and E2E percentiles (seconds) and where its steps went."""
    return {
        "duration_s": run.duration_s,
        "output_tokens": run.output_tokens,
        "output_tokens_per_s": run.output_tokens / run.duration_s,
        "total_tokens_per_s": (run.output_tokens + run.prompt_tokens) / run.duration_s,
        "requests_per_s": len(run.e2e_s) / run.duration_s,
        "ttft_p50_s": percentile(run.ttft_s, 50),
        "ttft_p95_s": percentile(run.ttft_s, 95),
        "e2e_p50_s": percentile(run.e2e_s, 50),
        "e2e_p95_s": percentile(run.e2e_s, 95),
        "steps": run.steps,
        "graph_steps": run.graph_steps,
        "graph_steps_s": run.graph_steps_s,
        # Prefill and mixed steps (and decode batches above the largest graph).
        "eager_steps": run.steps - run.graph_steps,
        "eager_steps_s": run.duration_s - run.graph_steps_s,
        "preemptions": run.preemptions,
    }
