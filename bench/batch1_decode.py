"""Batch-1 decode with and without the one-row matmul kernel (``kernels.gemv``) and programmatic
dependent launch, side by side.

    python -m bench.batch1_decode --out results/batch1-decode.json

For each shape (default: llama-3.2-1b, then llama-3.1-8b): one engine (dummy weights, bf16,
Triton kernels, CUDA graphs) runs the batch-1 decode of ``bench.gpu_engine`` (a 512-token
prompt, 256 tokens generated: the median step time, scheduler and host included, against the
bandwidth roofline from the copy bandwidth measured at the start of the same run) in four
variants: the model's projections and LM head computing through ``F.linear`` (cuBLAS) or
through ``kernels.gemv.linear``, each with the Triton kernels launched normally or with
programmatic dependent launch (PDL, see ``kernels/__init__.py``). The variants alternate for
``--rounds`` rounds after one untimed run of each. A CUDA graph replays the kernels it was
captured with, so the batch-1 decode graph is captured again at every switch.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from bench import gpu_engine
from bench.serving import _git_state
from kernels import set_pdl
from kernels.gemv import linear as gemv_linear
from shared.config import SchedulerConfig, WorkerConfig
from worker.cuda_graphs import DecodeGraphs
from worker.local_engine import LocalEngine
from worker.parallel import Linear, Matmul

SHAPES = ("llama-3.2-1b", "llama-3.1-8b")
# name: (the projections' product, PDL on); the first is the baseline.
VARIANTS: dict[str, tuple[Matmul, bool]] = {
    "cublas": (F.linear, False),
    "cublas+pdl": (F.linear, True),
    "gemv": (gemv_linear, False),
    "gemv+pdl": (gemv_linear, True),
}


def use_variant(engine: LocalEngine, matmul: Matmul, pdl: bool) -> None:
    """Point every projection of the engine's model at ``matmul``, allow PDL or not, and
    capture the batch-1 decode graph again."""
    set_pdl(pdl)
    runner = engine.runner
    for module in runner.model.modules():
        if isinstance(module, Linear):
            module.matmul = matmul
    old = runner.graphs
    if old is None:
        raise RuntimeError("the engine runs without CUDA graphs")
    max_seq_len = old.max_seq_len
    runner.graphs = None
    del old
    gc.collect()
    torch.cuda.empty_cache()
    graphs = DecodeGraphs(
        runner.model, runner.kv_caches, max_seq_len=max_seq_len, block_size=runner.block_size, buckets=(1,)
    )
    graphs.capture()
    runner.graphs = graphs


def bench_shape(shape: str, rounds: int, copy_bw: float) -> dict[str, object]:
    gpu_engine.progress(f"{shape}: loading dummy weights, capturing CUDA graphs")
    worker_config = WorkerConfig(
        model=shape, load_format="dummy", device="cuda", max_model_len=gpu_engine.MAX_MODEL_LEN
    )
    engine = LocalEngine(SchedulerConfig(), worker_config, shape)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for round_ in range(rounds + 1):
        for name, (matmul, pdl) in VARIANTS.items():
            use_variant(engine, matmul, pdl)
            result = gpu_engine.batch1_decode(engine, True, copy_bw)
            if round_ == 0:
                continue  # builds the kernels' variants and warms the clocks
            runs[name].append(result)
            gpu_engine.progress(f"{shape}: round {round_}, {name}: {result['tokens_per_s']:.1f} tokens/s "
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
    gc.collect()
    torch.cuda.empty_cache()
    return summary


def format_table(shapes: list[dict[str, object]]) -> str:
    lines = [f"{'shape':<14} {'variant':<11} {'step ms':>8} {'tok/s':>8} {'% of BW roofline':>17} {'speedup':>8}"]
    for shape in shapes:
        base = shape[next(iter(VARIANTS))]
        assert isinstance(base, dict)
        for name in VARIANTS:
            row = shape[name]
            assert isinstance(row, dict)
            lines.append(f"{shape['shape']!s:<14} {name:<11} {row['median_step_ms']:>8.3f} {row['tokens_per_s']:>8.1f} "
                         f"{100 * row['fraction_of_roofline']:>16.1f}% "
                         f"{base['median_step_ms'] / row['median_step_ms']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="dummy model shapes, in order")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant, alternated")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.batch1_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    copy_bw = gpu_engine.copy_bandwidth(device)
    gpu_engine.progress(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + written)")
    try:
        shapes = [bench_shape(shape, args.rounds, copy_bw) for shape in args.shapes]
    finally:
        set_pdl(True)
    result = {
        "device": torch.cuda.get_device_name(device),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.batch1_decode", *(argv if argv is not None else sys.argv[1:])]),
        "git": _git_state(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "elapsed_s": time.monotonic() - gpu_engine._started,
        "shapes": shapes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(format_table(shapes))
    gpu_engine.progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
