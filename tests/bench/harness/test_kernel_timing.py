"""Checking a kernel call against its reference (timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from bench.harness.kernel_timing import REL_TOL, Timing, checked_time, cuda_timer, graph_us, rel_error


def test_error_relative_to_the_largest_reference_value() -> None:
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert rel_error(torch.tensor([1.0, -4.0, 2.2]), ref) == pytest.approx(0.05)
    assert rel_error(ref.to(torch.bfloat16), ref) == 0.0


def test_a_configuration_that_breaks_or_is_wrong_is_a_result() -> None:
    ref = torch.ones(4)

    def broken() -> torch.Tensor:
        raise RuntimeError("out of shared memory")

    assert checked_time(broken, ref) == {"status": "failed", "message": "RuntimeError: out of shared memory"}
    wrong = checked_time(lambda: ref * (1 + 2 * REL_TOL), ref)
    assert wrong["status"] == "wrong" and wrong["rel_error"] == pytest.approx(2 * REL_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_and_graph_times() -> None:
    x = torch.randn(1 << 20, device="cuda")
    timing = cuda_timer(lambda: x * 2)
    assert isinstance(timing, Timing) and timing.eager_us > 0 and timing.graph_us is not None
    assert graph_us(lambda: x.sum().item()) is None  # a host sync cannot be captured
    assert checked_time(lambda: x * 1, x)["status"] == "ok"
