"""Fixtures of the worker tests."""

from __future__ import annotations

import pytest
import torch

from loomserve.worker.cuda_graphs import LateTokens


@pytest.fixture
def late_token_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of input ids each ``LateTokens.fill`` takes from the device, in call order
    (asynchronous scheduling: decodes continuing from tokens the host has not seen yet)."""
    rows: list[int] = []
    fill = LateTokens.fill

    def counted_fill(late: LateTokens, input_ids: torch.Tensor) -> None:
        rows.append(len(late.rows))
        fill(late, input_ids)

    monkeypatch.setattr(LateTokens, "fill", counted_fill)
    return rows
