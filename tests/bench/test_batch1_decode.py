"""bench.batch1_decode needs a GPU to time anything; here, what runs without one."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench.batch1_decode import VARIANTS, format_table, main, parse_gemv_config, variants
from loomserve.kernels.gemv import GemvConfig


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_main_needs_a_gpu(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "b.json")]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_table_has_a_row_per_variant():
    row = {"median_step_ms": 4.0, "tokens_per_s": 250.0, "fraction_of_roofline": 0.8, "roofline_tokens_per_s": 312.5}
    table = format_table([{"shape": "llama-3.1-8b", "runs": {key: [] for key in VARIANTS},
                           **{name: row for name in VARIANTS}}])
    lines = table.splitlines()
    assert len(lines) == 1 + len(VARIANTS)
    assert "cublas+pdl" in table and "gemv+pdl+fused-kv" in table and "80.0%" in table and "1.00x" in table


def test_gemv_configs_become_variants():
    assert parse_gemv_config("2x2048x4") == GemvConfig(2, 2048, 4)
    for bad in ("2x2048", "0x16x4", "ax16x4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_gemv_config(bad)
    chosen = variants([GemvConfig(2, 2048, 4)])
    assert list(chosen)[: len(VARIANTS)] == list(VARIANTS)
    variant = chosen["gemv 2x2048x4"]
    assert variant.pdl and variant.fused_kv_write
    assert variant.matmul.keywords == {"config": GemvConfig(2, 2048, 4)}  # type: ignore[attr-defined]
    assert not chosen["cublas"].pdl and not chosen["cublas"].fused_kv_write
