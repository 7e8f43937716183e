"""Per-request outcomes and the run-level metrics computed from them, with one definition for
every benchmark that reports TTFT, TPOT, ITL and E2EL (bench/README.md, "Definitions").

Failed requests enter no latency or throughput figure; they are counted, and the first few
errors kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestOutcome:
    """What one request measured; times in seconds, None where it never got that far."""

    prompt_len: int  # the server's count (usage.prompt_tokens) when it sent one
    planned_output_len: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2el_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2el_s is None or self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class LatencySummary:
    """Milliseconds over one metric's samples."""

    mean: float
    median: float
    p95: float
    p99: float

    @classmethod
    def of_seconds(cls, samples: Sequence[float]) -> LatencySummary | None:
        if not samples:
            return None
        ms = np.asarray(samples, dtype=np.float64) * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(float(ms.mean()), float(p50), float(p95), float(p99))

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "median": self.median, "p95": self.p95, "p99": self.p99}


@dataclass(frozen=True)
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output tokens) / s
    ttft_ms: LatencySummary | None
    tpot_ms: LatencySummary | None
    itl_ms: LatencySummary | None
    e2el_ms: LatencySummary | None
    # Completed requests whose usage shows another length than planned although EOS was
    # ignored: the server did not honour ignore_eos or max_tokens.
    output_len_mismatches: int | None
    errors: list[str]  # the first few failures, in request order



def compute_metrics(
    outcomes: Sequence[RequestOutcome],
    duration_s: float,
    *,
    ignore_eos: bool = True,
    max_error_messages: int = 5,
) -> BenchMetrics:
    """Run-level metrics from per-request outcomes (failed requests count only as failed)."""
    done = [o for o in outcomes if o.success]
    failed = [(i, o) for i, o in enumerate(outcomes) if not o.success]
    input_tokens = sum(o.prompt_len for o in done)
    output_tokens = sum(o.output_tokens for o in done)
    return BenchMetrics(
        completed=len(done),
        failed=len(failed),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft_ms=LatencySummary.of_seconds([o.ttft_s for o in done if o.ttft_s is not None]),
        tpot_ms=LatencySummary.of_seconds([t for o in done if (t := o.tpot_s) is not None]),
        itl_ms=LatencySummary.of_seconds([gap for o in done for gap in o.itls_s]),
        e2el_ms=LatencySummary.of_seconds([o.e2el_s for o in done if o.e2el_s is not None]),
        output_len_mismatches=(sum(o.output_tokens != o.planned_output_len for o in done) if ignore_eos else None),
        errors=[f"request {i}: {o.error}" for i, o in failed[:max_error_messages]],
    )
