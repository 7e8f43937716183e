"""Tensor-parallel scaling of the engine on one host: dummy bf16 weights at real shapes.

    python -m bench.tp_scaling --out results/tp_scaling.json --shapes llama-3.1-8b --tp 1 2 4

For each shape and each group size that fits the GPUs (weights under 85% of one
card's memory per rank), one process per rank (NCCL) runs the engine of
``bench.gpu_engine`` on its share of the model: every rank runs a scheduler of
its own over the same requests, so the ranks stay in step as in the service,
where one scheduler sends every rank the same plan. Rank 0 times:

1. **batch-1 decode** with CUDA graphs: median step latency (a 512-token prompt,
   256 output tokens), as in ``bench.gpu_engine``;
2. **rag throughput**: the ``rag`` workload, all requests queued at once,
   continuous batching, CUDA graphs for decode steps;
3. **all-reduce time per step**: a decode step runs two all-reduces of its
   (tokens, hidden) activations per layer. That many all-reduces, at 1, 64 and
   256 tokens, are captured in one CUDA graph as in a decode step's graph, and
   its replay is timed (CUDA events, median of 20); also one eager all-reduce
   (launch included) for comparison.

Scaling efficiency is throughput (or 1 / latency) at TP = n over n times that
of the smallest TP that fits. The JSON at ``--out`` is rewritten after every
configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from bench.harness import plots
from bench.harness.cli import add_out, cuda_available, elapsed_s, new_parser, progress
from bench.harness.engine import (
    MAX_MODEL_LEN,
    WARMUP_MAX_SEQS,
    batch1_decode,
    run_workload,
    summarise,
    warmup_requests,
)
from bench.harness.metadata import command_line, utc_timestamp
from bench.harness.model_costs import ShapeCosts
from bench.harness.readiness import free_port
from bench.harness.results import write_chart, write_json
from bench.harness.rooflines import copy_bandwidth, median_seconds
from bench.workloads import rag_workload, token_requests
from loomserve.local_engine import LocalEngine
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.worker.parallel import TensorParallel, init_tensor_parallel

ALL_REDUCE_TOKENS = (1, 64, 256)
FIT_FRACTION = 0.85


def all_reduce_ms(tp: TensorParallel, hidden: int, tokens: int, count: int, device: torch.device) -> dict[str, float]:
    """(one eager all-reduce, ``count`` all-reduces replayed from one CUDA graph), in ms."""
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=device)
    for _ in range(5):
        tp.all_reduce(x)
    eager = median_seconds(lambda: tp.all_reduce(x), device, 50, warmup=0) * 1000.0
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        tp.all_reduce(x)  # warm-up on the capture stream
    torch.cuda.current_stream(device).wait_stream(stream)
    with torch.cuda.graph(graph):
        for _ in range(count):
            tp.all_reduce(x)
    graph.replay()
    per_step = median_seconds(graph.replay, device, 20, warmup=0) * 1000.0
    return {"one_eager_ms": eager, "per_step_ms": per_step, "per_all_reduce_in_graph_ms": per_step / count}


def _rank_main(rank: int, size: int, address: str, shape: str, num_requests: int, max_output_len: int,
               copy_bw: float, out: str) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(name)s %(message)s")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    tp = init_tensor_parallel(rank, size, address, device)
    begin = time.monotonic()
    worker = WorkerConfig(model=shape, load_format="dummy", device=str(device), max_model_len=MAX_MODEL_LEN, tp=size)
    engine = LocalEngine(SchedulerConfig(), worker, shape, tp=tp)
    runner = engine.runner
    startup_s = time.monotonic() - begin
    if rank == 0:
        progress(f"{shape} TP={size}: ready in {startup_s:.1f} s, {runner.num_blocks} KV blocks")
    run_workload(engine, warmup_requests(), SchedulerConfig(max_num_seqs=WARMUP_MAX_SEQS), True)
    batch1 = batch1_decode(engine, True, copy_bw)
    if size > 1:  # batch1_decode's roofline counts one rank's weights against the whole KV cache
        for key in ("bytes_per_step", "roofline_tokens_per_s", "fraction_of_roofline"):
            batch1.pop(key)
    if rank == 0:
        progress(f"{shape} TP={size}: batch-1 decode {batch1['median_step_ms']:.2f} ms a step "
                 f"({batch1['tokens_per_s']:.1f} tokens/s)")
    requests, _ = token_requests(rag_workload(num_requests, seed=0, max_model_len=MAX_MODEL_LEN), max_output_len)
    config = SchedulerConfig(max_num_seqs=max(1, num_requests // 4))
    rag = summarise(run_workload(engine, requests, config, True))
    if rank == 0:
        progress(f"{shape} TP={size}: rag {rag['output_tokens_per_s']:.0f} output tokens/s, "
                 f"TTFT p50 {rag['ttft_p50_s']:.2f} s, p95 {rag['ttft_p95_s']:.2f} s")
    model_config = runner.model_config
    reduce = {}
    for tokens in ALL_REDUCE_TOKENS:
        if size > 1:
            reduce[str(tokens)] = all_reduce_ms(tp, model_config.hidden_size, tokens, 2 * model_config.num_layers,
                                                device)
        else:
            reduce[str(tokens)] = {"one_eager_ms": 0.0, "per_step_ms": 0.0, "per_all_reduce_in_graph_ms": 0.0}
    if rank == 0:
        Path(out).write_text(json.dumps({
            "shape": shape,
            "tp": size,
            "startup_s": startup_s,
            "num_kv_blocks": runner.num_blocks,
            "batch1_decode": batch1,
            "rag": {"num_requests": num_requests, "max_num_seqs": config.max_num_seqs,
                    "max_output_len": max_output_len, **rag},
            "all_reduce": reduce,
        }))


def _efficiency(rows: list[dict[str, Any]]) -> None:
    """Scaling efficiency of each row against the smallest TP of its shape."""
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_shape.setdefault(row["shape"], []).append(row)
    for group in by_shape.values():
        base = min(group, key=lambda r: r["tp"])
        for row in group:
            n = row["tp"] / base["tp"]
            row["throughput_scaling"] = row["rag"]["output_tokens_per_s"] / base["rag"]["output_tokens_per_s"]
            row["throughput_efficiency"] = row["throughput_scaling"] / n
            row["latency_speedup"] = base["batch1_decode"]["median_step_ms"] / row["batch1_decode"]["median_step_ms"]
            row["latency_efficiency"] = row["latency_speedup"] / n


def figure(result: dict[str, Any]) -> plots.Chart | None:
    """Per shape, rag throughput and the batch-1 step against the group size; None without rows."""
    shapes = dict.fromkeys(row["shape"] for row in result["rows"])

    def per_shape(value: Callable[[dict[str, Any]], float]) -> tuple[plots.Series, ...]:
        return tuple(plots.series(shape, [(r["tp"], value(r)) for r in result["rows"] if r["shape"] == shape])
                     for shape in shapes)

    if not shapes:
        return None
    sizes = tuple(sorted({r["tp"] for r in result["rows"]}))
    return plots.Chart(f"Tensor parallelism, engine alone: {result['device']}, {result['date']}", (
        plots.Panel("rag throughput", "tensor-parallel GPUs", "output tokens/s",
                    per_shape(lambda r: r["rag"]["output_tokens_per_s"]), xticks=sizes),
        plots.Panel("batch-1 decode", "tensor-parallel GPUs", "ms per step",
                    per_shape(lambda r: r["batch1_decode"]["median_step_ms"]), xticks=sizes),
    ))


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'shape':<15}{'TP':>3}{'b1 ms/step':>11}{'b1 tok/s':>9}{'speedup':>8}{'rag tok/s':>10}"
             f"{'scaling':>8}{'eff':>6}{'TTFT p50':>9}{'p95':>7}{'AR ms/step b1':>14}{'b256':>7}"]
    for r in rows:
        ar = r["all_reduce"]
        lines.append(f"{r['shape']:<15}{r['tp']:>3}{r['batch1_decode']['median_step_ms']:>11.2f}"
                     f"{r['batch1_decode']['tokens_per_s']:>9.1f}{r.get('latency_speedup', 1):>8.2f}"
                     f"{r['rag']['output_tokens_per_s']:>10.0f}{r.get('throughput_scaling', 1):>8.2f}"
                     f"{r.get('throughput_efficiency', 1):>6.2f}{r['rag']['ttft_p50_s']:>9.2f}"
                     f"{r['rag']['ttft_p95_s']:>7.2f}{ar['1']['per_step_ms']:>14.2f}{ar['256']['per_step_ms']:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("bench.tp_scaling", __doc__)
    add_out(parser)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.1-8b"], help="dummy model shapes, in order")
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2], help="group sizes, in order")
    parser.add_argument("--num-requests", type=int, default=128, help="rag requests per configuration")
    parser.add_argument("--max-output-len", type=int, default=1024, help="cap on the rag output lengths")
    args = parser.parse_args(argv)
    if not cuda_available("bench.tp_scaling", "CUDA GPUs"):
        return 2
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    card_bytes = torch.cuda.get_device_properties(0).total_memory
    copy_bw = copy_bandwidth(torch.device("cuda", 0))
    progress(f"{gpus} x {name}; copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    result: dict[str, Any] = {
        "device": f"{gpus} x {name}",
        "date": utc_timestamp(),
        "command": command_line("bench.tp_scaling", argv),
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "rows": rows,
        "skipped": skipped,
    }
    rank_out = args.out.with_suffix(".rank0.json")
    for shape in args.shapes:
        for size in args.tp:
            costs = ShapeCosts.of(shape, torch.bfloat16)
            per_rank = costs.params * costs.bytes_per_param / size
            if size > gpus or per_rank > FIT_FRACTION * card_bytes:
                why = (f"{shape} TP={size}: {per_rank / 2**30:.0f} GiB of weights per rank on "
                       f"{card_bytes / 2**30:.0f} GiB cards, {gpus} GPUs")
                skipped.append(why)
                progress(f"skipped {why}")
                continue
            progress(f"{shape} TP={size}: starting {size} rank(s)")
            mp.start_processes(_rank_main, nprocs=size, start_method="spawn",
                               args=(size, f"127.0.0.1:{free_port()}", shape, args.num_requests,
                                     args.max_output_len, copy_bw, str(rank_out)))
            rows.append(json.loads(rank_out.read_text()))
            _efficiency(rows)
            result["elapsed_s"] = elapsed_s()
            write_json(args.out, result)
    rank_out.unlink(missing_ok=True)
    write_chart(args.out, figure(result))
    print(format_table(rows))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
