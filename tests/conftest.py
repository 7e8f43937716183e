"""Fixtures shared by the whole suite, and the Triton mode.

Without CUDA, Triton kernels run under its CPU interpreter. The mode is fixed
when Triton is first imported (its own ``@triton.jit`` helpers such as
``tl.cdiv`` are built then), and test modules of any directory may import it
while they are collected (the benchmarks, transformers), so
``TRITON_INTERPRET`` is set here, before any test module is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loomserve.shared.model_files import default_model_path as _default_model_path

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model, fetched by `make test` before pytest starts."""
    return _default_model_path(download=False)
