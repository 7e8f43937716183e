"""The batching ablation on one GPU: Hugging Face transformers against loomserve, static against
continuous batching, with and without the gateway, on the ``rag`` workload at real model shapes
with dummy weights (bf16).

    python -m bench.ablation --out results/ablation.json
    python -m bench.ablation --smoke --out /tmp/ablation-smoke.json    # every row, tiny shape, CPU
    python -m bench.ablation --out results/ablation-gw4.json --rows loomserve-continuous \
        --gateway-workers 4 --client-processes 4       # four gateway processes, four client processes

Every row runs in this one script on one GPU, one after another, on the same requests (the
first ``--num-requests`` of the ``rag`` workload, token-id prompts, outputs forced to their
planned length and capped at ``--max-output-len``), and the batch size of ``--max-num-seqs``
(requests per static batch, most running sequences otherwise; per row if asked):

| row                    | what runs                                                                        |
|------------------------|----------------------------------------------------------------------------------|
| ``hf-static``          | transformers ``model.generate`` on left-padded batches, one after another; each  |
|                        | batch runs as long as its longest request (``min_new_tokens = max_new_tokens``) |
| ``hf-continuous``      | transformers' continuous batching (the manager behind ``generate_batch``),       |
|                        | paged KV cache, SDPA, each request its own ``max_new_tokens``, EOS disabled,     |
|                        | loomserve's step budget (2048 tokens) and batch size                             |
| ``loomserve-static``   | ``loomserve serve --batching static`` as a subprocess, over HTTP (``bench.serving``: |
|                        | streamed completions, all requests sent at once, ``ignore_eos``)                 |
| ``loomserve-continuous`` | the same with ``--batching continuous``                                        |
| ``engine``             | loomserve's scheduler and model runner in this process (``LocalEngine``, as       |
|                        | ``bench.gpu_engine``), continuous batching: what gateway and sockets cost        |

The loomserve HTTP rows take two more options, both recorded in the settings:
``--gateway-workers N`` (``loomserve serve --gateway-workers N``, N gateway processes on one port;
passed only above 1, so a server without the option runs the others) and ``--client-processes K``
(``bench.serving``'s client processes, so that the load generator keeps up with those gateways).

The Hugging Face models are ``LlamaForCausalLM`` built from a ``LlamaConfig`` of the same shape
(``shared/dummy_shapes.py``) with random weights, SDPA attention.

Columns, per row:

| column              | definition                                                                     |
|---------------------|--------------------------------------------------------------------------------|
| output tok/s        | output tokens of the completed requests / the run's wall time (first request   |
|                     | queued to last token), all requests queued at time 0                           |
| TTFT p50 / p95      | run start (or, over HTTP, the request's send) to its first token               |
| GPU util            | mean of NVML's utilization.gpu, sampled every 100 ms during the timed run      |
| $ / 1M output tok   | ``--gpu-hour-usd`` / 3600 / (output tok/s) * 1e6                               |
| % compute roofline  | useful model FLOPs / wall time / the bf16 matmul peak measured at the start;   |
|                     | FLOPs per request: 2 * (non-embedding linear weights) per processed token     |
|                     | (prompt + output - 1), 2 * vocab * hidden per sampled token (LM head), and     |
|                     | 4 * layers * heads * head_dim per (query, key) pair of causal attention;       |
|                     | padding and tokens generated past a request's length are not counted           |
| batch-1 decode      | one request (512 prompt tokens, 256 generated) alone: the median time between  |
|                     | its tokens as tokens/s, beside the bandwidth roofline: copy bandwidth measured |
|                     | at the start / bytes one decode step must read (every weight once, an untied   |
|                     | embedding table not, plus the KV cache of the mean context)                   |

Start-up, model construction and warm-up are outside the timed runs (and reported). The whole
run has a time budget (``--time-budget-s``): each row gets a fair share of what is left, the
Hugging Face rows stop starting batches (static) or waiting for requests (continuous) at the
end of their share and report what completed (status ``truncated``), and a row that cannot get
``--min-row-s`` is skipped. Results are written to ``--out`` after every row, so a run cut short
keeps its finished rows; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import inspect
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.harness import plots
from bench.harness.cli import cuda_available, elapsed_s, new_parser, progress, setup_logging
from bench.harness.device_memory import free_device_memory, gpu_bytes_in_use, wait_gpu_released
from bench.harness.engine import (
    BATCH1_PROMPT,
    BATCH1_TOKENS,
    BENCH_SHAPES,
    MAX_MODEL_LEN,
    SMOKE_SHAPE,
    WARMUP_MAX_SEQS,
    ExecuteTimes,
    batch1_decode,
    run_workload,
    summarise,
    warmup_requests,
)
from bench.harness.gpu_sampler import GpuSampler
from bench.harness.metadata import command_line, git_state, library_versions, utc_timestamp
from bench.harness.metrics import RequestOutcome, compute_metrics
from bench.harness.model_costs import ShapeCosts
from bench.harness.processes import ProcessGroup
from bench.harness.readiness import free_port
from bench.harness.results import write_chart, write_json
from bench.harness.rooflines import COPY_BYTES, copy_bandwidth, matmul_peak_flops
from bench.harness.stacks import start_serve
from bench.harness.stats import median_gap
from bench.serving import BenchConfig, run_benchmark
from bench.workloads import TokenRequest, Workload, rag_workload, token_requests, token_workload
from loomserve.shared.config import SchedulerConfig, WorkerConfig, parse_bool
from loomserve.shared.dummy_shapes import DUMMY_SHAPES

log = logging.getLogger("bench.ablation")

RESULT_SCHEMA = "loomserve.bench.ablation/1"
ROWS = ("hf-static", "hf-continuous", "loomserve-static", "loomserve-continuous", "engine")
ROW_TITLES = {
    "hf-static": "HF transformers, static batches (generate)",
    "hf-continuous": "HF transformers, continuous batching",
    "loomserve-static": "loomserve HTTP, static batching",
    "loomserve-continuous": "loomserve HTTP, continuous batching",
    "engine": "loomserve engine alone, continuous",
}
# A server gets the rest of its row's time to become healthy, but at least this long.
SERVER_START_MIN_S = 60.0
# A row's share of the time left is this many times an even split, so that rows which finish
# early leave their time to the later ones, and one slow row cannot take all of it.
ROW_SHARE = 1.6

# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    shapes: tuple[str, ...]
    rows: tuple[str, ...]
    num_requests: dict[str, int]  # per row
    max_output_len: dict[str, int]  # per row
    max_num_seqs: dict[str, int]  # per row
    cuda_graph_max_tokens: int | None  # loomserve's; None: its default
    async_scheduling: bool  # loomserve's
    kv_cache_dtype: str  # loomserve's
    max_num_batched_tokens: int
    gpu_hour_usd: float
    time_budget_s: float
    min_row_s: float
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    max_model_len: int
    smoke: bool
    matmul_size: int
    copy_bytes: int
    kv_cache_gb: float  # loomserve's KV cache on the CPU (the GPU sizes its own)
    seed: int = 0
    tp: int = 1  # loomserve's tensor-parallel size (HTTP rows only); GPU count for cost and rooflines
    gateway_workers: int = 1  # loomserve's gateway processes (HTTP rows only)
    client_processes: int = 1  # bench.serving's client processes (HTTP rows only)


def parse_per_row(values: Sequence[str], default: int, flag: str) -> dict[str, int]:
    """``["128", "hf-static=32"]`` -> every row 128 except hf-static 32."""
    per_row = dict.fromkeys(ROWS, default)
    overrides: dict[str, int] = {}
    for value in values:
        row, sep, number = value.rpartition("=")
        try:
            count = int(number)
        except ValueError:
            raise ValueError(f"{flag}: {value!r} is neither N nor ROW=N") from None
        if count < 1:
            raise ValueError(f"{flag}: {value!r} must be at least 1")
        if not sep:
            per_row = dict.fromkeys(ROWS, count)
        elif row in ROWS:
            overrides[row] = count
        else:
            raise ValueError(f"{flag}: unknown row {row!r}; rows: {', '.join(ROWS)}")
    return per_row | overrides


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = new_parser("bench.ablation", __doc__)
    parser.add_argument("--out", type=Path, required=True, help="JSON results, rewritten after every row")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"dummy shapes, in order (default: {BENCH_SHAPES})")
    parser.add_argument("--rows", nargs="+", default=None, choices=ROWS, metavar="ROW",
                        help=f"rows to run, in this order (default: all: {' '.join(ROWS)})")
    parser.add_argument("--num-requests", nargs="+", default=[], metavar="N|ROW=N",
                        help="rag requests of every row (N) or of one row (ROW=N); default 128 (smoke: 8)")
    parser.add_argument("--max-output-len", nargs="+", default=[], metavar="N|ROW=N",
                        help="cap on the rag output lengths, for every row or one; default 512 (smoke: 24)")
    parser.add_argument("--max-num-seqs", nargs="+", default=[], metavar="N|ROW=N",
                        help="static batch size and most running sequences, for every row or one "
                             "(default 32; smoke: 4)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig().max_num_batched_tokens,
                        help="token budget of one step: loomserve's, and transformers' continuous batching's "
                             "(default: %(default)s)")
    parser.add_argument("--cuda-graph-max-tokens", type=int, default=None,
                        help="loomserve's --cuda-graph-max-tokens (default: loomserve's default)")
    parser.add_argument("--async-scheduling", type=parse_bool, default=SchedulerConfig().async_scheduling,
                        metavar="BOOL", help="loomserve's --async-scheduling (default: %(default)s)")
    parser.add_argument("--kv-cache-dtype", default=WorkerConfig().kv_cache_dtype, choices=("auto", "fp8"),
                        help="loomserve's --kv-cache-dtype (default: %(default)s)")
    parser.add_argument("--gpu-hour-usd", type=float, default=2.50,
                        help="price of one GPU-hour for the cost column (default: %(default)s, an H100 on demand)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="wall time for the whole run (default 500; smoke: 170)")
    parser.add_argument("--min-row-s", type=float, default=None,
                        help="skip a row that would get less time than this (default 40; smoke: 3)")
    parser.add_argument("--tp", type=int, default=1,
                        help="serve over this many GPUs (--tp of loomserve serve); loomserve HTTP rows only. "
                             "Cost, GPU utilisation and the rooflines then count every GPU of the group")
    parser.add_argument("--gateway-workers", type=int, default=1,
                        help="gateway processes of loomserve serve (--gateway-workers), HTTP rows; "
                             "passed only above 1 (default: %(default)s)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes of the bench.serving load generator, HTTP rows (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"every row at the {SMOKE_SHAPE} shape on the CPU in float32, few requests: "
                             "proves the code paths, measures nothing")
    args = parser.parse_args(argv)
    smoke = args.smoke
    try:
        settings = Settings(
            shapes=tuple(args.shapes or ((SMOKE_SHAPE,) if smoke else BENCH_SHAPES)),
            rows=tuple(args.rows or ROWS),
            num_requests=parse_per_row(args.num_requests, 8 if smoke else 128, "--num-requests"),
            max_output_len=parse_per_row(args.max_output_len, 24 if smoke else 512, "--max-output-len"),
            max_num_seqs=parse_per_row(args.max_num_seqs, 4 if smoke else 32, "--max-num-seqs"),
            cuda_graph_max_tokens=args.cuda_graph_max_tokens,
            async_scheduling=args.async_scheduling,
            kv_cache_dtype=args.kv_cache_dtype,
            max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_hour_usd=args.gpu_hour_usd,
            time_budget_s=args.time_budget_s or (170.0 if smoke else 500.0),
            min_row_s=args.min_row_s if args.min_row_s is not None else (3.0 if smoke else 40.0),
            device="cpu" if smoke else "cuda",
            dtype=torch.float32 if smoke else torch.bfloat16,
            max_model_len=1024 if smoke else MAX_MODEL_LEN,
            smoke=smoke,
            matmul_size=512 if smoke else 8192,
            copy_bytes=(64 << 20) if smoke else COPY_BYTES,
            kv_cache_gb=0.25,
            tp=args.tp,
            gateway_workers=args.gateway_workers,
            client_processes=args.client_processes,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if settings.gateway_workers < 1 or settings.client_processes < 1:
        parser.error("--gateway-workers and --client-processes must be at least 1")
    if settings.tp > 1 and not set(settings.rows) <= {"loomserve-static", "loomserve-continuous"}:
        parser.error("--tp above 1 runs the loomserve HTTP rows only: pass --rows loomserve-continuous "
                     "(and/or loomserve-static)")
    unknown = [s for s in settings.shapes if s not in DUMMY_SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(DUMMY_SHAPES)}")
    return args, settings


# -- rows ----------------------------------------------------------------------------------------


class RowError(RuntimeError):
    """A row failed; ``details`` (a server's log tail, say) go into the results."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


@dataclass
class RowRun:
    """What one row measured, before the derived columns."""

    outcomes: list[RequestOutcome] | None = None  # per request (HF and HTTP rows)
    engine_stats: dict[str, Any] | None = None  # harness.engine.summarise() of the engine row
    duration_s: float = 0.0
    gpu: dict[str, Any] = field(default_factory=dict)
    batch1_tokens_per_s: float | None = None
    batch1_median_step_ms: float | None = None
    truncated: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RowContext:
    shape: str
    row: str
    costs: ShapeCosts
    requests: list[TokenRequest]
    settings: Settings
    deadline: float  # time.perf_counter() by which the timed run should end

    @property
    def max_num_seqs(self) -> int:
        return self.settings.max_num_seqs[self.row]


def batch1_prompt(vocab_size: int) -> list[int]:
    return np.random.default_rng(1).integers(0, min(vocab_size, 32000), BATCH1_PROMPT).tolist()


def median_gap_ms(times: Sequence[float]) -> float | None:
    gap = median_gap(times)
    return None if gap is None else gap * 1000.0


def build_hf_model(ctx: RowContext) -> Any:
    """``LlamaForCausalLM`` of the shape, random weights, built on the device in the run's dtype."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = DUMMY_SHAPES[ctx.shape]
    if shape["model_type"] != "llama":
        raise ValueError(f"the Hugging Face rows build Llama models only, not {shape['model_type']}")
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"})
    torch.manual_seed(ctx.settings.seed)
    with torch.device(ctx.settings.device):
        model = AutoModelForCausalLM.from_config(config, dtype=ctx.settings.dtype, attn_implementation="sdpa")
    # Built in place where the device context is honoured (transformers 5.x); moved otherwise.
    return model.to(ctx.settings.device).eval()


def run_hf_static(ctx: RowContext) -> RowRun:
    from transformers import LogitsProcessorList

    from bench.harness.hf_generate import StepClock, run_static_batches

    run = RowRun()
    begin = time.perf_counter()
    model = build_hf_model(ctx)
    run.details["model_build_s"] = time.perf_counter() - begin
    device = ctx.settings.device
    with torch.inference_mode():
        # Warm-up: kernels and allocator for a small batch.
        warm = [[1] * 64, [2] * 32]
        run_static_batches(model, warm, [8, 8], 2, 0, device=device)
        clock = StepClock()
        ids = torch.tensor([batch1_prompt(ctx.costs.config.vocab_size)], device=device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=BATCH1_TOKENS,
                       min_new_tokens=BATCH1_TOKENS, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([clock]))
    run.batch1_median_step_ms = median_gap_ms(clock.times)
    prompts = [p for p, _ in ctx.requests]
    lens = [n for _, n in ctx.requests]
    with GpuSampler() as gpu:
        outcomes, duration = run_static_batches(model, prompts, lens, ctx.max_num_seqs, 0,
                                                device=device, deadline=ctx.deadline)
    run.outcomes, run.duration_s, run.gpu = outcomes, duration, gpu.summary()
    run.truncated = len(outcomes) < len(prompts)
    run.details["batch_size"] = ctx.max_num_seqs
    return run


def _continuous_batching_config(ctx: RowContext) -> Any:
    """transformers' ContinuousBatchingConfig with the fields this version has, or None."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:
            return None
    # The batch size and the token budget of a step are loomserve's (--max-num-seqs and
    # --max-num-batched-tokens); transformers sizes its KV cache from the free GPU memory. SDPA as in
    # the static row, not a flash kernel fetched from the Hub (5.2x); with SDPA, transformers
    # leaves CUDA graphs off by default (an attention mask is needed).
    wanted: dict[str, Any] = {
        "max_requests_per_batch": ctx.max_num_seqs,
        "max_batch_tokens": ctx.settings.max_num_batched_tokens,
        "auto_switch_to_flash": False,
    }
    if ctx.settings.device == "cpu":
        # Sized from free memory otherwise; on the CPU that would be most of the RAM.
        wanted |= {"num_blocks": 64, "max_batch_tokens": 512}
    accepted = set(inspect.signature(ContinuousBatchingConfig).parameters)
    return ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in accepted})


class RowSkipped(Exception):
    """A row that cannot run here; its message says why."""


def run_hf_continuous(ctx: RowContext) -> RowRun:
    from transformers import GenerationConfig

    if ctx.settings.device == "cpu" and importlib.util.find_spec("psutil") is None:
        raise RowSkipped("transformers' continuous batching reads the free memory of a CPU with psutil, "
                         "which is not installed")
    run = RowRun()
    begin = time.perf_counter()
    model = build_hf_model(ctx)
    run.details["model_build_s"] = time.perf_counter() - begin
    # EOS -1 never matches: every request runs to its own max_new_tokens.
    generation = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in ctx.requests),
                                  eos_token_id=-1, pad_token_id=0)
    cb_config = _continuous_batching_config(ctx)
    kwargs = {} if cb_config is None else {"continuous_batching_config": cb_config}
    if cb_config is None or not hasattr(cb_config, "auto_switch_to_flash"):
        # transformers 5.1x looks for a flash kernel (on the Hub, too) unless the model is
        # already on a paged implementation; 5.2x takes plain "sdpa" and refuses "paged|sdpa".
        model.set_attn_implementation("paged|sdpa")
    manager = model.init_continuous_batching(generation_config=generation, **kwargs)
    run.details["continuous_batching_config"] = repr(cb_config)
    hard_stop = "hard_stop" in inspect.signature(manager.stop).parameters
    try:
        begin = time.perf_counter()
        manager.warmup()
        manager.start()
        run.details["warmup_s"] = time.perf_counter() - begin
        run.details["attn_implementation"] = model.config._attn_implementation

        def collect(ids: list[str], deadline: float) -> dict[str, Any]:
            done: dict[str, Any] = {}
            while len(done) < len(ids) and time.perf_counter() < deadline:
                result = manager.get_result(timeout=0.5)
                if result is not None and result.is_finished():
                    done[result.request_id] = result
                elif result is None and not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread died")
            return done

        warm = [manager.add_request([1] * 64, request_id=f"warm{i}", max_new_tokens=8) for i in range(2)]
        collect([w for w in warm if w is not None], time.perf_counter() + 120)
        rid = manager.add_request(batch1_prompt(ctx.costs.config.vocab_size), request_id="batch1",
                                  max_new_tokens=BATCH1_TOKENS, record_timestamps=True)
        batch1 = collect([rid] if rid is not None else [], time.perf_counter() + 300).get("batch1")
        if batch1 is not None and batch1.timestamps:
            run.batch1_median_step_ms = median_gap_ms(batch1.timestamps)

        with GpuSampler() as gpu:
            started = time.perf_counter()
            ids = [manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, record_timestamps=True)
                   for i, (prompt, n) in enumerate(ctx.requests)]
            done = collect([i for i in ids if i is not None], ctx.deadline)
            run.duration_s = time.perf_counter() - started
        run.gpu = gpu.summary()
        run.truncated = len(done) < len(ctx.requests)
        outcomes = []
        for i, (prompt, n) in enumerate(ctx.requests):
            result = done.get(f"r{i}")
            outcome = RequestOutcome(len(prompt), n)
            if result is None:
                outcome.error = "not finished by the row's deadline"
            elif result.error is not None:
                outcome.error = str(result.error)
            else:
                times = result.timestamps or []
                outcome.output_tokens = len(result.generated_tokens)
                if times:
                    outcome.ttft_s, outcome.e2el_s = times[0] - started, times[-1] - started
                    outcome.itls_s = [b - a for a, b in itertools.pairwise(times)]
                else:
                    outcome.error = "no timestamps recorded"
            outcomes.append(outcome)
        run.outcomes = outcomes
        if done:  # the run ends with its last token, not with this loop's polling
            ends = [o.e2el_s for o in outcomes if o.e2el_s is not None]
            if ends and not run.truncated:
                run.duration_s = max(ends)
    finally:
        with contextlib.suppress(Exception):
            manager.stop(block=True, timeout=60, **({"hard_stop": True} if hard_stop else {}))
        with contextlib.suppress(Exception):
            manager.destroy()
    return run


def serve_options(ctx: RowContext, batching: str) -> list[str]:
    """``loomserve serve``'s options for the row: the dummy model and the run's settings."""
    s = ctx.settings
    options = ["--load-format", "dummy", "--model", ctx.shape, "--device", s.device, "--batching", batching,
               "--max-num-seqs", str(ctx.max_num_seqs), "--max-model-len", str(s.max_model_len),
               "--response-cache", "false", "--seed", str(s.seed),
               "--max-num-batched-tokens", str(s.max_num_batched_tokens),
               "--async-scheduling", str(s.async_scheduling).lower(), "--kv-cache-dtype", s.kv_cache_dtype,
               "--tp", str(s.tp)]
    if s.device == "cpu":
        options += ["--kv-cache-gb", str(s.kv_cache_gb)]
    if s.cuda_graph_max_tokens is not None:
        options += ["--cuda-graph-max-tokens", str(s.cuda_graph_max_tokens)]
    if s.gateway_workers > 1:
        options += ["--gateway-workers", str(s.gateway_workers)]
    return options


def run_loomserve_http(ctx: RowContext, batching: str) -> RowRun:
    run = RowRun()
    free_device_memory(ctx.settings.device)
    baseline = gpu_bytes_in_use(ctx.settings.device)
    with contextlib.ExitStack() as cleanup:
        # Runs last, after the ProcessGroup has stopped the server.
        cleanup.callback(wait_gpu_released, ctx.settings.device, baseline)
        group = cleanup.enter_context(ProcessGroup())
        begin = time.perf_counter()
        try:
            base_url = start_serve(group, free_port(), serve_options(ctx, batching),
                                   max(SERVER_START_MIN_S, ctx.deadline - time.perf_counter()))
            run.details["startup_s"] = time.perf_counter() - begin

            def bench(workload: Workload, timeout_s: float) -> Any:
                config = BenchConfig(workload, base_url=base_url, model=ctx.shape,
                                     request_timeout_s=max(1.0, timeout_s),
                                     client_processes=ctx.settings.client_processes)
                return asyncio.run(run_benchmark(config))

            begin = time.perf_counter()
            bench(token_workload("warm-up", warmup_requests(ctx.settings.max_model_len)), 300)
            run.details["warmup_s"] = time.perf_counter() - begin
            single = bench(token_workload("batch-1", [(batch1_prompt(ctx.costs.config.vocab_size), BATCH1_TOKENS)]),
                           300)
            if single.metrics.tpot_ms is not None:
                run.batch1_median_step_ms = single.metrics.tpot_ms.median
            with GpuSampler(ctx.settings.tp) as gpu:
                result = bench(token_workload("rag", ctx.requests), ctx.deadline - time.perf_counter())
            run.gpu = gpu.summary(result.window)
            run.outcomes, run.duration_s = result.outcomes, result.metrics.duration_s
            run.details["client_cpu_us_per_output_token"] = result.client_cpu_us_per_output_token
            run.truncated = result.metrics.failed > 0 and time.perf_counter() >= ctx.deadline
            if result.metrics.failed:
                run.details["serve_log_tail"] = group.log_tail("serve")
            # The scheduler's periodic stats lines: tokens/s and where each step's time went.
            run.details["scheduler_stats"] = [line for line in group.log_tail("serve").splitlines()
                                              if "tokens/s out" in line]
            with contextlib.suppress(httpx.HTTPError, ValueError):
                run.details["server_health"] = httpx.get(base_url + "/health", timeout=5).json()
        except Exception as exc:
            raise RowError(f"{type(exc).__name__}: {exc}", {"serve_log_tail": group.log_tail("serve")}) from exc
    return run


def run_engine(ctx: RowContext, copy_bw: float) -> RowRun:
    from loomserve.local_engine import LocalEngine

    s = ctx.settings
    run = RowRun()
    begin = time.perf_counter()
    # As `serve` does: graphs for batches of up to --max-num-seqs sequences.
    worker_config = WorkerConfig(model=ctx.shape, load_format="dummy", device=s.device, max_model_len=s.max_model_len,
                                 kv_cache_gb=s.kv_cache_gb, seed=s.seed, kv_cache_dtype=s.kv_cache_dtype,
                                 cuda_graph_max_seqs=ctx.max_num_seqs)
    if s.cuda_graph_max_tokens is not None:
        worker_config = dataclasses.replace(worker_config, cuda_graph_max_tokens=s.cuda_graph_max_tokens)
    engine = LocalEngine(SchedulerConfig(async_scheduling=s.async_scheduling), worker_config, ctx.shape)
    run.details["startup_s"] = time.perf_counter() - begin
    run.details["num_kv_blocks"] = engine.runner.num_blocks
    begin = time.perf_counter()
    run_workload(engine, warmup_requests(s.max_model_len),
                 SchedulerConfig(max_num_seqs=WARMUP_MAX_SEQS, async_scheduling=s.async_scheduling), True)
    run.details["warmup_s"] = time.perf_counter() - begin
    batch1 = batch1_decode(engine, True, copy_bw, async_scheduling=s.async_scheduling)
    run.batch1_median_step_ms = batch1["median_step_ms"]
    run.details["batch1_decode"] = batch1
    config = SchedulerConfig(max_num_seqs=ctx.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                             batching="continuous", async_scheduling=s.async_scheduling)
    with GpuSampler() as gpu, ExecuteTimes(engine.runner) as step_times:
        stats = run_workload(engine, ctx.requests, config, True)
    run.gpu = gpu.summary()
    # The in-process counterpart of the scheduler's stats lines in the HTTP rows.
    run.details["step_times"] = step_times.summary()
    run.engine_stats = summarise(stats)
    run.duration_s = stats.duration_s
    return run


# -- one row's figures ---------------------------------------------------------------------------


def row_figures(ctx: RowContext, run: RowRun, copy_bw: float, peak_flops: float) -> dict[str, Any]:
    """The table's columns (and the raw material behind them) from what a row measured."""
    s = ctx.settings
    figures: dict[str, Any] = {"num_requests": len(ctx.requests), "max_num_seqs": ctx.max_num_seqs}
    if run.outcomes is not None:
        metrics = compute_metrics(run.outcomes, max(run.duration_s, 1e-9))
        done = [o for o in run.outcomes if o.success]
        output_tokens = metrics.total_output_tokens
        flops = sum(ctx.costs.request_flops(o.prompt_len, o.output_tokens) for o in done)
        figures |= {
            "completed": metrics.completed,
            "failed": metrics.failed,
            "prompt_tokens": metrics.total_input_tokens,
            "ttft_p50_ms": metrics.ttft_ms.median if metrics.ttft_ms else None,
            "ttft_p95_ms": metrics.ttft_ms.p95 if metrics.ttft_ms else None,
            "tpot_p50_ms": metrics.tpot_ms.median if metrics.tpot_ms else None,
            "e2el_p50_ms": metrics.e2el_ms.median if metrics.e2el_ms else None,
            "output_len_mismatches": metrics.output_len_mismatches,
            "errors": metrics.errors,
        }
    else:
        stats = run.engine_stats or {}
        output_tokens = int(stats.get("output_tokens", 0))
        flops = sum(ctx.costs.request_flops(len(p), n) for p, n in ctx.requests)
        figures |= {
            "completed": len(ctx.requests),
            "failed": 0,
            "prompt_tokens": sum(len(p) for p, _ in ctx.requests),
            "ttft_p50_ms": stats["ttft_p50_s"] * 1000.0,
            "ttft_p95_ms": stats["ttft_p95_s"] * 1000.0,
            "tpot_p50_ms": None,
            "e2el_p50_ms": stats["e2e_p50_s"] * 1000.0,
            "output_len_mismatches": output_tokens - sum(n for _, n in ctx.requests),
            "engine": stats,
        }
    tokens_per_s = output_tokens / run.duration_s if run.duration_s > 0 else 0.0
    mean_context = BATCH1_PROMPT + (BATCH1_TOKENS + 1) / 2
    roofline = s.tp * copy_bw / ctx.costs.decode_bytes_per_step(mean_context)
    b1 = 1000.0 / run.batch1_median_step_ms if run.batch1_median_step_ms else None
    figures |= {
        "duration_s": run.duration_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": tokens_per_s,
        "cost_per_1m_output_tokens_usd": s.tp * s.gpu_hour_usd / 3600.0 / tokens_per_s * 1e6 if tokens_per_s else None,
        "model_flops": flops,
        "compute_roofline_fraction": flops / run.duration_s / (s.tp * peak_flops) if run.duration_s > 0 else None,
        "batch1_tokens_per_s": b1,
        "batch1_median_step_ms": run.batch1_median_step_ms,
        "batch1_roofline_tokens_per_s": roofline,
        "batch1_roofline_fraction": b1 / roofline if b1 else None,
        **run.gpu,
        "details": run.details,
    }
    return figures


# -- the run -------------------------------------------------------------------------------------


class Budget:
    """The run's time budget, shared out among the rows still to run."""

    def __init__(self, total_s: float, min_row_s: float) -> None:
        self.end = time.perf_counter() + total_s
        self.min_row_s = min_row_s

    def left(self) -> float:
        return self.end - time.perf_counter()

    def row_deadline(self, rows_left: int) -> float | None:
        """When the next row's timed run should end, or None: too little time left to run it."""
        left = self.left()
        if left < self.min_row_s:
            return None
        share = max(self.min_row_s, ROW_SHARE * left / max(1, rows_left))
        return time.perf_counter() + min(left, share)


def shape_requests(settings: Settings, row: str) -> tuple[list[TokenRequest], int]:
    """The row's rag requests (token ids, capped output length) and how many the cap shortened."""
    workload = rag_workload(settings.num_requests[row], seed=settings.seed, max_model_len=settings.max_model_len)
    return token_requests(workload, settings.max_output_len[row])


def run_row(row: str, ctx: RowContext, copy_bw: float, peak_flops: float) -> dict[str, Any]:
    begin = time.perf_counter()
    # Memory an earlier row failed to give back would shrink this row's KV cache: record it.
    in_use_before = gpu_bytes_in_use(ctx.settings.device)
    if row == "hf-static":
        run = run_hf_static(ctx)
    elif row == "hf-continuous":
        run = run_hf_continuous(ctx)
    elif row == "loomserve-static":
        run = run_loomserve_http(ctx, "static")
    elif row == "loomserve-continuous":
        run = run_loomserve_http(ctx, "continuous")
    elif row == "engine":
        run = run_engine(ctx, copy_bw)
    else:
        raise ValueError(f"unknown row {row}")
    # The row's models, caches and engines are gone with its function's frame: free their memory.
    free_device_memory(ctx.settings.device)
    figures = row_figures(ctx, run, copy_bw, peak_flops)
    figures["status"] = "truncated" if run.truncated else "ok"
    figures["gpu_gib_in_use_before_row"] = in_use_before / (1 << 30)
    figures["row_wall_s"] = time.perf_counter() - begin
    return figures


def settings_json(settings: Settings) -> dict[str, Any]:
    """The result file's settings: every field of ``settings`` and the batch-1 request."""
    return {
        **{k: v for k, v in settings.__dict__.items() if k != "dtype"},
        "dtype": str(settings.dtype).removeprefix("torch."),
        "batch1_prompt": BATCH1_PROMPT,
        "batch1_tokens": BATCH1_TOKENS,
    }


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def format_markdown(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}; {result['settings']['dtype']} matmul peak "
             f"{result['matmul_peak_flops'] / 1e12:.1f} TFLOP/s, "
             f"copy {result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (read + written); "
             f"${result['settings']['gpu_hour_usd']:.2f}/GPU-hour; {result['date']}"]
    for shape in result["shapes"]:
        lines += ["", f"### {shape['shape']} (rag)", "",
                  "| row | requests | output tok/s | TTFT p50 / p95 (ms) | GPU util | $ / 1M out tok | "
                  "% compute roofline | batch-1 tok/s (% BW roofline) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row, r in shape["rows"].items():
            title = ROW_TITLES.get(row, row)
            if r.get("status") in ("skipped", "failed"):
                message = (r.get("message") or "").strip().split("\n")[0][:100].replace("|", "/")
                lines.append(f"| {title} | {r['status']}: {message} | | | | | | |")
                continue
            cap = shape["requests"][row]["max_output_len"]
            status = " (truncated)" if r["status"] == "truncated" else ""
            util = _num(r.get("gpu_util_mean_pct"), ".0f")
            frac = r.get("compute_roofline_fraction")
            b1 = r.get("batch1_tokens_per_s")
            b1_frac = r.get("batch1_roofline_fraction")
            lines.append(
                f"| {title} | {r['completed']}/{r['num_requests']}, out ≤ {cap}, {r['max_num_seqs']} seqs{status} | "
                f"{_num(r['output_tokens_per_s'], ',.0f')} | "
                f"{_num(r['ttft_p50_ms'], ',.0f')} / {_num(r['ttft_p95_ms'], ',.0f')} | "
                f"{util}{'%' if util != 'n/a' else ''} | {_num(r['cost_per_1m_output_tokens_usd'], '.2f')} | "
                f"{_num(frac * 100 if frac is not None else None, '.1f')}% | "
                f"{_num(b1, '.0f')} ({_num(b1_frac * 100 if b1_frac is not None else None, '.0f')}%) |")
    return "\n".join(lines)


def figure(result: dict[str, Any]) -> plots.Chart | None:
    """Per shape, each row's throughput against its TTFT (a segment from p50 to p95): continuous
    batching should sit right of static and lower; None where no row finished."""
    panels = []
    for shape in result["shapes"]:
        rows = tuple(
            plots.Series(ROW_TITLES.get(row, row) + (" (truncated)" if r["status"] == "truncated" else ""),
                         (r["output_tokens_per_s"],) * 2, (r["ttft_p50_ms"], r["ttft_p95_ms"]))
            for row, r in shape["rows"].items()
            if r.get("status") in ("ok", "truncated") and r["ttft_p50_ms"] is not None and r["ttft_p95_ms"] is not None
        )
        if rows:
            panels.append(plots.Panel(f"{shape['shape']} (rag)", "output tokens/s", "TTFT p50 to p95 (ms)", rows,
                                      logx=plots.wide([x for s in rows for x in s.x]),
                                      logy=plots.wide([y for s in rows for y in s.y])))
    if not panels:
        return None
    return plots.Chart(f"Batching ablation: {result['device']}, {result['date']}", tuple(panels))


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_args(argv)
    # Nothing here comes from the Hugging Face Hub: fail at once rather than wait on a network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging("%(asctime)s %(name)s %(levelname)s: %(message)s")
    budget = Budget(settings.time_budget_s, settings.min_row_s)
    if settings.device == "cuda" and not cuda_available("bench.ablation", "a CUDA GPU (or --smoke, on the CPU)"):
        return 2
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    progress(f"device {device_name}; measuring the matmul peak and the copy bandwidth")
    peak = matmul_peak_flops(settings.device, settings.dtype, settings.matmul_size)
    copy_bw = copy_bandwidth(settings.device, settings.copy_bytes)
    dtype = str(settings.dtype).removeprefix("torch.")
    progress(f"{dtype} matmul {settings.matmul_size}^3: {peak / 1e12:.1f} TFLOP/s; "
             f"copy: {copy_bw / 1e12:.2f} TB/s (read + written)")
    gpu_probe = GpuSampler()
    if gpu_probe.error:
        progress(gpu_probe.error)
    commit, dirty = git_state()
    shapes: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "date": utc_timestamp(),
        "command": command_line("bench.ablation", argv),
        "git_commit": commit,
        "git_dirty": dirty,
        "device": device_name,
        "versions": library_versions(("torch", "triton", "transformers", "tokenizers", "nvidia-ml-py", "numpy")),
        "matmul_peak_flops": peak,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "settings": settings_json(settings),
        "shapes": shapes,
        "complete": False,
    }
    total_rows = len(settings.shapes) * len(settings.rows)
    rows_done = 0
    for shape in settings.shapes:
        costs = ShapeCosts.of(shape, settings.dtype)
        entry: dict[str, Any] = {"shape": shape, "params": costs.params, "requests": {}, "rows": {}}
        shapes.append(entry)
        for row in settings.rows:
            requests, capped = shape_requests(settings, row)
            entry["requests"][row] = {
                "num_requests": len(requests),
                "max_output_len": settings.max_output_len[row],
                "num_outputs_capped": capped,
                "prompt_tokens": sum(len(p) for p, _ in requests),
                "output_tokens": sum(n for _, n in requests),
            }
            deadline = budget.row_deadline(total_rows - rows_done)
            rows_done += 1
            if deadline is None:
                message = f"time budget: {budget.left():.0f} s left, less than --min-row-s {settings.min_row_s:g}"
                entry["rows"][row] = {"status": "skipped", "message": message}
                progress(f"{shape} {row}: skipped ({message})")
                write_json(args.out, result)
                continue
            progress(f"{shape} {row}: {len(requests)} requests, outputs capped at {settings.max_output_len[row]}, "
                     f"{deadline - time.perf_counter():.0f} s for it")
            ctx = RowContext(shape, row, costs, requests, settings, deadline)
            try:
                figures = run_row(row, ctx, copy_bw, peak)
            except RowSkipped as exc:
                figures = {"status": "skipped", "message": str(exc)}
                progress(f"{shape} {row}: skipped ({exc})")
            except Exception as exc:
                log.exception("%s %s failed", shape, row)
                message = str(exc) if isinstance(exc, RowError) else f"{type(exc).__name__}: {exc}"
                figures = {"status": "failed", "message": message, "details": getattr(exc, "details", {})}
                progress(f"{shape} {row}: FAILED: {message[-3000:]}")
            free_device_memory(settings.device)  # after the except block, which holds the failed row's frames
            entry["rows"][row] = figures
            if figures["status"] in ("ok", "truncated"):
                progress(f"{shape} {row}: {figures['output_tokens_per_s']:.0f} output tokens/s, TTFT p50 "
                         f"{_num(figures['ttft_p50_ms'], '.0f')} ms, p95 {_num(figures['ttft_p95_ms'], '.0f')} ms, "
                         f"{figures['completed']}/{figures['num_requests']} done in {figures['duration_s']:.1f} s "
                         f"(row {figures['row_wall_s']:.0f} s), status {figures['status']}")
            result["elapsed_s"] = elapsed_s()
            write_json(args.out, result)
    result["complete"] = True
    result["elapsed_s"] = elapsed_s()
    write_json(args.out, result)
    write_chart(args.out, figure(result))
    print(format_markdown(result))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
