"""bench.tp_scaling needs GPUs to measure anything; here, its chart and its exit without them."""

from __future__ import annotations

import pytest
import torch

from bench import tp_scaling


def test_chart_per_shape_against_the_group_size() -> None:
    def row(shape: str, tp: int, tokens_per_s: float, step_ms: float) -> dict:
        return {"shape": shape, "tp": tp, "rag": {"output_tokens_per_s": tokens_per_s},
                "batch1_decode": {"median_step_ms": step_ms}}

    result = {"device": "4 x NVIDIA H200", "date": "d", "rows": [
        row("llama-3.1-8b", 1, 2500.0, 4.8), row("llama-3.1-8b", 2, 3000.0, 4.3),
        row("llama-3.1-70b", 2, 660.0, 22.2), row("llama-3.1-70b", 4, 890.0, 14.1)]}
    chart = tp_scaling.figure(result)
    assert chart is not None
    throughput, latency = chart.panels
    assert [s.label for s in throughput.series] == ["llama-3.1-8b", "llama-3.1-70b"]
    assert throughput.series[1].x == (2, 4) and throughput.series[1].y == (660.0, 890.0)
    assert latency.series[0].y == (4.8, 4.3) and latency.xticks == (1, 2, 4)
    assert tp_scaling.figure({**result, "rows": []}) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_main_needs_gpus(tmp_path, capsys) -> None:
    assert tp_scaling.main(["--out", str(tmp_path / "t.json")]) == 2
    assert "needs CUDA GPUs" in capsys.readouterr().err
