"""Tile sizes of the prefill attention kernel: every configuration of a small grid against the
one the launcher picks, on the prefill shapes of a busy step.

    python -m bench.prefill_sweep --out results/prefill-sweep.json

Needs a CUDA GPU. For each model shape (``bench.harness.kernel_inputs.SHAPES``: head dim 128 and
64, 32 query and 8 KV heads, bf16, block size 16) and each case (sequences x new tokens over a
cached prefix), every configuration is first checked against the fp32 reference (max error within
1e-2 of the largest reference value) and then timed (median of ``triton.testing.do_bench``). A
configuration that does not compile (shared memory) or is wrong is recorded as such. The table
gives, per case, the launcher's default, the fastest configuration and the speed-up between them. A
configuration's M counts tile rows, (token, query head) pairs: with 4 query heads per KV head a
64-row tile covers 16 tokens.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import torch

from bench.harness.cli import add_out, cuda_available, new_parser
from bench.harness.kernel_inputs import BLOCK_SIZE, SHAPES, LayerShape, make_paged_inputs
from bench.harness.kernel_timing import checked_time
from bench.harness.metadata import command_line, utc_timestamp
from bench.harness.results import write_json
from loomserve.kernels.paged_prefill_attention import (
    LaunchConfig,
    default_launch_config,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

# (sequences, new tokens each, cached prefix each): a step's prompt chunk, a step of short
# prompts, chunks over long prefixes, one long prompt.
CASES = ((1, 1808, 0), (4, 512, 0), (8, 512, 2048), (1, 4096, 0))
GRID = tuple(LaunchConfig(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))


def _config_text(entry: dict[str, Any]) -> str:
    return "{block_m}, {block_n}, {num_warps}, {num_stages}".format(**entry["config"])


def sweep_case(shape: LayerShape, case: tuple[int, int, int], configs: tuple[LaunchConfig, ...]) -> dict[str, Any]:
    num_seqs, query_len, prefix_len = case
    p = make_paged_inputs(shape, [query_len] * num_seqs, [prefix_len] * num_seqs, BLOCK_SIZE, torch.bfloat16,
                          torch.device("cuda"))
    ref = paged_prefill_attention_ref(p.q, p.kv_cache, p.query_start_loc, p.seq_lens, p.block_tables, p.scale)
    default = default_launch_config(shape.head_dim, query_len, torch.bfloat16,
                                    group=shape.num_heads // shape.num_kv_heads)
    results = []
    for config in dict.fromkeys((default, *configs)):
        def run(config: LaunchConfig = config) -> torch.Tensor:
            return paged_prefill_attention(p.q, p.kv_cache, p.query_start_loc, p.seq_lens, p.block_tables, p.scale,
                                           query_len, config=config)

        results.append({"config": config._asdict(), "default": config == default, **checked_time(run, ref)})
    ok = [r for r in results if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["us"])
    base = next(r for r in results if r["default"])
    pairs = query_len * prefix_len + query_len * (query_len + 1) / 2  # causal (query, key) pairs of a sequence
    flops = 4.0 * shape.num_heads * shape.head_dim * num_seqs * pairs
    return {"shape": shape.name, "num_seqs": num_seqs, "query_len": query_len, "prefix_len": prefix_len,
            "flops": flops, "default": base, "best": best, "configs": results}


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("bench.prefill_sweep", __doc__)
    add_out(parser, help=None)
    args = parser.parse_args(argv)
    if not cuda_available("bench.prefill_sweep"):
        return 2
    rows = []
    for shape in SHAPES:
        for case in CASES:
            rows.append(sweep_case(shape, case, GRID))
            r = rows[-1]
            base_us = r["default"].get("us")
            print(f"{shape.name} {case}: default {r['default']['config']} {base_us} us, best {r['best']['config']} "
                  f"{r['best']['us']:.1f} us", flush=True)
    result = {"command": command_line("bench.prefill_sweep", argv), "date": utc_timestamp(),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": rows}
    write_json(args.out, result)
    print("| shape | sequences x new (prefix) | default (M, N, warps, stages) | µs | TFLOP/s | best | µs | TFLOP/s | "
          "speed-up |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, b = r["default"], r["best"]
        d_us = d.get("us")
        print(f"| {r['shape']} | {r['num_seqs']} x {r['query_len']} ({r['prefix_len']}) | {_config_text(d)} | "
              f"{d_us if d_us is None else round(d_us, 1)} | "
              f"{'n/a' if d_us is None else round(r['flops'] / d_us / 1e6)} | {_config_text(b)} | {b['us']:.1f} | "
              f"{r['flops'] / b['us'] / 1e6:.0f} | {'n/a' if d_us is None else round(d_us / b['us'], 2)}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
