"""Tile sizes and context splits of the decode attention kernel, for a bf16 and an FP8 KV cache.

    python -m bench.decode_sweep --out results/decode-sweep.json

Needs a CUDA GPU. For each model shape (``bench.harness.kernel_inputs.SHAPES``), each cache dtype
(bf16, FP8 e4m3) and each case (sequences x context length), every configuration of a small grid
(keys per tile, warps, pipeline stages) is first checked against the fp32 reference (max error
within 1e-2 of the largest reference value) and then timed (median of ``triton.testing.do_bench``);
the launcher's own configuration is then timed again at 2 and 4 times its split count. Each time is
also given as the bandwidth it implies: the bytes of the KV cache the step must read, over the
time, against a device-to-device copy measured in the same run. A configuration that does not
compile or is wrong is recorded as such. ``--configs 64x4x2 128x4x3`` (keys per tile x warps x
stages) times those instead of the whole grid.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

import torch

from bench.harness.cli import add_out, cuda_available, new_parser
from bench.harness.kernel_inputs import BLOCK_SIZE, SHAPES, LayerShape, make_paged_inputs
from bench.harness.kernel_timing import checked_time
from bench.harness.metadata import command_line, utc_timestamp
from bench.harness.results import write_json
from bench.harness.rooflines import copy_bandwidth
from loomserve.kernels import KV_FP8
from loomserve.kernels.paged_decode_attention import (
    MAX_SPLITS,
    DecodeConfig,
    choose_num_splits,
    default_decode_config,
    paged_decode_attention,
    paged_decode_attention_ref,
)

# (sequences, context length): a full decode batch at the ablation's typical and long contexts,
# mid-size batches of long contexts, one long sequence alone.
CASES = ((256, 800), (256, 2048), (64, 4096), (16, 8192), (1, 8192))
GRID = tuple(DecodeConfig(n, w, s) for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": KV_FP8}
SPLIT_FACTORS = (2, 4)


def parse_config(text: str) -> DecodeConfig:
    """``NxWxS``: keys per tile, warps, pipeline stages."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(n.isdigit() for n in parts):
        raise argparse.ArgumentTypeError(f"expected NxWxS, got {text!r}")
    block_n, num_warps, num_stages = (int(n) for n in parts)
    return DecodeConfig(block_n, num_warps, num_stages)


COPY_BYTES = 1 << 30


def _config_text(entry: dict[str, Any]) -> str:
    return "{block_n}, {num_warps}, {num_stages}".format(**entry["config"]) + f", {entry['num_splits']} splits"


def sweep_case(shape: LayerShape, cache: str, case: tuple[int, int], copy_bw: float,
               configs: tuple[DecodeConfig, ...] = GRID) -> dict[str, Any]:
    num_seqs, context = case
    p = make_paged_inputs(shape, [1] * num_seqs, [context - 1] * num_seqs, BLOCK_SIZE, torch.bfloat16,
                          torch.device("cuda"))
    kv_cache = p.kv_cache.to(CACHE_DTYPES[cache])
    ref = paged_decode_attention_ref(p.q, kv_cache, p.block_tables, p.seq_lens, p.scale)
    kv_bytes = num_seqs * context * shape.num_kv_heads * shape.head_dim * 2 * kv_cache.element_size()
    default = default_decode_config(shape.head_dim, p.q.dtype, kv_cache.dtype)
    auto_splits = choose_num_splits(num_seqs, shape.num_kv_heads, context, torch.cuda.get_device_properties(0)
                                    .multi_processor_count)
    runs = [(config, auto_splits) for config in dict.fromkeys((default, *configs))]
    runs += [(default, auto_splits * f) for f in SPLIT_FACTORS if auto_splits * f <= MAX_SPLITS]
    results = []
    for config, splits in runs:
        def run(config: DecodeConfig = config, splits: int = splits) -> torch.Tensor:
            return paged_decode_attention(p.q, kv_cache, p.block_tables, p.seq_lens, p.scale, context,
                                          num_splits=splits, config=config)

        entry: dict[str, Any] = {"config": config._asdict(), "num_splits": splits,
                                 "default": config == default and splits == auto_splits, **checked_time(run, ref)}
        if entry["status"] == "ok":
            entry["bandwidth_fraction"] = kv_bytes / (entry["us"] * 1e-6) / copy_bw
        results.append(entry)
    ok = [r for r in results if r["status"] == "ok"]
    return {"shape": shape.name, "cache": cache, "num_seqs": num_seqs, "context": context, "kv_bytes": kv_bytes,
            "default": next(r for r in results if r["default"]), "best": min(ok, key=lambda r: r["us"]),
            "configs": results}


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("bench.decode_sweep", __doc__)
    add_out(parser, help=None)
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES], choices=[s.name for s in SHAPES])
    parser.add_argument("--caches", nargs="+", default=list(CACHE_DTYPES), choices=list(CACHE_DTYPES))
    parser.add_argument("--configs", nargs="+", type=parse_config, default=list(GRID), metavar="NxWxS",
                        help="configurations to time besides the launcher's (default: the whole grid)")
    args = parser.parse_args(argv)
    if not cuda_available("bench.decode_sweep"):
        return 2
    copy_bw = copy_bandwidth("cuda", COPY_BYTES)
    rows = []
    for shape in (s for s in SHAPES if s.name in args.shapes):
        for cache, case in itertools.product(args.caches, CASES):
            rows.append(sweep_case(shape, cache, case, copy_bw, tuple(args.configs)))
            r = rows[-1]
            print(f"{shape.name} {cache} {case}: default {_config_text(r['default'])} {r['default'].get('us')} us, "
                  f"best {_config_text(r['best'])} {r['best']['us']:.1f} us", flush=True)
    result = {"command": command_line("bench.decode_sweep", argv), "date": utc_timestamp(),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth": copy_bw,
              "cases": rows}
    write_json(args.out, result)
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s\n"
          "| shape | cache | sequences x context | default (N, warps, stages, splits) | µs | % of bandwidth "
          "| best | µs | % of bandwidth | speed-up |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, b = r["default"], r["best"]
        d_us = d.get("us")
        d_text = "n/a" if d_us is None else f"{d_us:.1f} | {100 * d['bandwidth_fraction']:.0f}%"
        print(f"| {r['shape']} | {r['cache']} | {r['num_seqs']} x {r['context']} | {_config_text(d)} | {d_text} | "
              f"{_config_text(b)} | {b['us']:.1f} | {100 * b['bandwidth_fraction']:.0f}% | "
              f"{'n/a' if d_us is None else round(d_us / b['us'], 2)}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
