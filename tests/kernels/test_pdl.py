"""Programmatic dependent launch (kernels/__init__.py): when launches ask for it, and that a
chain of PDL launches in a CUDA graph computes exactly what plain launches compute."""

from __future__ import annotations

import pytest
import torch

from loomserve import kernels
from loomserve.kernels import pdl_args, set_pdl
from loomserve.kernels.activation import _silu_and_mul_kernel, silu_and_mul
from loomserve.kernels.gemv import gemv
from loomserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm


@pytest.fixture
def restore_pdl():
    before = kernels._pdl_allowed
    yield
    set_pdl(before)


def test_no_pdl_without_a_compiled_kernel_on_a_gpu(restore_pdl):
    set_pdl(True)
    # The interpreter cannot run the grid-dependency instructions, and a CPU tensor has no GPU.
    assert pdl_args(_silu_and_mul_kernel, torch.device("cpu")) == {"PDL": False}


@pytest.mark.gpu
def test_pdl_follows_the_switch_and_the_gpu(restore_pdl):
    device = torch.device("cuda")
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    set_pdl(True)
    assert pdl_args(_silu_and_mul_kernel, device) == ({"PDL": True, "launch_pdl": True} if hopper else {"PDL": False})
    set_pdl(False)
    assert pdl_args(_silu_and_mul_kernel, device) == {"PDL": False}


def _chain(x, residual, weights):
    """A decode-like chain of one-row kernels, each reading the one before."""
    hidden = rms_norm(x, weights["norm"], 1e-5)
    for _ in range(6):
        gate_up = gemv(hidden, weights["gate_up"])
        act = silu_and_mul(gate_up)
        down = gemv(act, weights["down"])
        hidden, residual = fused_add_rms_norm(down, residual, weights["norm"], 1e-5)
    return hidden, residual


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pdl_chain_in_a_graph_equals_plain_launches(restore_pdl, seed):
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden_size, inter = 4096, 14336
    weights = {
        "norm": 1.0 + 0.1 * torch.randn(hidden_size, generator=gen, device=device, dtype=torch.bfloat16),
        "gate_up": torch.randn((2 * inter, hidden_size), generator=gen, device=device, dtype=torch.bfloat16) / 64,
        "down": torch.randn((hidden_size, inter), generator=gen, device=device, dtype=torch.bfloat16) / 120,
    }
    x = torch.randn((1, hidden_size), generator=gen, device=device, dtype=torch.bfloat16)
    residual = torch.randn((1, hidden_size), generator=gen, device=device, dtype=torch.bfloat16)
    set_pdl(False)
    expected = _chain(x, residual, weights)
    set_pdl(True)
    static_x, static_residual = x.clone(), residual.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _chain(static_x, static_residual, weights)  # builds the PDL variants outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(static_x, static_residual, weights)
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
