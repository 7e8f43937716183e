"""Kernel micro-benchmark: every Triton kernel against the obvious torch formulation.

    python -m bench.kernels --out results/kernels.json

Needs a CUDA GPU; runs in a few minutes on an H100. Shapes are the attention and
MLP layer shapes of Llama-3.1-8B (head dim 128) and Llama-3.2-1B (head dim 64),
paged with block size 16 over randomly scattered blocks. Before timing, each case
checks the kernel and the torch formulation against the fp32 torch reference of
``kernels/`` (max error relative to max |reference| within 1e-2); the table and
the JSON record both errors, and the exit status is 1 if any case fails.

The torch formulations:

* decode: gather each sequence's blocks into a dense (B, KVH, L, D) tensor, then
  ``scaled_dot_product_attention`` with GQA;
* prefill: per sequence, gather its context and run SDPA (causal, or an explicit
  mask when the sequence has a cached prefix);
* reshape_and_cache: ``index_copy_`` into the flattened cache;
* rmsnorm: add, fp32 mean of squares, rsqrt, weight multiply;
* rotary: rotate_half with gathered cos/sin, copied back in place;
* silu_and_mul: ``F.silu(gate) * up``;
* gemv (one-row projections of a batch-1 decode step, and the LM head over one
  row): ``F.linear``, i.e. cuBLAS.

Times are in microseconds, two per side. **Eager**: the median of ``triton.testing.do_bench``
over single calls, launch included, so a kernel of a few microseconds is timed as its Python
launcher (or torch's dispatcher) plus the GPU's work. **Graph**: the same call captured
``GRAPH_CALLS`` times back to back in one CUDA graph, the median replay over ``GRAPH_CALLS``;
this is the GPU's work alone, as in the service's decode and mixed-step graphs (back to back,
inputs that fit in L2 stay there after the first call). A formulation that cannot be captured
(it synchronises) has no graph time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
import triton

from bench.harness.cli import add_out, cuda_available, new_parser
from bench.harness.kernel_inputs import BLOCK_SIZE, SHAPES, LayerShape, make_paged_inputs
from bench.harness.kernel_timing import REL_TOL, Timer, cuda_timer, rel_error
from bench.harness.results import write_json
from loomserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from loomserve.kernels.gemv import gemv, gemv_ref
from loomserve.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from loomserve.kernels.paged_prefill_attention import (
    gather_context,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from loomserve.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from loomserve.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from loomserve.kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache

RMS_EPS = 1e-5
ROPE_THETA = 500000.0


# (batch, context length)
DECODE_CASES = (
    (1, 512),
    (1, 2048),
    (1, 8192),
    (16, 2048),
    (16, 8192),
    (64, 2048),
    (256, 512),
    (256, 2048),
    (256, 4096),
)
# (sequences, new tokens each, cached prefix each); 3000 is not a block multiple.
PREFILL_CASES = (
    (1, 512, 0),
    (1, 2048, 0),
    (1, 4096, 0),
    (4, 1024, 0),
    (1, 1024, 3000),
    (8, 512, 2048),
)
TOKEN_CASES = (1, 256, 4096)

Row = dict[str, object]


def torch_decode_attention(
    q: torch.Tensor,  # (B, H, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    block_tables: torch.Tensor,  # (B, max_blocks)
    context_len: int,  # the same for every sequence
    scale: float,
) -> torch.Tensor:  # (B, H, D)
    """Gather every sequence's blocks into a dense tensor, then one SDPA call."""
    block_size = kv_cache.shape[2]
    blocks = block_tables[:, : math.ceil(context_len / block_size)].long()  # (B, nb)
    dense = kv_cache[:, blocks]  # (2, B, nb, block_size, KVH, D)
    dense = dense.flatten(2, 3)[:, :, :context_len].transpose(2, 3)  # (2, B, KVH, L, D)
    out = F.scaled_dot_product_attention(
        q[:, :, None], dense[0], dense[1], scale=scale, enable_gqa=True
    )  # (B, H, 1, D)
    return out[:, :, 0]


def torch_prefill_attention(
    q: torch.Tensor,  # (T, H, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    block_tables: torch.Tensor,  # (B, max_blocks)
    query_start_loc_cpu: list[int],
    seq_lens_cpu: list[int],
    scale: float,
) -> torch.Tensor:  # (T, H, D)
    """One SDPA call per sequence over its gathered context."""
    out = torch.empty_like(q)
    for seq, seq_len in enumerate(seq_lens_cpu):
        start, end = query_start_loc_cpu[seq], query_start_loc_cpu[seq + 1]
        if end == start:
            continue
        k, v = gather_context(kv_cache, block_tables[seq], seq_len)  # (L, KVH, D)
        prefix_len = seq_len - (end - start)
        mask = None
        if prefix_len > 0:
            # SDPA's is_causal aligns the diagonal top-left; a prefix shifts it.
            query_pos = torch.arange(prefix_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        attn = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],  # (1, H, q, D)
            k.transpose(0, 1)[None],  # (1, KVH, L, D)
            v.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )  # (1, H, q, D)
        out[start:end] = attn[0].transpose(0, 1)
    return out


def torch_reshape_and_cache(
    key: torch.Tensor,  # (T, KVH, D)
    value: torch.Tensor,  # (T, KVH, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D), contiguous
    slot_mapping: torch.Tensor,  # (T,) int64, no -1 entries
) -> None:
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])  # (2, slots, KVH, D)
    flat[0].index_copy_(0, slot_mapping, key)
    flat[1].index_copy_(0, slot_mapping, value)


def torch_rms_norm(
    x: torch.Tensor,  # (T, hidden)
    residual: torch.Tensor | None,  # (T, hidden)
    weight: torch.Tensor,  # (hidden,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # normalised, new residual
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), residual


def torch_rotary(
    q: torch.Tensor,  # (T, H, D), rotated in place
    k: torch.Tensor,  # (T, KVH, D), rotated in place
    positions: torch.Tensor,  # (T,)
    cos: torch.Tensor,  # (max_position, D/2)
    sin: torch.Tensor,  # (max_position, D/2)
) -> None:
    cos_t = cos[positions].repeat(1, 2)[:, None].to(q.dtype)  # (T, 1, D)
    sin_t = sin[positions].repeat(1, 2)[:, None].to(q.dtype)
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        x.copy_(x * cos_t + torch.cat((-x2, x1), dim=-1) * sin_t)


def torch_silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # (T, 2I) -> (T, I)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _row(
    kernel: str,
    shape: LayerShape,
    params: Mapping[str, object],
    triton_err: float,
    torch_err: float,
    triton_fn: Callable[[], object],
    torch_fn: Callable[[], object],
    timer: Timer,
) -> Row:
    triton_t = timer(triton_fn)
    torch_t = timer(torch_fn)
    graph_speedup = None
    if triton_t.graph_us and torch_t.graph_us is not None:
        graph_speedup = torch_t.graph_us / triton_t.graph_us
    return {
        "kernel": kernel,
        "model": shape.name,
        "params": params,
        "triton_us": triton_t.eager_us,
        "torch_us": torch_t.eager_us,
        "speedup": torch_t.eager_us / triton_t.eager_us if triton_t.eager_us > 0 else None,
        "triton_graph_us": triton_t.graph_us,
        "torch_graph_us": torch_t.graph_us,
        "graph_speedup": graph_speedup,
        "triton_rel_err": triton_err,
        "torch_rel_err": torch_err,
        "ok": triton_err <= REL_TOL and torch_err <= REL_TOL,
    }


def bench_decode(
    shape: LayerShape,
    batch: int,
    context_len: int,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
    block_size: int = BLOCK_SIZE,
) -> Row:
    p = make_paged_inputs(shape, [1] * batch, [context_len - 1] * batch, block_size, dtype, device)

    def run_triton() -> torch.Tensor:
        return paged_decode_attention(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, context_len)

    def run_torch() -> torch.Tensor:
        return torch_decode_attention(p.q, p.kv_cache, p.block_tables, context_len, p.scale)

    ref = paged_decode_attention_ref(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale)
    params: dict[str, int | bool] = {"batch": batch, "context_len": context_len}
    return _row(
        "decode_attention",
        shape,
        params,
        rel_error(run_triton(), ref),
        rel_error(run_torch(), ref),
        run_triton,
        run_torch,
        timer,
    )


def bench_prefill(
    shape: LayerShape,
    num_seqs: int,
    query_len: int,
    prefix_len: int,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
    block_size: int = BLOCK_SIZE,
) -> Row:
    p = make_paged_inputs(shape, [query_len] * num_seqs, [prefix_len] * num_seqs, block_size, dtype, device)

    def run_triton() -> torch.Tensor:
        return paged_prefill_attention(
            p.q, p.kv_cache, p.query_start_loc, p.seq_lens, p.block_tables, p.scale, query_len
        )

    def run_torch() -> torch.Tensor:
        return torch_prefill_attention(p.q, p.kv_cache, p.block_tables, p.query_start_loc_cpu, p.seq_lens_cpu, p.scale)

    ref = paged_prefill_attention_ref(p.q, p.kv_cache, p.query_start_loc, p.seq_lens, p.block_tables, p.scale)
    params: dict[str, int | bool] = {
        "num_seqs": num_seqs,
        "query_len": query_len,
        "prefix_len": prefix_len,
    }
    return _row(
        "prefill_attention",
        shape,
        params,
        rel_error(run_triton(), ref),
        rel_error(run_torch(), ref),
        run_triton,
        run_torch,
        timer,
    )


def bench_reshape_and_cache(
    shape: LayerShape,
    num_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
    block_size: int = BLOCK_SIZE,
) -> Row:
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    num_blocks = 2 * math.ceil(num_tokens / block_size)
    kv_shape = (num_tokens, shape.num_kv_heads, shape.head_dim)
    key = torch.randn(kv_shape, generator=gen, dtype=dtype, device=device)
    value = torch.randn(kv_shape, generator=gen, dtype=dtype, device=device)
    cache = torch.zeros((2, num_blocks, block_size, shape.num_kv_heads, shape.head_dim), dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:num_tokens]
    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slots)
    triton_cache, torch_cache = cache.clone(), cache.clone()

    def run_triton() -> None:
        reshape_and_cache(key, value, triton_cache, slots)

    def run_torch() -> None:
        torch_reshape_and_cache(key, value, torch_cache, slots)

    run_triton()
    run_torch()
    return _row(
        "reshape_and_cache",
        shape,
        {"num_tokens": num_tokens},
        rel_error(triton_cache, expected),
        rel_error(torch_cache, expected),
        run_triton,
        run_torch,
        timer,
    )


def bench_rms_norm(
    shape: LayerShape,
    num_tokens: int,
    fused: bool,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
) -> Row:
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    x = torch.randn((num_tokens, shape.hidden), generator=gen, dtype=dtype, device=device)
    residual = torch.randn(x.shape, generator=gen, dtype=dtype, device=device)
    weight = 1.0 + 0.1 * torch.randn(shape.hidden, generator=gen, dtype=dtype, device=device)
    res = residual if fused else None

    def run_triton() -> tuple[torch.Tensor, torch.Tensor | None]:
        if res is None:
            return rms_norm(x, weight, RMS_EPS), None
        return fused_add_rms_norm(x, res, weight, RMS_EPS)

    def run_torch() -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch_rms_norm(x, res, weight, RMS_EPS)

    if res is None:
        ref = rms_norm_ref(x, weight, RMS_EPS)
    else:
        ref, _ = fused_add_rms_norm_ref(x, res, weight, RMS_EPS)
    return _row(
        "fused_add_rms_norm" if fused else "rms_norm",
        shape,
        {"num_tokens": num_tokens},
        rel_error(run_triton()[0], ref),
        rel_error(run_torch()[0], ref),
        run_triton,
        run_torch,
        timer,
    )


def bench_rotary(
    shape: LayerShape,
    num_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
    max_position: int = 8192,
) -> Row:
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    qkv_heads = shape.num_heads + 2 * shape.num_kv_heads
    qkv = torch.randn((num_tokens, qkv_heads, shape.head_dim), generator=gen, dtype=dtype, device=device)
    # Strided q and k views of the fused projection, as the model hands them over.
    q = qkv[:, : shape.num_heads]
    k = qkv[:, shape.num_heads : shape.num_heads + shape.num_kv_heads]
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen, device=device)
    dims = torch.arange(0, shape.head_dim, 2, device=device, dtype=torch.float32)
    cos, sin = build_cos_sin_cache(ROPE_THETA ** (-dims / shape.head_dim), max_position)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cos, sin)
    q_triton, k_triton = q.clone(), k.clone()
    apply_rotary(q_triton, k_triton, positions, cos, sin)
    q_torch, k_torch = q.clone(), k.clone()
    torch_rotary(q_torch, k_torch, positions, cos, sin)
    triton_err = max(rel_error(q_triton, ref_q), rel_error(k_triton, ref_k))
    torch_err = max(rel_error(q_torch, ref_q), rel_error(k_torch, ref_k))
    # Timed repeatedly in place on the strided views; rotations keep magnitudes bounded.
    return _row(
        "rotary",
        shape,
        {"num_tokens": num_tokens},
        triton_err,
        torch_err,
        lambda: apply_rotary(q, k, positions, cos, sin),
        lambda: torch_rotary(q, k, positions, cos, sin),
        timer,
    )


def bench_silu_and_mul(
    shape: LayerShape,
    num_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
) -> Row:
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    x = torch.randn((num_tokens, 2 * shape.intermediate), generator=gen, dtype=dtype, device=device)
    ref = silu_and_mul_ref(x)
    return _row(
        "silu_and_mul",
        shape,
        {"num_tokens": num_tokens},
        rel_error(silu_and_mul(x), ref),
        rel_error(torch_silu_and_mul(x), ref),
        lambda: silu_and_mul(x),
        lambda: torch_silu_and_mul(x),
        timer,
    )


def bench_gemv(
    shape: LayerShape,
    name: str,
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
) -> Row:
    gen = torch.Generator(device=device).manual_seed(out_features + in_features)
    x = torch.randn((1, in_features), generator=gen, dtype=dtype, device=device)
    weight = torch.randn((out_features, in_features), generator=gen, dtype=dtype, device=device)
    weight /= in_features**0.5
    ref = gemv_ref(x, weight)
    return _row(
        "gemv",
        shape,
        {"weight": name, "out": out_features, "in": in_features},
        rel_error(gemv(x, weight), ref),
        rel_error(F.linear(x, weight), ref),
        lambda: gemv(x, weight),
        lambda: F.linear(x, weight),
        timer,
    )


KERNELS = (
    "decode_attention",
    "prefill_attention",
    "reshape_and_cache",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary",
    "silu_and_mul",
    "gemv",
)


def run_all(
    shapes: Sequence[LayerShape],
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
    decode_cases: Sequence[tuple[int, int]] = DECODE_CASES,
    prefill_cases: Sequence[tuple[int, int, int]] = PREFILL_CASES,
    token_cases: Sequence[int] = TOKEN_CASES,
    block_size: int = BLOCK_SIZE,
    kernels: Collection[str] = KERNELS,
) -> list[Row]:
    """The rows of ``kernels`` (all by default), shape by shape."""
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; known: {', '.join(KERNELS)}")
    rows: list[Row] = []
    for shape in shapes:
        if "decode_attention" in kernels:
            for batch, context_len in decode_cases:
                rows.append(bench_decode(shape, batch, context_len, dtype, device, timer, block_size))
        if "prefill_attention" in kernels:
            for num_seqs, query_len, prefix_len in prefill_cases:
                rows.append(bench_prefill(shape, num_seqs, query_len, prefix_len, dtype, device, timer, block_size))
        for num_tokens in token_cases:
            if "reshape_and_cache" in kernels:
                rows.append(bench_reshape_and_cache(shape, num_tokens, dtype, device, timer, block_size))
            for fused, name in ((False, "rms_norm"), (True, "fused_add_rms_norm")):
                if name in kernels:
                    rows.append(bench_rms_norm(shape, num_tokens, fused, dtype, device, timer))
            if "rotary" in kernels:
                rows.append(bench_rotary(shape, num_tokens, dtype, device, timer))
            if "silu_and_mul" in kernels:
                rows.append(bench_silu_and_mul(shape, num_tokens, dtype, device, timer))
        if "gemv" in kernels:
            for name, out_features, in_features in shape.projections():
                rows.append(bench_gemv(shape, name, out_features, in_features, dtype, device, timer))
        # Each shape's caches are freed before the next one allocates its own.
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'kernel':<20} {'model':<14} {'params':<38} {'triton us':>10} {'torch us':>10} "
        f"{'speedup':>8} {'graph tri':>10} {'graph tor':>10} {'speedup':>8} {'err':>9} {'torch err':>9}  ok"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        params = row["params"]
        assert isinstance(params, dict)
        text = " ".join(f"{k}={v}" for k, v in params.items())
        lines.append(
            f"{row['kernel']!s:<20} {row['model']!s:<14} {text:<38} "
            f"{_us(row['triton_us'])} {_us(row['torch_us'])} {_times(row['speedup'])} "
            f"{_us(row['triton_graph_us'])} {_us(row['torch_graph_us'])} {_times(row['graph_speedup'])} "
            f"{row['triton_rel_err']:>9.1e} {row['torch_rel_err']:>9.1e}  "
            f"{'yes' if row['ok'] else 'FAIL'}"
        )
    return "\n".join(lines)


def _us(value: object) -> str:
    return f"{value:>10.1f}" if isinstance(value, float) else f"{'-':>10}"


def _times(value: object) -> str:
    return f"{(f'{value:.2f}x' if isinstance(value, float) else '-'):>8}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser("bench.kernels", __doc__)
    add_out(parser)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="activation dtype")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="which rows to run")
    args = parser.parse_args(argv)
    if not cuda_available("bench.kernels"):
        return 2
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    rows = run_all(SHAPES, dtype, device, cuda_timer, kernels=args.kernels)
    print(format_table(rows))
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "block_size": BLOCK_SIZE,
        "rel_tol": REL_TOL,
        "all_ok": all(bool(row["ok"]) for row in rows),
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
