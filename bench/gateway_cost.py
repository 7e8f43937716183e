"""What the gateway and scheduler add to every stream, with the model taken out.

Three processes as in production (``loomserve gateway``, ``loomserve scheduler``) but
with the echo worker (``bench/echo_worker.py``) in place of the model worker: it answers
each plan at once, so what a client measures is the cost of the HTTP/SSE layer, the
detokenizer, the ZeroMQ hops and the scheduler. ``bench.serving.run_benchmark`` drives
streamed completions (token-id prompts, ``ignore_eos``, one content chunk per token) at
each concurrency in turn; the scheduler admits that many sequences at once.

| figure             | meaning                                                                      |
|--------------------|------------------------------------------------------------------------------|
| tokens/s           | streamed output tokens per second of the run (bench.serving's output_throughput) |
| TTFT, ITL, E2EL    | bench.serving's definitions, in ms: here the overhead of everything but a model |
| CPU µs/token       | CPU time of each process over the run (all threads) per streamed token;      |
|                    | "client" is this process, the load generator, which shares the machine       |

On a machine with fewer cores than busy processes (four here: client, gateway,
scheduler, echo worker) the wall-clock figures include waiting for a core; the CPU
columns say who used it.

    python -m bench.gateway_cost --concurrency 1 64 512 --output-json results/gateway-cost.json

``--profile-dir DIR`` runs the gateway and the scheduler under cProfile and prints
where their time went per streamed token (profiling slows both: time it separately).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.echo_worker import BLOCK_SIZE
from bench.harness import plots
from bench.harness.cli import add_output_json, new_parser, setup_logging
from bench.harness.metadata import command_line, run_metadata
from bench.harness.processes import ProcessGroup
from bench.harness.profiles import format_top, profile_file_summary
from bench.harness.readiness import free_port
from bench.harness.results import write_chart, write_json
from bench.harness.stacks import BackendOptions, start_backend, start_gateway
from bench.serving import BenchConfig, BenchResult, run_benchmark
from bench.workloads import BenchRequest, Workload, random_prompts

logger = logging.getLogger(__name__)

RESULT_SCHEMA = "loomserve.bench.gateway_cost/1"
DEFAULT_CONCURRENCY = (1, 64, 512)
_WARMUP_REQUESTS = 8
_PROCESSES = ("gateway", "scheduler", "echo-worker")


@dataclass(frozen=True)
class GatewayRunOptions:
    prompt_len: int = 64
    output_len: int = 64
    requests_per_stream: int = 4  # each concurrency runs this many requests per stream ...
    min_requests: int = 32  # ... and at least this many
    max_num_batched_tokens: int = 2048
    seed: int = 0

    def num_requests(self, concurrency: int) -> int:
        return max(self.requests_per_stream * concurrency, self.min_requests)


@dataclass
class GatewayCost:
    concurrency: int
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    tokens_per_s: float
    ttft_ms_p50: float | None
    ttft_ms_p99: float | None
    itl_ms_p50: float | None
    itl_ms_p99: float | None
    tpot_ms_p50: float | None
    e2el_ms_p50: float | None
    cpu_us_per_token: dict[str, float | None]  # process name -> CPU µs per streamed token
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    errors: list[str]


def start_stack(group: ProcessGroup, port: int, max_seqs: int, model: str | None,
                options: GatewayRunOptions) -> str:
    """Scheduler, echo worker and gateway; returns the gateway's base URL once /health answers 200."""
    max_len = options.prompt_len + options.output_len
    defaults = BackendOptions()
    backend = BackendOptions(max_num_seqs=max_seqs, max_num_batched_tokens=options.max_num_batched_tokens,
                             num_kv_blocks=max(defaults.num_kv_blocks, 2 * max_seqs * max_len // BLOCK_SIZE),
                             max_model_len=max(defaults.max_model_len, max_len))
    return start_gateway(group, port, start_backend(group, backend), model)


def workload(num_requests: int, options: GatewayRunOptions, seed: int) -> Workload:
    prompts = random_prompts(num_requests, options.prompt_len, seed)
    requests = tuple(BenchRequest(prompt, options.prompt_len, options.output_len) for prompt in prompts)
    params: dict[str, object] = {"seed": seed, "prompt_form": "token_ids",
                                 "prompt_len": options.prompt_len, "output_len": options.output_len}
    return Workload("gateway-cost", requests, params)


def run_at(group: ProcessGroup, base_url: str, concurrency: int, options: GatewayRunOptions,
           command: str) -> tuple[GatewayCost, BenchResult]:
    loadavg_before = os.getloadavg()
    config = BenchConfig(
        workload=workload(options.num_requests(concurrency), options, options.seed + concurrency),
        base_url=base_url,
        concurrency=concurrency,
        temperature=0.0,
        ignore_eos=True,
        label=f"gateway-cost c={concurrency}",
        command=command,
    )
    cpu_before = group.cpu_seconds()
    client_before = time.process_time()
    result = asyncio.run(run_benchmark(config))
    client_cpu = time.process_time() - client_before
    cpu_after = group.cpu_seconds()
    metrics = result.metrics
    tokens = max(1, metrics.total_output_tokens)
    cpu_us: dict[str, float | None] = {"client": client_cpu * 1e6 / tokens}
    for name in _PROCESSES:
        before, after = cpu_before.get(name), cpu_after.get(name)
        cpu_us[name] = None if before is None or after is None else (after - before) * 1e6 / tokens
    ttft, itl, tpot, e2el = metrics.ttft_ms, metrics.itl_ms, metrics.tpot_ms, metrics.e2el_ms
    cost = GatewayCost(
        concurrency=concurrency,
        num_requests=len(config.workload.requests),
        completed=metrics.completed,
        failed=metrics.failed,
        duration_s=metrics.duration_s,
        tokens_per_s=metrics.output_throughput,
        ttft_ms_p50=ttft.median if ttft else None,
        ttft_ms_p99=ttft.p99 if ttft else None,
        itl_ms_p50=itl.median if itl else None,
        itl_ms_p99=itl.p99 if itl else None,
        tpot_ms_p50=tpot.median if tpot else None,
        e2el_ms_p50=e2el.median if e2el else None,
        cpu_us_per_token=cpu_us,
        loadavg_before=loadavg_before,
        loadavg_after=os.getloadavg(),
        errors=metrics.errors,
    )
    return cost, result


def format_table(results: list[GatewayCost]) -> str:
    def num(value: float | None, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    header = (f"{'streams':>7} {'requests':>8} {'failed':>6} | {'tokens/s':>8} | {'TTFT p50':>8} {'p99':>7} | "
              f"{'ITL p50':>7} {'p99':>7} | {'TPOT p50':>8} {'E2EL p50':>8} | "
              f"{'gateway':>7} {'sched':>6} {'worker':>6} {'client':>6} | load")
    lines = [header, "-" * len(header)]
    for r in results:
        cpu = r.cpu_us_per_token
        lines.append(
            f"{r.concurrency:>7} {r.num_requests:>8} {r.failed:>6} | {r.tokens_per_s:>8.0f} | "
            f"{num(r.ttft_ms_p50):>8} {num(r.ttft_ms_p99):>7} | {num(r.itl_ms_p50, 2):>7} {num(r.itl_ms_p99, 2):>7} | "
            f"{num(r.tpot_ms_p50, 2):>8} {num(r.e2el_ms_p50):>8} | "
            f"{num(cpu['gateway'], 0):>7} {num(cpu['scheduler'], 0):>6} {num(cpu['echo-worker'], 0):>6} "
            f"{num(cpu['client'], 0):>6} | {r.loadavg_before[0]:.2f}"
        )
    lines.append("(latencies in ms; gateway/sched/worker/client: CPU µs per streamed token; load: 1-min average)")
    return "\n".join(lines)


def figure(report: dict[str, Any]) -> plots.Chart:
    """Throughput, latency and CPU per token against the number of concurrent streams."""
    rows = report["results"]
    streams = tuple(r["concurrency"] for r in rows)
    logx = plots.wide(streams)

    def curve(label: str, values: list[float | None]) -> plots.Series:
        return plots.series(label, list(zip(streams, values, strict=True)))

    latency = (
        curve("TTFT p50", [r["ttft_ms_p50"] for r in rows]),
        curve("TTFT p99", [r["ttft_ms_p99"] for r in rows]),
        curve("ITL p50", [r["itl_ms_p50"] for r in rows]),
        curve("ITL p99", [r["itl_ms_p99"] for r in rows]),
    )
    return plots.Chart(f"Gateway and scheduler with an echo worker ({report['metadata']['date']})", (
        plots.Panel("streamed tokens", "concurrent streams", "tokens/s",
                    (curve("tokens/s", [r["tokens_per_s"] for r in rows]),), logx=logx, xticks=streams),
        plots.Panel("latency", "concurrent streams", "ms", latency, logx=logx,
                    logy=plots.wide([y for s in latency for y in s.y]), xticks=streams),
        plots.Panel("CPU per streamed token", "concurrent streams", "µs", tuple(
            curve(name, [r["cpu_us_per_token"].get(name) for r in rows])
            for name in ("gateway", "scheduler", "echo-worker", "client")
        ), logx=logx, xticks=streams),
    ))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = new_parser("bench.gateway_cost", "Gateway + scheduler overhead per stream, with an echo worker.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY),
                        help="concurrent streams to measure (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=GatewayRunOptions.prompt_len,
                        help="prompt tokens (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=GatewayRunOptions.output_len,
                        help="output tokens per request (default: %(default)s)")
    parser.add_argument("--requests-per-stream", type=int, default=GatewayRunOptions.requests_per_stream,
                        help="requests per concurrent stream (default: %(default)s)")
    parser.add_argument("--min-requests", type=int, default=GatewayRunOptions.min_requests,
                        help="requests at least, per concurrency (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="the model whose tokenizer the gateway loads (default: the default model)")
    parser.add_argument("--port", type=int, default=None, help="gateway HTTP port (default: a free one)")
    parser.add_argument("--top", type=int, default=20, help="functions listed per profile (default: %(default)s)")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="run gateway and scheduler under cProfile, writing <name>.prof here")
    parser.add_argument("--seed", type=int, default=0)
    add_output_json(parser)
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.prompt_len < 1 or args.output_len < 1:
        parser.error("--concurrency, --prompt-len and --output-len must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging()
    options = GatewayRunOptions(prompt_len=args.prompt_len, output_len=args.output_len,
                                requests_per_stream=args.requests_per_stream, min_requests=args.min_requests,
                                seed=args.seed)
    metadata = {**run_metadata(command_line("bench.gateway_cost", argv)), "cpu_count": os.cpu_count()}
    results: list[GatewayCost] = []
    runs: list[dict[str, Any]] = []
    total_tokens = 0
    with ProcessGroup(args.profile_dir) as group:
        base_url = start_stack(group, args.port or free_port(), max(args.concurrency), args.model, options)
        warmup = GatewayRunOptions(prompt_len=args.prompt_len, output_len=args.output_len,
                                   requests_per_stream=1, min_requests=_WARMUP_REQUESTS, seed=args.seed + 1)
        warmup_cost, warmup_result = run_at(group, base_url, _WARMUP_REQUESTS, warmup, metadata["command"])
        if warmup_cost.failed:
            raise RuntimeError(f"warm-up requests failed: {warmup_cost.errors}")
        total_tokens += warmup_result.metrics.total_output_tokens
        for concurrency in args.concurrency:
            logger.info("%d requests at %d concurrent streams", options.num_requests(concurrency), concurrency)
            cost, result = run_at(group, base_url, concurrency, options, metadata["command"])
            results.append(cost)
            total_tokens += result.metrics.total_output_tokens
            summary = result.to_json()
            runs.append({"config": summary["config"], "workload": summary["workload"], "metrics": summary["metrics"]})
    profiles: dict[str, Any] = {}
    if args.profile_dir is not None:
        for name in ("gateway", "scheduler"):
            profiles[name] = profile_file_summary(args.profile_dir / f"{name}.prof", max(1, total_tokens),
                                                  "streamed token (warm-up and start-up included)", args.top)

    print(format_table(results))
    for name, profile in profiles.items():
        if profile is not None:
            print(f"\n{name} process cProfile ({profile['path']}), by own time:")
            print(format_top(profile["top_tottime"], "streamed token"))
    if args.output_json is not None:
        report = {
            "schema": RESULT_SCHEMA,
            "metadata": metadata,
            "options": asdict(options),
            "results": [asdict(r) for r in results],
            "runs": runs,
            "profiles": profiles or None,
        }
        write_json(args.output_json, report)
        write_chart(args.output_json, figure(report))
        print(f"\nresults written to {args.output_json}")
    return 0 if all(r.completed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
