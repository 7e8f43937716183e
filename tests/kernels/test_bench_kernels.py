"""The kernel benchmark's cases at tiny shapes, so every function it calls runs here."""

from __future__ import annotations

import json

import pytest
import torch

from bench.harness.kernel_inputs import LayerShape
from bench.harness.kernel_timing import Timing, graph_us
from bench.kernels import KERNELS, format_table, main, run_all

TINY = LayerShape("tiny", num_heads=4, num_kv_heads=2, head_dim=16, hidden=48, intermediate=40, vocab=100)


def _call_once(fn):
    fn()
    return Timing(2.0, None)


def _call_with_graph_time(fn):
    fn()
    return Timing(2.0, 0.5)


def test_all_cases_agree_with_references(device):
    rows = run_all(
        [TINY],
        torch.float32,
        device,
        _call_once,
        decode_cases=[(2, 21)],
        prefill_cases=[(2, 5, 0), (1, 4, 7)],
        token_cases=[3],
        block_size=4,
    )
    assert {row["kernel"] for row in rows} == set(KERNELS)
    gemv_params = [row["params"] for row in rows if row["kernel"] == "gemv"]
    assert {p["weight"] for p in gemv_params if isinstance(p, dict)} == {
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "lm_head",
    }
    bad = [row for row in rows if not row["ok"]]
    assert not bad, bad
    assert all(row["speedup"] == 1.0 and row["graph_speedup"] is None for row in rows)
    table = format_table(rows)
    assert "prefill_attention" in table and "FAIL" not in table
    json.dumps(rows)


def test_rows_carry_both_timings(device):
    rows = run_all([TINY], torch.float32, device, _call_with_graph_time, token_cases=[2], kernels=["rotary"])
    (row,) = rows
    assert (row["triton_us"], row["torch_us"], row["triton_graph_us"], row["torch_graph_us"]) == (2.0, 2.0, 0.5, 0.5)
    assert row["graph_speedup"] == 1.0
    assert "0.5" in format_table(rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_time_leaves_out_the_launch():
    """A tiny kernel replayed from a graph costs a few microseconds; launched eagerly it costs
    its launch. A call that synchronises cannot be captured and has no graph time."""
    x = torch.ones(16, device="cuda")
    us = graph_us(lambda: x.add_(1.0))
    assert us is not None and 0.0 < us < 20.0
    assert graph_us(lambda: x.sum().item()) is None


def test_a_subset_of_kernels(device):
    rows = run_all([TINY], torch.float32, device, _call_once, token_cases=[2], kernels=["gemv", "rotary"])
    assert [row["kernel"] for row in rows] == ["rotary"] + ["gemv"] * 5
    with pytest.raises(ValueError, match="unknown kernels"):
        run_all([TINY], torch.float32, device, _call_once, kernels=["matmul"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_main_needs_a_gpu(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "k.json")]) == 2
    assert "CUDA" in capsys.readouterr().err
