"""Parameter counts, FLOPs and decode bytes of a shape, against the real models and runner."""

from __future__ import annotations

import pytest
import torch

from bench.harness.engine import weight_bytes_per_step
from bench.harness.model_costs import ShapeCosts
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.worker.device import DeviceInfo
from loomserve.worker.kv_cache import kv_cache_bytes_per_block
from loomserve.worker.model_runner import ModelRunner


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "llama-3.1-8b", "llama-tiny"])
def test_parameter_counts_match_the_models(shape: str) -> None:
    from loomserve.worker.loader import load_model

    model, _ = load_model(shape, load_format="dummy", dtype=torch.bfloat16, device="meta")
    costs = ShapeCosts.of(shape, torch.bfloat16)
    assert costs.params == sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers.0.") and p.dim() == 2)
    assert costs.layer_linear_params == layer


def test_decode_bytes_match_the_engine_benchmark() -> None:
    """Same bytes per batch-1 decode step as the engine harness counts from a real runner."""
    config = WorkerConfig(model="llama-tiny", load_format="dummy", device="cpu", kv_cache_gb=0.01)
    runner = ModelRunner(config, "llama-tiny", DeviceInfo.resolve(config), SchedulerConfig().step_limits())
    context = 640.5
    expected = weight_bytes_per_step(runner) + context * kv_cache_bytes_per_block(runner.model_config, 1, runner.dtype)
    assert ShapeCosts.of("llama-tiny", torch.float32).decode_bytes_per_step(context) == pytest.approx(expected)


def test_request_flops() -> None:
    costs = ShapeCosts.of("llama-3.1-8b", torch.bfloat16)
    c = costs.config
    # One prompt token, one output: a single forward of one token, attending to itself.
    one = 2 * c.num_layers * costs.layer_linear_params + 2 * c.vocab_size * c.hidden_size + 4 * c.num_layers * c.q_size
    assert costs.request_flops(1, 1) == one
    # About 2 * params per token for short contexts (the 8B has ~7.5e9 non-embedding weights).
    per_token = costs.request_flops(100, 101) / 200
    assert 14e9 < per_token < 16.5e9
    assert costs.request_flops(10, 0) == 0
