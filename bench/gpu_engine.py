"""Engine benchmark on one GPU: scheduler + model runner in one process (``LocalEngine``, no
sockets, no gateway), dummy weights at real model shapes.

    python -m bench.gpu_engine --out results/gpu_engine.json

For each shape (default: llama-3.2-1b, then llama-3.1-8b; bf16, Triton kernels):

1. **Batch-1 decode**: one request with a 512-token prompt generating 256 tokens;
   the median wall time of a decode step (scheduler, forward, sampling, the host
   reading the token) as tokens/s, with and without CUDA graphs, beside the
   bandwidth roofline: the bytes one step must read (every weight once, the
   embedding table only if tied to the LM head, plus the KV cache of the mean
   context) over the device-to-device copy bandwidth measured at the start of
   the same run (bytes read plus written over time, 2 GiB copies).
2. **RAG throughput**: the ``rag`` workload of ``bench.workloads`` (token-id prompts,
   outputs forced to their length), all requests queued at once, run to the end
   with continuous and with static batching (``SchedulerConfig(batching="static")``),
   each with and without CUDA graphs (``--no-eager-rag``: with graphs only). Both
   batching modes get the same
   ``max_num_seqs`` (a quarter of the requests), so static batching runs whole
   batches one after another while continuous batching refills freed slots.
   Output lengths are capped (``--max-output-len``, default 1024) to fit the run
   in about eight minutes on an H100; the JSON records the cap and how many
   requests it shortened.

Everything runs on one warm engine per shape: graphs are captured once at start-up
and switched off through ``ModelRunner.use_cuda_graphs`` for the eager runs. A short
warm-up before the timed runs builds most of the Triton kernels' variants (Triton
specialises on some argument values, so a few may still be built during a run).
Each rag run also reports how many steps ran eagerly (those no CUDA graph covers) and
how long they took. Progress goes to
stdout; the table at the end and the JSON at ``--out`` carry the device name, the
date and the command.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import logging
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import triton

from bench.workloads import rag_workload
from loomserve.local_engine import LocalEngine
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.shared.messages import SamplingParams, StepResult
from loomserve.worker.kv_cache import kv_cache_bytes_per_block
from loomserve.worker.model_runner import LaunchedStep, ModelRunner

SHAPES = ("llama-3.2-1b", "llama-3.1-8b")
DEFAULT_REQUESTS = {"llama-3.2-1b": 256, "llama-3.1-8b": 128}
MAX_MODEL_LEN = 8192
BATCH1_PROMPT = 512
BATCH1_TOKENS = 256
COPY_BYTES = 2 << 30
# Prompt lengths of the warm-up (query lengths across the prefill kernel's tile sizes),
# run a few at a time so that prompts also join running decodes (mixed steps).
WARMUP_PROMPTS = (3, 17, 40, 100, 300, 1500, 5, 33, 70, 700, 2500, 9)
WARMUP_MAX_SEQS = 4

_started = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f} s] {message}", flush=True)


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000.0)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def weight_bytes_per_step(runner: ModelRunner) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an untied
    embedding table, of which a step reads one row per token."""
    params = {p.data_ptr(): p for p in runner.model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not runner.model_config.tie_word_embeddings:
        total -= runner.model.embed_tokens.weight.numel() * runner.model.embed_tokens.weight.element_size()
    return total


def forced(num_tokens: int) -> SamplingParams:
    """Greedy, no stop tokens: exactly ``num_tokens`` outputs."""
    return SamplingParams(max_tokens=num_tokens, temperature=0.0)


def random_prompt(rng: np.random.Generator, length: int) -> list[int]:
    return rng.integers(0, 32000, length).tolist()


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


def batch1_decode(
    engine: LocalEngine, graphs: bool, copy_bw: float, profile_out: Path | None = None, async_scheduling: bool = True
) -> dict[str, float]:
    """One request decoding alone; with ``profile_out``, a cProfile report of its steps is
    written there (and the times are not representative)."""
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
        "p90_step_ms": float(np.percentile(step_times, 90)) * 1000.0,
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


def run_workload(
    engine: LocalEngine, requests: list[tuple[list[int], int]], config: SchedulerConfig, graphs: bool
) -> RunStats:
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
    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "duration_s": run.duration_s,
        "output_tokens": run.output_tokens,
        "output_tokens_per_s": run.output_tokens / run.duration_s,
        "total_tokens_per_s": (run.output_tokens + run.prompt_tokens) / run.duration_s,
        "requests_per_s": len(run.e2e_s) / run.duration_s,
        "ttft_p50_s": pct(run.ttft_s, 50),
        "ttft_p95_s": pct(run.ttft_s, 95),
        "e2e_p50_s": pct(run.e2e_s, 50),
        "e2e_p95_s": pct(run.e2e_s, 95),
        "steps": run.steps,
        "graph_steps": run.graph_steps,
        "graph_steps_s": run.graph_steps_s,
        # Prefill and mixed steps (and decode batches above the largest graph).
        "eager_steps": run.steps - run.graph_steps,
        "eager_steps_s": run.duration_s - run.graph_steps_s,
        "preemptions": run.preemptions,
    }


def bench_shape(
    shape: str,
    num_requests: int,
    max_output_len: int,
    copy_bw: float,
    profile_dir: Path | None,
    eager_rag: bool,
) -> dict[str, object]:
    progress(f"{shape}: loading dummy weights, profiling, capturing CUDA graphs")
    begin = time.monotonic()
    worker_config = WorkerConfig(model=shape, load_format="dummy", device="cuda", max_model_len=MAX_MODEL_LEN)
    engine = LocalEngine(SchedulerConfig(), worker_config, shape)
    runner = engine.runner
    startup_s = time.monotonic() - begin
    progress(f"{shape}: ready in {startup_s:.1f} s, {runner.num_blocks} KV blocks of {runner.block_size}")

    rng = np.random.default_rng(0)
    warmup = [(random_prompt(rng, n), 8 + 4 * i) for i, n in enumerate(WARMUP_PROMPTS)]
    for graphs in (True, False):
        run_workload(engine, warmup, SchedulerConfig(max_num_seqs=WARMUP_MAX_SEQS), graphs)
    progress(f"{shape}: warm-up done")

    batch1 = {}
    for graphs in (True, False):
        key = "cuda_graphs" if graphs else "eager"
        batch1[key] = batch1_decode(engine, graphs, copy_bw)
        progress(f"{shape}: batch-1 decode, {key}: {batch1[key]['tokens_per_s']:.1f} tokens/s "
                 f"(runner {batch1[key]['median_runner_ms']:.2f} ms of {batch1[key]['median_step_ms']:.2f} ms a step, "
                 f"{100 * batch1[key]['fraction_of_roofline']:.0f}% of the roofline, "
                 f"{batch1[key]['roofline_tokens_per_s']:.0f} tokens/s)")

    if profile_dir is not None:
        # Separate passes: the profiler slows the steps it watches.
        for graphs in (True, False):
            key = "cuda_graphs" if graphs else "eager"
            batch1_decode(engine, graphs, copy_bw, profile_dir / f"profile_{shape}_{key}.txt")
        progress(f"{shape}: profiles written to {profile_dir}")

    workload = rag_workload(num_requests, seed=0, max_model_len=MAX_MODEL_LEN)
    # Without a tokenizer the workload's prompts are token ids.
    requests = [([int(t) for t in r.prompt], min(r.output_len, max_output_len)) for r in workload.requests]
    capped = sum(r.output_len > max_output_len for r in workload.requests)
    max_num_seqs = max(1, num_requests // 4)
    rag = {}
    for batching in ("continuous", "static"):
        config = SchedulerConfig(max_num_seqs=max_num_seqs, batching=batching)
        for graphs in (True, False) if eager_rag else (True,):
            key = f"{batching}_{'cuda_graphs' if graphs else 'eager'}"
            rag[key] = summarise(run_workload(engine, requests, config, graphs))
            progress(f"{shape}: rag {key}: {rag[key]['output_tokens_per_s']:.0f} output tokens/s, "
                     f"TTFT p50 {rag[key]['ttft_p50_s']:.2f} s, p95 {rag[key]['ttft_p95_s']:.2f} s, "
                     f"{rag[key]['duration_s']:.1f} s ({rag[key]['eager_steps']} eager steps: "
                     f"{rag[key]['eager_steps_s']:.1f} s)")
    result: dict[str, object] = {
        "shape": shape,
        "startup_s": startup_s,
        "num_kv_blocks": runner.num_blocks,
        "block_size": runner.block_size,
        "max_model_len": runner.max_model_len,
        "weight_bytes_per_step": weight_bytes_per_step(runner),
        "batch1_decode": batch1,
        "rag": {
            "num_requests": num_requests,
            "max_num_seqs": max_num_seqs,
            "max_output_len": max_output_len,
            "num_outputs_capped": capped,
            "prompt_tokens": sum(len(p) for p, _ in requests),
            "output_tokens": sum(n for _, n in requests),
            "runs": rag,
        },
    }
    del engine, runner
    gc.collect()
    torch.cuda.empty_cache()
    return result


def format_table(shapes: list[dict[str, object]], device: str) -> str:
    lines = [f"device: {device}"]
    for res in shapes:
        b1 = res["batch1_decode"]
        rag = res["rag"]
        assert isinstance(b1, dict) and isinstance(rag, dict)
        lines.append(f"{res['shape']}: batch-1 decode tokens/s: graphs {b1['cuda_graphs']['tokens_per_s']:.1f}, "
                     f"eager {b1['eager']['tokens_per_s']:.1f}, roofline {b1['eager']['roofline_tokens_per_s']:.1f}")
        lines.append(f"  rag ({rag['num_requests']} requests, max_num_seqs {rag['max_num_seqs']}, outputs capped "
                     f"at {rag['max_output_len']}: {rag['num_outputs_capped']} capped)")
        lines.append(f"  {'run':<24}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'dur s':>8}{'steps':>7}"
                     f"{'eager':>7}{'eager s':>9}")
        for key, run in rag["runs"].items():
            lines.append(f"  {key:<24}{run['output_tokens_per_s']:>10.0f}{run['ttft_p50_s']:>10.2f}"
                         f"{run['ttft_p95_s']:>10.2f}{run['duration_s']:>8.1f}{run['steps']:>7}"
                         f"{run['eager_steps']:>7}{run['eager_steps_s']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="dummy model shapes, in order")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="rag requests per shape (default: 256 for llama-3.2-1b, 128 for llama-3.1-8b)")
    parser.add_argument("--max-output-len", type=int, default=1024, help="cap on the rag output lengths")
    parser.add_argument("--no-eager-rag", action="store_true",
                        help="run the rag workload with CUDA graphs only (batch-1 decode still runs both)")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="write cProfile reports of the batch-1 decode steps here (slows those steps)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_engine needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    progress(f"device {name}; measuring the copy bandwidth")
    copy_bw = copy_bandwidth(device)
    progress(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + written)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shapes: list[dict[str, object]] = []
    result: dict[str, object] = {
        "device": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.gpu_engine", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "shapes": shapes,
    }
    for shape in args.shapes:
        num_requests = args.num_requests or DEFAULT_REQUESTS.get(shape, 128)
        shapes.append(
            bench_shape(shape, num_requests, args.max_output_len, copy_bw, args.profile_dir, not args.no_eager_rag)
        )
        # Written after every shape, so that a run cut short keeps what it measured.
        result["complete"] = len(shapes) == len(args.shapes)
        result["elapsed_s"] = time.monotonic() - _started
        args.out.write_text(json.dumps(result, indent=2))
    print(format_table(shapes, name))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
