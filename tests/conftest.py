"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.model_files import default_model_path as _default_model_path


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model, fetched by `make test` before pytest starts."""
    return _default_model_path(download=False)
