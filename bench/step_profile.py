"""Where one step's GPU time goes: single model steps at a real shape (dummy weights), timed as
the service runs them and profiled kernel by kernel.

    python -m bench.step_profile --out results/step-profile.json
    python -m bench.step_profile --smoke --out /tmp/step-profile.json    # tiny shape, CPU

Cases, per shape (``CASES``): decode at batch 1 and at 256 sequences, a mixed step that fills the
scheduler's default 2,048-token budget, a prefill-only step, and a mixed step of 8,192 tokens
(above the largest CUDA graph, so eager).

Per case:

* **served**: the step as the model runner serves it (decode graph, mixed-step graph or eager),
  from its host inputs to the greedy tokens of its sampled rows on the host, median of
  ``--repeats`` (wall time, after a synchronisation);
* **kernels**: torch.profiler over one eager run of the same step (the graphs replay the same
  kernels), GPU time summed by family (``FAMILIES``); ``served`` minus their sum is what the
  host and the gaps between kernels cost;
* each big family against its own roofline, both measured at the start of the same run:
  matmuls against the bf16 matmul peak (2 x tokens x linear weights, plus the LM head for the
  sampled rows), prefill attention against the same peak (4 x heads x head_dim per causal
  (query, key) pair), decode attention against the copy bandwidth (the K and V bytes it reads,
  over the bytes a copy moves per second, read plus written: both are DRAM traffic).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.harness.cli import add_out, new_parser, setup_logging
from bench.harness.device_memory import free_device_memory
from bench.harness.engine import BENCH_SHAPES, MAX_MODEL_LEN, SMOKE_SHAPE
from bench.harness.metadata import command_line, git_state, utc_timestamp
from bench.harness.model_costs import ShapeCosts
from bench.harness.results import write_json
from bench.harness.rooflines import copy_bandwidth, matmul_peak_flops
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.cuda_graphs import pad_decode_batch
from loomserve.worker.device import DeviceInfo
from loomserve.worker.model_runner import ModelRunner


@dataclass(frozen=True)
class Case:
    name: str
    decodes: int  # sequences with one new token, first
    decode_context: int  # their context length after the step
    prompts: tuple[tuple[int, int], ...]  # (new tokens, cached prefix) of the other sequences

    def scaled(self, factor: int) -> Case:
        """The case shrunk by ``factor`` (the smoke run's tiny shape)."""
        return Case(self.name, max(1, self.decodes // factor) if self.decodes else 0,
                    max(2, self.decode_context // factor),
                    tuple((max(2, n // factor), p // factor) for n, p in self.prompts))


CASES = (
    Case("decode, batch 1", 1, 512, ()),
    Case("decode, 256 sequences", 256, 800, ()),
    # 240 running requests and one prompt chunk: the 2,048-token budget of a busy step.
    Case("mixed, 2,048 tokens", 240, 800, ((1808, 0),)),
    Case("prefill, 4 x 512", 0, 0, ((512, 0),) * 4),
    Case("mixed, 8,192 tokens (eager)", 240, 800, ((2000, 0), (2000, 0), (2000, 0), (1952, 0))),
)

# Kernel families by a substring of the kernel's name, first match wins.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prefill attention", ("paged_prefill",)),
    ("decode attention", ("decode_split", "decode_combine")),
    ("KV cache write", ("reshape_and_cache",)),
    ("RMSNorm", ("rms_norm",)),
    ("rotary", ("rotary",)),
    ("SiLU-and-mul", ("silu",)),
    ("all-reduce", ("nccl",)),
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "splitk", "Kernel2")),
)
OTHER = "other"


def family_of(kernel: str) -> str:
    low = kernel.lower()
    for family, needles in FAMILIES:
        if any(n.lower() in low for n in needles):
            return family
    return OTHER


@dataclass
class StepArrays:
    """One step's flattened batch in host memory, as ``ModelRunner.host_batch`` lays it out."""

    token_data: np.ndarray  # (3, T) int64
    query_start_loc: np.ndarray  # (B + 1,) int32
    seq_lens: np.ndarray  # (B,) int32
    block_tables: np.ndarray  # (B, width) int32
    sample_rows: np.ndarray  # (S,) int64: each sequence's last row

    @property
    def num_tokens(self) -> int:
        return int(self.token_data.shape[1])


def build_step(case: Case, *, block_size: int, num_blocks: int, vocab: int, seed: int = 0) -> StepArrays:
    """The case's batch over distinct cache blocks; every sequence's last row is sampled."""
    rng = np.random.default_rng(seed)
    lens = [(1, case.decode_context - 1)] * case.decodes + list(case.prompts)  # (new, prefix)
    seq_lens = np.array([n + p for n, p in lens], dtype=np.int32)
    widths = -(-seq_lens // block_size)
    if int(widths.sum()) > num_blocks:
        raise ValueError(f"{case.name}: {int(widths.sum())} blocks needed, the cache has {num_blocks}")
    tables = np.zeros((len(lens), int(widths.max())), dtype=np.int32)
    rows = []
    first = 0
    for i, (n, p) in enumerate(lens):
        tables[i, : widths[i]] = np.arange(first, first + widths[i])
        first += int(widths[i])
        pos = np.arange(p, p + n)
        slots = tables[i, pos // block_size].astype(np.int64) * block_size + pos % block_size
        rows.append(np.stack([rng.integers(0, vocab, n), pos, slots]))
    starts = np.concatenate(([0], np.cumsum([n for n, _ in lens]))).astype(np.int32)
    return StepArrays(np.concatenate(rows, axis=1).astype(np.int64), starts, seq_lens, tables,
                      (starts[1:] - 1).astype(np.int64))


def step_work(case: Case, costs: ShapeCosts, num_tokens: int, num_sampled: int) -> dict[str, float]:
    """Matmul FLOPs, prefill-attention FLOPs and decode-attention bytes of one step."""
    c = costs.config
    matmul = 2.0 * num_tokens * c.num_layers * costs.layer_linear_params + 2.0 * num_sampled * costs.embedding_params
    pairs = sum(n * p + n * (n + 1) / 2 for n, p in case.prompts)  # causal (query, key) pairs
    kv_bytes = case.decodes * case.decode_context * 2 * c.kv_size * costs.bytes_per_param
    return {
        "matmul_flops": matmul,
        "prefill_attention_flops": 4.0 * c.num_layers * c.q_size * pairs,
        "decode_attention_bytes": float(c.num_layers * kv_bytes),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRunner:
    """Runs one step's arrays the way ``ModelRunner._forward`` would, or eagerly."""

    def __init__(self, runner: ModelRunner, step: StepArrays) -> None:
        self.runner = runner
        self.step = step
        self.device = runner.device
        self.pin = runner.device.type == "cuda"

    def how(self) -> str:
        r, s = self.runner, self.step
        decode_only = s.num_tokens == len(s.seq_lens)
        if r.graphs is not None and decode_only and r.graphs.bucket_for(s.num_tokens) is not None:
            return "decode graph"
        if r.mixed_graphs is not None and r.mixed_graphs.bucket_for(s.num_tokens, len(s.seq_lens)) is not None:
            return "mixed graph"
        return "eager"

    def eager_hidden(self) -> torch.Tensor:
        s, dev = self.step, self.device
        data = torch.from_numpy(s.token_data).to(dev)
        meta = AttentionMetadata(
            query_start_loc=torch.from_numpy(s.query_start_loc).to(dev),
            seq_lens=torch.from_numpy(s.seq_lens).to(dev),
            block_tables=torch.from_numpy(s.block_tables).to(dev),
            slot_mapping=data[2],
            max_query_len=int(np.diff(s.query_start_loc).max()),
            max_seq_len=int(s.seq_lens.max()),
            query_start_loc_cpu=s.query_start_loc.tolist(),
            seq_lens_cpu=s.seq_lens.tolist(),
        )
        hidden = self.runner.model(data[0], data[1], self.runner.kv_caches, meta)
        return hidden[torch.from_numpy(s.sample_rows).to(dev)]

    def served_hidden(self) -> torch.Tensor:
        r, s, how = self.runner, self.step, self.how()
        if how == "decode graph":
            assert r.graphs is not None
            bucket = r.graphs.bucket_for(s.num_tokens)
            assert bucket is not None
            padded = pad_decode_batch(s.token_data[0], s.token_data[1], s.token_data[2], s.seq_lens,
                                      s.block_tables, bucket, pin=self.pin)
            return r.graphs.replay(padded)[: s.num_tokens]
        if how == "mixed graph":
            assert r.mixed_graphs is not None
            bucket = r.mixed_graphs.bucket_for(s.num_tokens, len(s.seq_lens))
            assert bucket is not None
            step = r.mixed_graphs.pad(s.token_data, s.query_start_loc, s.seq_lens, s.block_tables, bucket,
                                      pin=self.pin)
            rows = torch.from_numpy(s.sample_rows)
            return r.mixed_graphs.replay(step)[(rows.pin_memory() if self.pin else rows).to(self.device,
                                                                                              non_blocking=True)]
        return self.eager_hidden()

    def tokens(self, hidden: torch.Tensor) -> list[int]:
        return self.runner.model.compute_logits(hidden).argmax(dim=-1).tolist()  # one sync, as served


def median_wall_s(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def kernel_times_us(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """GPU time (µs) per kernel name of one call of ``fn``; empty without CUDA."""
    if device.type != "cuda":
        return {}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        _sync(device)
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            times[event.key] = times.get(event.key, 0.0) + event.device_time_total
    return times


@torch.inference_mode()
def profile_case(runner: ModelRunner, costs: ShapeCosts, case: Case, peak_flops: float, copy_bw: float,
                 repeats: int) -> dict[str, Any]:
    step = build_step(case, block_size=runner.block_size, num_blocks=runner.num_blocks,
                      vocab=runner.model_config.vocab_size)
    sr = StepRunner(runner, step)
    for _ in range(2):  # builds any kernel variant this shape needs
        sr.tokens(sr.served_hidden())
        sr.tokens(sr.eager_hidden())
    served_s = median_wall_s(lambda: sr.tokens(sr.served_hidden()), runner.device, repeats)
    eager_s = median_wall_s(lambda: sr.tokens(sr.eager_hidden()), runner.device, repeats)
    kernels = kernel_times_us(lambda: sr.tokens(sr.eager_hidden()), runner.device)
    families: dict[str, float] = {}
    for name, us in kernels.items():
        families[family_of(name)] = families.get(family_of(name), 0.0) + us / 1000.0
    work = step_work(case, costs, step.num_tokens, len(step.sample_rows))
    result: dict[str, Any] = {
        "case": case.name,
        "num_tokens": step.num_tokens,
        "num_seqs": len(step.seq_lens),
        "served_as": sr.how(),
        "served_ms": served_s * 1000.0,
        "eager_ms": eager_s * 1000.0,
        "kernel_ms": sum(families.values()),
        "families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "top_kernels_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12]),
        **work,
    }
    # Each big family against its own roofline (None where the step has none of it).
    for key, family, amount, ceiling in (
        ("matmul_roofline_fraction", "matmul", work["matmul_flops"], peak_flops),
        ("prefill_attention_roofline_fraction", "prefill attention", work["prefill_attention_flops"], peak_flops),
        ("decode_attention_roofline_fraction", "decode attention", work["decode_attention_bytes"], copy_bw),
    ):
        ms = families.get(family)
        result[key] = amount / (ms / 1000.0) / ceiling if ms and amount else None
    return result


def format_markdown(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}; matmul peak {result['matmul_peak_flops'] / 1e12:.1f} TFLOP/s, "
             f"copy {result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (read + written); {result['date']}"]

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value * 100:.0f}%"

    for shape in result["shapes"]:
        lines += ["", f"### {shape['shape']}", "",
                  "| case | tokens | served as | served (ms) | eager (ms) | kernels (ms) | matmul ms (% peak) | "
                  "prefill attn ms (% peak) | decode attn ms (% BW) | norm+rotary+act+KV write ms | other ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in shape["cases"]:
            f = c["families_ms"]
            small = sum(f.get(k, 0.0) for k in ("RMSNorm", "rotary", "SiLU-and-mul", "KV cache write"))
            rest = f.get(OTHER, 0.0) + f.get("all-reduce", 0.0)
            lines.append(
                f"| {c['case']} | {c['num_tokens']} | {c['served_as']} | {c['served_ms']:.2f} | {c['eager_ms']:.2f} | "
                f"{c['kernel_ms']:.2f} | {f.get('matmul', 0.0):.2f} ({pct(c['matmul_roofline_fraction'])}) | "
                f"{f.get('prefill attention', 0.0):.2f} ({pct(c['prefill_attention_roofline_fraction'])}) | "
                f"{f.get('decode attention', 0.0):.2f} ({pct(c['decode_attention_roofline_fraction'])}) | "
                f"{small:.2f} | {rest:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("bench.step_profile", __doc__)
    add_out(parser, help=None)
    parser.add_argument("--shapes", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_SHAPE} on the CPU: proves the code paths")
    args = parser.parse_args(argv)
    setup_logging("%(asctime)s %(name)s %(levelname)s: %(message)s")
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    if device.type == "cuda":
        peak, copy_bw = matmul_peak_flops("cuda", dtype, 8192), copy_bandwidth(device)
    else:
        peak, copy_bw = 1e12, 1e10  # nominal: the smoke run measures nothing
    result: dict[str, Any] = {
        "command": command_line("bench.step_profile", argv),
        "date": utc_timestamp(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "git": git_state(),
        "torch": torch.__version__,
        "matmul_peak_flops": peak,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "shapes": [],
    }
    for shape in args.shapes or ((SMOKE_SHAPE,) if smoke else BENCH_SHAPES):
        config = WorkerConfig(model=shape, load_format="dummy", device=device.type, max_model_len=MAX_MODEL_LEN,
                              kv_cache_gb=0.25)
        runner = ModelRunner(config, shape, DeviceInfo.resolve(config), SchedulerConfig().step_limits())
        costs = ShapeCosts.of(shape, dtype)
        cases = [c.scaled(16) for c in CASES] if smoke else list(CASES)
        entry: dict[str, Any] = {"shape": shape, "cases": []}
        result["shapes"].append(entry)
        for case in cases:
            entry["cases"].append(profile_case(runner, costs, case, peak, copy_bw, 3 if smoke else args.repeats))
            c = entry["cases"][-1]
            print(f"{shape} {case.name}: served {c['served_ms']:.2f} ms ({c['served_as']}), "
                  f"kernels {c['kernel_ms']:.2f} ms", flush=True)
        del runner
        free_device_memory(device.type)
    write_json(args.out, result)
    print(format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
