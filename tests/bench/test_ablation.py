from __future__ import annotations

import json
import time

import pytest
import torch

from bench import ablation
from bench.ablation import ROWS, Budget, RowContext, ShapeCosts, parse_per_row, serve_argv, settings_json
from loomserve.shared.config import WorkerConfig
from loomserve.worker.device import DeviceInfo
from loomserve.worker.kv_cache import kv_cache_bytes_per_block
from loomserve.worker.model_runner import ModelRunner


def test_per_row_values():
    assert parse_per_row([], 128, "--n") == dict.fromkeys(ROWS, 128)
    assert parse_per_row(["64"], 128, "--n") == dict.fromkeys(ROWS, 64)
    values = parse_per_row(["hf-static=16", "64", "engine=256"], 128, "--n")
    assert values == dict.fromkeys(ROWS, 64) | {"hf-static": 16, "engine": 256}
    with pytest.raises(ValueError, match="unknown row"):
        parse_per_row(["hf=3"], 1, "--n")
    with pytest.raises(ValueError, match="N nor ROW=N"):
        parse_per_row(["many"], 1, "--n")
    with pytest.raises(ValueError, match="at least 1"):
        parse_per_row(["engine=0"], 1, "--n")


def test_smoke_settings():
    _, settings = ablation.parse_args(["--smoke", "--out", "x.json", "--num-requests", "hf-static=2"])
    assert settings.shapes == ("llama-tiny",) and settings.device == "cpu" and settings.dtype == torch.float32
    assert settings.num_requests["hf-static"] == 2 and settings.num_requests["engine"] == 8
    _, settings = ablation.parse_args(["--out", "x.json", "--shapes", "llama-3.1-8b", "--rows", "engine"])
    assert settings.shapes == ("llama-3.1-8b",) and settings.rows == ("engine",) and settings.device == "cuda"
    assert settings.max_output_len["engine"] == 512 and settings.dtype == torch.bfloat16


def test_gateway_workers_and_client_processes():
    def argv_and_settings(*options: str) -> tuple[list[str], dict]:
        _, settings = ablation.parse_args(["--smoke", "--out", "x.json", *options])
        ctx = RowContext("llama-tiny", "loomserve-continuous", ShapeCosts.of("llama-tiny", torch.float32), [],
                         settings, 0.0)
        return serve_argv(ctx, "continuous", 8123), settings_json(settings)

    argv, settings = argv_and_settings("--gateway-workers", "3", "--client-processes", "2")
    i = argv.index("--gateway-workers")
    assert argv[i + 1] == "3"
    assert (settings["gateway_workers"], settings["client_processes"]) == (3, 2)
    # One gateway is the server's default: the option stays off the command line for servers without it.
    argv, settings = argv_and_settings()
    assert "--gateway-workers" not in argv and argv[:2] == ["loomserve.cli", "serve"]
    assert (settings["gateway_workers"], settings["client_processes"]) == (1, 1)
    with pytest.raises(SystemExit):
        ablation.parse_args(["--out", "x.json", "--client-processes", "0"])


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "llama-3.1-8b", "llama-tiny"])
def test_parameter_counts_match_the_models(shape):
    from loomserve.worker.loader import load_model

    model, _ = load_model(shape, load_format="dummy", dtype=torch.bfloat16, device="meta")
    costs = ShapeCosts.of(shape, torch.bfloat16)
    assert costs.params == sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers.0.") and p.dim() == 2)
    assert costs.layer_linear_params == layer


def test_decode_bytes_match_the_engine_benchmark():
    """Same bytes per batch-1 decode step as bench.gpu_engine counts from a real runner."""
    from bench.gpu_engine import weight_bytes_per_step

    config = WorkerConfig(model="llama-tiny", load_format="dummy", device="cpu", kv_cache_gb=0.01)
    runner = ModelRunner(config, "llama-tiny", DeviceInfo.resolve(config))
    context = 640.5
    expected = weight_bytes_per_step(runner) + context * kv_cache_bytes_per_block(runner.model_config, 1, runner.dtype)
    assert ShapeCosts.of("llama-tiny", torch.float32).decode_bytes_per_step(context) == pytest.approx(expected)


def test_request_flops():
    costs = ShapeCosts.of("llama-3.1-8b", torch.bfloat16)
    c = costs.config
    # One prompt token, one output: a single forward of one token, attending to itself.
    one = 2 * c.num_layers * costs.layer_linear_params + 2 * c.vocab_size * c.hidden_size + 4 * c.num_layers * c.q_size
    assert costs.request_flops(1, 1) == one
    # About 2 * params per token for short contexts (the 8B has ~7.5e9 non-embedding weights).
    per_token = costs.request_flops(100, 101) / 200
    assert 14e9 < per_token < 16.5e9
    assert costs.request_flops(10, 0) == 0


def test_gpu_utilisation_over_the_timed_window_only():
    sampler = ablation.GpuSampler()
    sampler.util, sampler.times, sampler.mem_used = [0.0, 0.0, 90.0, 80.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0], [1 << 30]
    assert sampler.summary()["gpu_util_mean_pct"] == pytest.approx(34.0)
    windowed = sampler.summary((2.5, 4.0))
    assert windowed["gpu_util_mean_pct"] == pytest.approx(85.0) and windowed["gpu_util_samples"] == 2
    assert sampler.summary((6.0, 7.0))["gpu_util_mean_pct"] is None


def test_budget_shares_and_skips():
    budget = Budget(100.0, 10.0)
    deadline = budget.row_deadline(4)
    assert deadline is not None
    assert 39 < deadline - time.perf_counter() <= 40.1  # 1.6 x an even split of 100 s
    budget.end = time.perf_counter() + 5
    assert budget.row_deadline(1) is None


def test_markdown_table_of_mixed_rows():
    row = {"status": "ok", "completed": 8, "num_requests": 8, "max_num_seqs": 32, "output_tokens_per_s": 1234.5,
           "ttft_p50_ms": 10.0, "ttft_p95_ms": 20.0, "gpu_util_mean_pct": 55.0, "cost_per_1m_output_tokens_usd": 0.56,
           "compute_roofline_fraction": 0.123, "batch1_tokens_per_s": 200.0, "batch1_roofline_fraction": 0.7}
    result = {
        "device": "NVIDIA H100", "matmul_peak_flops": 7.9e14, "copy_bandwidth_bytes_per_s": 3e12, "date": "d",
        "settings": {"gpu_hour_usd": 2.5, "dtype": "bfloat16"},
        "shapes": [{"shape": "llama-3.1-8b", "requests": {r: {"max_output_len": 512} for r in ROWS}, "rows": {
            "hf-static": {**row, "status": "truncated", "gpu_util_mean_pct": None},
            "hf-continuous": {"status": "failed", "message": "RuntimeError: boom"},
            "engine": row,
        }}],
    }
    table = ablation.format_markdown(result)
    assert ("| HF transformers, static batches (generate) | 8/8, out ≤ 512, 32 seqs (truncated) | 1,234 | 10 / 20 "
            "| n/a |") in table
    assert "| HF transformers, continuous batching | failed: RuntimeError: boom |" in table
    assert "| 1,234 | 10 / 20 | 55% | 0.56 | 12.3% | 200 (70%) |" in table


@pytest.mark.slow
def test_smoke_runs_every_row(tmp_path):
    """The whole --smoke run (about a minute on two cores): every row completes every request."""
    out = tmp_path / "ablation.json"
    assert ablation.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"]
    rows = result["shapes"][0]["rows"]
    assert set(rows) == set(ROWS)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row)
        assert row["completed"] == row["num_requests"] == 8
        assert row["output_len_mismatches"] == 0, name
        assert row["output_tokens_per_s"] > 0 and row["batch1_tokens_per_s"] > 0
        assert row["cost_per_1m_output_tokens_usd"] > 0 and row["compute_roofline_fraction"] > 0
    step_times = rows["engine"]["details"]["step_times"]
    assert step_times["steps"] > 0 and 0 < step_times["mean_host_ms"] <= step_times["mean_forward_ms"]
