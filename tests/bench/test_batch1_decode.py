"""bench.batch1_decode needs a GPU to time anything; here, what runs without one."""

from __future__ import annotations

import pytest
import torch

from bench.batch1_decode import VARIANTS, format_table, main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_main_needs_a_gpu(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "b.json")]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_table_has_a_row_per_variant():
    row = {"median_step_ms": 4.0, "tokens_per_s": 250.0, "fraction_of_roofline": 0.8, "roofline_tokens_per_s": 312.5}
    table = format_table([{"shape": "llama-3.1-8b", **{name: row for name in VARIANTS}}])
    lines = table.splitlines()
    assert len(lines) == 1 + len(VARIANTS)
    assert "cublas+pdl" in table and "gemv" in table and "80.0%" in table and "1.00x" in table
