"""A baseline and a candidate ``loomserve serve``, one after the other, under the same load.

Each run starts a fresh server on a free port (no prefix cache or warm-up carried over),
sends a few warm-up requests from another seed (so that the timed workload's prompts are
not cached by them), replays the workload with ``bench.serving`` and stops the server.
Both runs use ``--response-cache false`` (a repeated prompt would otherwise be served
from the gateway's cache) and the same workload, seed, concurrency and extra server
options. The result file holds both ``bench.serving`` results and a summary.

| comparison       | workload        | baseline                        | candidate   | figures            |
|------------------|-----------------|---------------------------------|-------------|--------------------|
| ``prefix-caching`` | shared-prefix | ``--enable-prefix-caching false`` | ``true``  | TTFT p50 / p95     |
| ``batching``     | rag             | ``--batching static``           | ``continuous`` | throughput, TTFT p95 |

    python -m bench.compare_serving prefix-caching --num-requests 64 --concurrency 8 \\
        --output-json bench/results/cpu-prefix-caching.json
    python -m bench.compare_serving batching --num-requests 32 --concurrency 8 --max-output-len 64 \\
        --output-json bench/results/cpu-batching.json

``--max-output-len`` caps each request's output and ``--max-model-len`` shrinks prompt and
output to fit (see bench/workloads.py); both are recorded in the result, since they change
what is measured. ``--serve-arg`` passes options to both servers (``--serve-arg=--kv-cache-gb=1``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.harness import plots
from bench.harness.cli import add_output_json, new_parser, setup_logging
from bench.harness.metadata import command_line, run_metadata
from bench.harness.processes import ProcessGroup
from bench.harness.readiness import free_port
from bench.harness.results import write_chart, write_json
from bench.harness.stacks import serve_argv, start_serve
from bench.serving import BenchConfig, BenchResult, describe_load, latency_chart, run_benchmark
from bench.workloads import Workload, build_workload, cap_outputs

logger = logging.getLogger(__name__)

RESULT_SCHEMA = "loomserve.bench.compare_serving/1"
_READY_TIMEOUT_S = 300.0
_WARMUP_SEED_OFFSET = 1000  # the warm-up requests' workload seed: other prompts, other prefix


@dataclass(frozen=True)
class Comparison:
    workload: str
    baseline: tuple[str, list[str]]  # label, serve options
    candidate: tuple[str, list[str]]
    serve_args: list[str]  # options of both servers
    headline: list[str]  # the summary's metrics (keys of _figures)


COMPARISONS = {
    "prefix-caching": Comparison(
        workload="shared-prefix",
        baseline=("prefix caching off", ["--enable-prefix-caching", "false"]),
        candidate=("prefix caching on", ["--enable-prefix-caching", "true"]),
        serve_args=[],
        headline=["ttft_p50_ms", "ttft_p95_ms", "output_tok_s"],
    ),
    "batching": Comparison(
        workload="rag",
        baseline=("static batching", ["--batching", "static"]),
        candidate=("continuous batching", ["--batching", "continuous"]),
        serve_args=[],
        headline=["output_tok_s", "request_s", "ttft_p50_ms", "ttft_p95_ms"],
    ),
}


def _figures(result: BenchResult) -> dict[str, float | None]:
    m = result.metrics
    return {
        "ttft_p50_ms": m.ttft_ms.median if m.ttft_ms else None,
        "ttft_p95_ms": m.ttft_ms.p95 if m.ttft_ms else None,
        "tpot_p50_ms": m.tpot_ms.median if m.tpot_ms else None,
        "e2el_p50_ms": m.e2el_ms.median if m.e2el_ms else None,
        "output_tok_s": m.output_throughput,
        "request_s": m.request_throughput,
        "completed": m.completed,
        "failed": m.failed,
    }


def run_one(label: str, serve_args: list[str], workload: Workload, warmup: Workload | None,
            args: argparse.Namespace, command: str) -> tuple[BenchResult, dict[str, Any]]:
    """Start a server with ``serve_args``, warm it up, run the workload, stop it."""
    port = free_port()
    options = ["--response-cache", "false", *serve_args]
    with ProcessGroup() as group:
        base_url = start_serve(group, port, options, _READY_TIMEOUT_S)
        if warmup is not None:
            logger.info("%s: %d warm-up requests", label, len(warmup.requests))
            asyncio.run(run_benchmark(BenchConfig(workload=warmup, base_url=base_url, concurrency=args.concurrency,
                                                  label=f"{label} (warm-up)")))
        logger.info("%s: %d requests of %s", label, len(workload.requests), workload.name)
        loadavg_before = os.getloadavg()
        result = asyncio.run(run_benchmark(BenchConfig(
            workload=workload, base_url=base_url, concurrency=args.concurrency, request_rate=args.request_rate,
            seed=args.seed, request_timeout_s=args.request_timeout, label=label, command=command,
        )))
        group.check_alive()
        run_info = {"label": label, "serve_command": shlex.join(["loomserve", *serve_argv(port, options)[1:]]),
                    "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg()}
    return result, run_info


def figure(report: dict[str, Any]) -> plots.Chart | None:
    """The TTFT and TPOT distributions of baseline and candidate, on the same axes."""
    runs = report["runs"]
    title = (f"{runs['baseline']['label']} vs {runs['candidate']['label']}: "
             f"{describe_load(runs['baseline']['result'])}")
    return latency_chart(title, {run["label"]: run["result"] for run in runs.values()})


def format_summary(name: str, results: dict[str, dict[str, Any]]) -> str:
    base, cand = results["baseline"], results["candidate"]
    lines = [f"{name}: {base['label']} (baseline) vs {cand['label']} (candidate)",
             f"{'':<14}{'baseline':>12}{'candidate':>12}{'ratio':>8}"]
    for key, value in base["figures"].items():
        other = cand["figures"][key]
        ratio = f"{other / value:.2f}" if isinstance(value, float) and value and other is not None else ""
        lines.append(f"{key:<14}{_fmt(value):>12}{_fmt(other):>12}{ratio:>8}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = new_parser("bench.compare_serving", "Baseline and candidate loomserve serve, same workload, one run.")
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    parser.add_argument("--num-requests", type=int, default=32, help="timed requests (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="most requests in flight (default: %(default)s)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrivals per second (default: all queued at once)")
    parser.add_argument("--max-output-len", type=int, default=None, help="cap every request's output tokens")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="shrink prompt and output to fit this many tokens (bench/workloads.py)")
    parser.add_argument("--warmup-requests", type=int, default=2,
                        help="untimed requests first, from another seed (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an option for both servers, e.g. --serve-arg=--max-num-seqs=8 (repeatable)")
    add_output_json(parser, help="write both results and the summary here")
    args = parser.parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1 or args.warmup_requests < 0:
        parser.error("--num-requests and --concurrency must be positive, --warmup-requests not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging()
    comparison = COMPARISONS[args.comparison]
    metadata = {**run_metadata(command_line("bench.compare_serving", argv)), "cpu_count": os.cpu_count()}
    workload = cap_outputs(build_workload(comparison.workload, args.num_requests, args.seed,
                                          max_model_len=args.max_model_len), args.max_output_len)
    warmup = None
    if args.warmup_requests:
        warmup = cap_outputs(build_workload(comparison.workload, args.warmup_requests,
                                            args.seed + _WARMUP_SEED_OFFSET, max_model_len=args.max_model_len),
                             args.max_output_len)
    serve_args = [*comparison.serve_args, *args.serve_arg]
    runs: dict[str, dict[str, Any]] = {}
    for role, (label, options) in (("baseline", comparison.baseline), ("candidate", comparison.candidate)):
        result, info = run_one(label, [*serve_args, *options], workload, warmup, args, metadata["command"])
        print(result.format_table(), end="\n\n")
        runs[role] = {**info, "figures": _figures(result), "result": result.to_json()}
    summary = format_summary(args.comparison, runs)
    print(summary)
    if args.output_json is not None:
        report = {
            "schema": RESULT_SCHEMA,
            "comparison": args.comparison,
            "metadata": metadata,
            "options": {key: (None if isinstance(value, float) and math.isinf(value) else value)
                        for key, value in vars(args).items() if key != "output_json"},
            "headline": comparison.headline,
            "workload": workload.describe(),
            "runs": runs,
        }
        write_json(args.output_json, report)
        write_chart(args.output_json, figure(report))
        print(f"\nresults written to {args.output_json}")
    failed = any(run["figures"]["completed"] == 0 for run in runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
