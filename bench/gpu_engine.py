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

import sys
import time
from pathlib import Path

import torch
import triton

from bench.harness.cli import add_out, cuda_available, elapsed_s, new_parser, progress, setup_logging
from bench.harness.device_memory import free_device_memory
from bench.harness.engine import (
    BENCH_SHAPES,
    MAX_MODEL_LEN,
    WARMUP_MAX_SEQS,
    batch1_decode,
    run_workload,
    summarise,
    warmup_requests,
    weight_bytes_per_step,
)
from bench.harness.metadata import command_line, utc_timestamp
from bench.harness.results import write_json
from bench.harness.rooflines import copy_bandwidth
from bench.workloads import rag_workload, token_requests
from loomserve.local_engine import LocalEngine
from loomserve.shared.config import SchedulerConfig, WorkerConfig

DEFAULT_REQUESTS = {"llama-3.2-1b": 256, "llama-3.1-8b": 128}


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

    warmup = warmup_requests()
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

    # Without a tokenizer the workload's prompts are token ids.
    requests, capped = token_requests(rag_workload(num_requests, seed=0, max_model_len=MAX_MODEL_LEN), max_output_len)
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
    free_device_memory("cuda")
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
    parser = new_parser("bench.gpu_engine", __doc__)
    add_out(parser)
    parser.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES), help="dummy model shapes, in order")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="rag requests per shape (default: 256 for llama-3.2-1b, 128 for llama-3.1-8b)")
    parser.add_argument("--max-output-len", type=int, default=1024, help="cap on the rag output lengths")
    parser.add_argument("--no-eager-rag", action="store_true",
                        help="run the rag workload with CUDA graphs only (batch-1 decode still runs both)")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="write cProfile reports of the batch-1 decode steps here (slows those steps)")
    args = parser.parse_args(argv)
    if not cuda_available("bench.gpu_engine"):
        return 2
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    setup_logging("%(asctime)s %(name)s %(message)s")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    progress(f"device {name}; measuring the copy bandwidth")
    copy_bw = copy_bandwidth(device)
    progress(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + written)")
    shapes: list[dict[str, object]] = []
    result: dict[str, object] = {
        "device": name,
        "date": utc_timestamp(),
        "command": command_line("bench.gpu_engine", argv),
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
        result["elapsed_s"] = elapsed_s()
        write_json(args.out, result)
    print(format_table(shapes, name))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
