from __future__ import annotations

import json
import time

import pytest
import torch

from bench import ablation
from bench.ablation import ROWS, Budget, RowContext, parse_per_row, serve_options, settings_json
from bench.harness.model_costs import ShapeCosts


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
    def options_and_settings(*options: str) -> tuple[list[str], dict]:
        _, settings = ablation.parse_args(["--smoke", "--out", "x.json", *options])
        ctx = RowContext("llama-tiny", "loomserve-continuous", ShapeCosts.of("llama-tiny", torch.float32), [],
                         settings, 0.0)
        return serve_options(ctx, "continuous"), settings_json(settings)

    options, settings = options_and_settings("--gateway-workers", "3", "--client-processes", "2")
    i = options.index("--gateway-workers")
    assert options[i + 1] == "3"
    assert (settings["gateway_workers"], settings["client_processes"]) == (3, 2)
    # One gateway is the server's default: the option stays off the command line for servers without it.
    options, settings = options_and_settings()
    assert "--gateway-workers" not in options and options[options.index("--batching") + 1] == "continuous"
    assert (settings["gateway_workers"], settings["client_processes"]) == (1, 1)
    with pytest.raises(SystemExit):
        ablation.parse_args(["--out", "x.json", "--client-processes", "0"])


def test_budget_shares_and_skips():
    budget = Budget(100.0, 10.0)
    deadline = budget.row_deadline(4)
    assert deadline is not None
    assert 39 < deadline - time.perf_counter() <= 40.1  # 1.6 x an even split of 100 s
    budget.end = time.perf_counter() + 5
    assert budget.row_deadline(1) is None


def mixed_result() -> dict:
    """A result with a truncated, a failed and a finished row."""
    row = {"status": "ok", "completed": 8, "num_requests": 8, "max_num_seqs": 32, "output_tokens_per_s": 1234.5,
           "ttft_p50_ms": 10.0, "ttft_p95_ms": 20.0, "gpu_util_mean_pct": 55.0, "cost_per_1m_output_tokens_usd": 0.56,
           "compute_roofline_fraction": 0.123, "batch1_tokens_per_s": 200.0, "batch1_roofline_fraction": 0.7}
    return {
        "device": "NVIDIA H100", "matmul_peak_flops": 7.9e14, "copy_bandwidth_bytes_per_s": 3e12, "date": "d",
        "settings": {"gpu_hour_usd": 2.5, "dtype": "bfloat16"},
        "shapes": [{"shape": "llama-3.1-8b", "requests": {r: {"max_output_len": 512} for r in ROWS}, "rows": {
            "hf-static": {**row, "status": "truncated", "gpu_util_mean_pct": None},
            "hf-continuous": {"status": "failed", "message": "RuntimeError: boom"},
            "engine": row,
        }}],
    }


def test_markdown_table_of_mixed_rows():
    table = ablation.format_markdown(mixed_result())
    assert ("| HF transformers, static batches (generate) | 8/8, out ≤ 512, 32 seqs (truncated) | 1,234 | 10 / 20 "
            "| n/a |") in table
    assert "| HF transformers, continuous batching | failed: RuntimeError: boom |" in table
    assert "| 1,234 | 10 / 20 | 55% | 0.56 | 12.3% | 200 (70%) |" in table


def test_chart_puts_each_finished_row_at_its_throughput():
    chart = ablation.figure(mixed_result())
    assert chart is not None
    (panel,) = chart.panels
    # Both rows within 20x of each other on both axes: linear axes.
    assert panel.title == "llama-3.1-8b (rag)" and not panel.logx and not panel.logy
    # The failed row has no point; each other row spans its TTFT p50 to p95 at its throughput.
    assert [(s.label, s.x, s.y) for s in panel.series] == [
        ("HF transformers, static batches (generate) (truncated)", (1234.5, 1234.5), (10.0, 20.0)),
        ("loomserve engine alone, continuous", (1234.5, 1234.5), (10.0, 20.0)),
    ]
    failed_only = mixed_result()
    failed_only["shapes"][0]["rows"] = {"hf-continuous": {"status": "failed", "message": "boom"}}
    assert ablation.figure(failed_only) is None


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
    assert (tmp_path / "ablation.png").stat().st_size > 0
    step_times = rows["engine"]["details"]["step_times"]
    assert step_times["steps"] > 0 and 0 < step_times["mean_host_ms"] <= step_times["mean_forward_ms"]
