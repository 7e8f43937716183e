"""The command line every benchmark shares."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from bench.harness.cli import add_out, add_output_json, cuda_available, new_parser, progress, setup_logging

DOC = """First paragraph, which describes
the benchmark.

    python -m bench.x --out r.json
"""


def test_parser_names_the_module_and_its_first_paragraph() -> None:
    parser = new_parser("bench.x", DOC)
    assert parser.prog == "python -m bench.x"
    assert parser.description == "First paragraph, which describes\nthe benchmark."
    assert new_parser("bench.x", DOC, whole_doc=True).description == DOC


def test_result_file_options() -> None:
    parser = new_parser("bench.x", DOC)
    add_out(parser)
    add_output_json(parser)
    args = parser.parse_args(["--out", "a/r.json"])
    assert (args.out, args.output_json) == (Path("a/r.json"), None)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --out is required


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert not cuda_available("bench.x", "CUDA GPUs")
    assert capsys.readouterr().err == "bench.x needs CUDA GPUs\n"


def test_progress_lines_carry_the_elapsed_time(capsys: pytest.CaptureFixture[str]) -> None:
    progress("warm-up done")
    assert re.fullmatch(r"\[ *\d+\.\d s\] warm-up done\n", capsys.readouterr().out)


def test_logging_keeps_httpx_quiet() -> None:
    setup_logging()
    assert logging.getLogger("httpx").level == logging.WARNING
