"""Batch-1 decode with and without the one-row matmul kernel (``kernels.gemv``), programmatic
dependent launch and the KV write fused into the rotary kernel, side by side.

    python -m bench.batch1_decode --out results/batch1-decode.json

For each shape (default: llama-3.2-1b, then llama-3.1-8b): one engine (dummy weights, bf16,
Triton kernels, CUDA graphs) runs the batch-1 decode of ``bench.gpu_engine`` (a 512-token
prompt, 256 tokens generated: the median step time, scheduler and host included, against the
bandwidth roofline from the copy bandwidth measured at the start of the same run) in five
variants (``VARIANTS``): the model's projections and LM head computing through ``F.linear``
(cuBLAS) or through ``kernels.gemv.linear``, each with the Triton kernels launched normally or
with programmatic dependent launch (PDL, see ``kernels/__init__.py``), and the last with the
rotary kernel also writing the KV cache (the default) instead of ``reshape_and_cache`` after
it. The variants alternate for ``--rounds`` rounds after one untimed run of each. A CUDA graph
replays the kernels it was captured with, so the batch-1 decode graph is captured again at
every switch.

``--gemv-configs 2x2048x4 ...`` adds a default-setup variant per matrix-vector kernel configuration
(output features per program x slice width x warps, for every projection), to tune
``kernels.gemv.default_gemv_config`` on the whole step rather than on one kernel alone.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from bench.harness.cli import add_out, cuda_available, elapsed_s, new_parser, progress
from bench.harness.device_memory import free_device_memory
from bench.harness.engine import BENCH_SHAPES, MAX_MODEL_LEN, batch1_decode
from bench.harness.metadata import command_line, git_state, utc_timestamp
from bench.harness.results import write_json
from bench.harness.rooflines import copy_bandwidth
from loomserve.kernels import set_pdl
from loomserve.kernels.gemv import GemvConfig
from loomserve.kernels.gemv import linear as gemv_linear
from loomserve.local_engine import LocalEngine
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.worker.cuda_graphs import DecodeGraphs
from loomserve.worker.layers.linear import Linear, Matmul, UnquantizedLinearMethod
from loomserve.worker.layers.rotary import TritonRotary


class Variant(NamedTuple):
    matmul: Matmul  # the projections' product
    pdl: bool  # programmatic dependent launch allowed
    fused_kv_write: bool  # the rotary kernel writes the KV cache (else reshape_and_cache does)


# The first is the baseline: the decode step before any of these changes.
VARIANTS: dict[str, Variant] = {
    "cublas": Variant(F.linear, False, False),
    "cublas+pdl": Variant(F.linear, True, False),
    "gemv": Variant(gemv_linear, False, False),
    "gemv+pdl": Variant(gemv_linear, True, False),
    "gemv+pdl+fused-kv": Variant(gemv_linear, True, True),
}


def parse_gemv_config(text: str) -> GemvConfig:
    """``"2x2048x4"`` -> GemvConfig(2, 2048, 4)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BLOCK_NxBLOCK_KxWARPS, e.g. 2x2048x4, got {text!r}")
    return GemvConfig(*(int(p) for p in parts))


def variants(gemv_configs: list[GemvConfig]) -> dict[str, Variant]:
    """The fixed variants, then gemv+pdl+fused-kv with each of ``gemv_configs``."""
    extra = {
        f"gemv {c.block_n}x{c.block_k}x{c.num_warps}": Variant(functools.partial(gemv_linear, config=c), True, True)
        for c in gemv_configs
    }
    return {**VARIANTS, **extra}


def use_variant(engine: LocalEngine, variant: Variant) -> None:
    """Set the engine's model up as ``variant`` says and capture the batch-1 decode graph
    again."""
    set_pdl(variant.pdl)
    runner = engine.runner
    for module in runner.model.modules():
        if isinstance(module, Linear):
            module.method = UnquantizedLinearMethod(variant.matmul)
        elif isinstance(module, TritonRotary):
            module.writes_kv_cache = variant.fused_kv_write
    old = runner.graphs
    if old is None:
        raise RuntimeError("the engine runs without CUDA graphs")
    max_seq_len = old.max_seq_len
    runner.graphs = None
    del old
    free_device_memory("cuda")
    graphs = DecodeGraphs(
        runner.model, runner.kv_caches, max_seq_len=max_seq_len, block_size=runner.block_size, buckets=(1,)
    )
    graphs.capture()
    runner.graphs = graphs


def bench_shape(shape: str, rounds: int, copy_bw: float, gemv_configs: list[GemvConfig]) -> dict[str, object]:
    progress(f"{shape}: loading dummy weights, capturing CUDA graphs")
    worker_config = WorkerConfig(model=shape, load_format="dummy", device="cuda", max_model_len=MAX_MODEL_LEN)
    engine = LocalEngine(SchedulerConfig(), worker_config, shape)
    chosen = variants(gemv_configs)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for round_ in range(rounds + 1):
        for name, variant in chosen.items():
            use_variant(engine, variant)
            result = batch1_decode(engine, True, copy_bw)
            if round_ == 0:
                continue  # builds the kernels' variants and warms the clocks
            runs[name].append(result)
            progress(f"{shape}: round {round_}, {name}: {result['tokens_per_s']:.1f} tokens/s "
                     f"({100 * result['fraction_of_roofline']:.1f}% of the roofline)")
    summary: dict[str, object] = {"shape": shape, "runs": runs}
    for name, results in runs.items():
        step_ms = statistics.median(r["median_step_ms"] for r in results)
        summary[name] = {
            "median_step_ms": step_ms,
            "tokens_per_s": 1000.0 / step_ms,
            "fraction_of_roofline": statistics.median(r["fraction_of_roofline"] for r in results),
            "roofline_tokens_per_s": results[0]["roofline_tokens_per_s"],
        }
    del engine
    free_device_memory("cuda")
    return summary


def format_table(shapes: list[dict[str, object]]) -> str:
    lines = [f"{'shape':<14} {'variant':<18} {'step ms':>8} {'tok/s':>8} {'% of BW roofline':>17} {'speedup':>8}"]
    for shape in shapes:
        runs = shape["runs"]
        assert isinstance(runs, dict)
        base = shape[next(iter(runs))]
        assert isinstance(base, dict)
        for name in runs:
            row = shape[name]
            assert isinstance(row, dict)
            lines.append(f"{shape['shape']!s:<14} {name:<18} {row['median_step_ms']:>8.3f} {row['tokens_per_s']:>8.1f} "
                         f"{100 * row['fraction_of_roofline']:>16.1f}% "
                         f"{base['median_step_ms'] / row['median_step_ms']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("bench.batch1_decode", __doc__)
    add_out(parser)
    parser.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES), help="dummy model shapes, in order")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant, alternated")
    parser.add_argument("--gemv-configs", nargs="+", type=parse_gemv_config, default=[], metavar="NxKxW",
                        help="also run the default setup with these gemv configurations")
    args = parser.parse_args(argv)
    if not cuda_available("bench.batch1_decode"):
        return 2
    device = torch.device("cuda")
    copy_bw = copy_bandwidth(device)
    progress(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + written)")
    try:
        shapes = [bench_shape(shape, args.rounds, copy_bw, args.gemv_configs) for shape in args.shapes]
    finally:
        set_pdl(True)
    result = {
        "device": torch.cuda.get_device_name(device),
        "date": utc_timestamp(),
        "command": command_line("bench.batch1_decode", argv),
        "git": git_state(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "elapsed_s": elapsed_s(),
        "shapes": shapes,
    }
    write_json(args.out, result)
    print(format_table(shapes))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
