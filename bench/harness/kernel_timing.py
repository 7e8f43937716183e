"""Timing and checking one kernel call: eagerly and replayed from a CUDA graph, and its error
against a reference (``REL_TOL``, the measure the kernel tests use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from triton.testing import do_bench

REL_TOL = 1e-2
GRAPH_CALLS = 20


class Timing(NamedTuple):
    """Microseconds per call: launched eagerly, and replayed from a CUDA graph (None if the
    call cannot be captured)."""

    eager_us: float
    graph_us: float | None


# Runs ``fn`` repeatedly and returns its timing.
Timer = Callable[[Callable[[], object]], Timing]


def graph_us(fn: Callable[[], object], calls: int = GRAPH_CALLS) -> float | None:
    """Median GPU time per call of ``fn`` replayed from a CUDA graph of ``calls`` calls, in
    microseconds; None if capturing ``fn`` fails (e.g. it synchronises with the host)."""
    fn()  # compiled and warmed up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return float(do_bench(graph.replay, warmup=5, rep=100, return_mode="median")) * 1000.0 / calls


def cuda_timer(fn: Callable[[], object]) -> Timing:
    """``fn`` on the current CUDA device: median eager time and graph time, in microseconds."""
    eager = float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1000.0
    return Timing(eager, graph_us(fn))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, the measure the kernel tests use."""
    err = (out.float() - ref.float()).abs().max().item()
    return err / max(ref.float().abs().max().item(), 1e-6)


def checked_time(run: Callable[[], torch.Tensor], ref: torch.Tensor) -> dict[str, Any]:
    """One configuration of a tile sweep: ``status`` ``failed`` (and the message) when it does not
    run, ``wrong`` when its result is not within REL_TOL of ``ref``, else ``ok`` with its median
    time in ``us``; ``rel_error`` whenever it ran."""
    try:
        error = rel_error(run(), ref)
    except Exception as exc:  # a configuration that does not fit the GPU is a result, not a crash
        return {"status": "failed", "message": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if error > REL_TOL:
        return {"status": "wrong", "rel_error": error}
    return {"status": "ok", "rel_error": error, "us": do_bench(run, return_mode="median") * 1000.0}
