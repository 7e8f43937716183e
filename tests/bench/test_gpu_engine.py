"""bench.gpu_engine needs a GPU to measure anything; here, what runs without one (its engine
driver is tested in tests/bench/harness/test_engine.py)."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_engine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_main_needs_a_gpu(tmp_path, capsys) -> None:
    assert gpu_engine.main(["--out", str(tmp_path / "e.json")]) == 2
    assert "bench.gpu_engine needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_table_has_a_line_per_rag_run() -> None:
    run = {"output_tokens_per_s": 1234.0, "ttft_p50_s": 0.5, "ttft_p95_s": 1.5, "duration_s": 10.0, "steps": 100,
           "eager_steps": 3, "eager_steps_s": 0.2}
    batch1 = {"tokens_per_s": 500.0, "roofline_tokens_per_s": 800.0}
    shape: dict[str, object] = {
        "shape": "llama-3.2-1b",
        "batch1_decode": {"cuda_graphs": batch1, "eager": batch1},
        "rag": {"num_requests": 8, "max_num_seqs": 2, "max_output_len": 64, "num_outputs_capped": 1,
                "runs": {"continuous_cuda_graphs": run, "static_cuda_graphs": run}},
    }
    lines = gpu_engine.format_table([shape], "NVIDIA H100").splitlines()
    assert lines[0] == "device: NVIDIA H100"
    assert "graphs 500.0, eager 500.0, roofline 800.0" in lines[1]
    assert [line.split()[0] for line in lines[-2:]] == ["continuous_cuda_graphs", "static_cuda_graphs"]
