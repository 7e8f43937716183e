"""The batching policies alone: when waiting requests may join, and whether past the budget."""

from __future__ import annotations

import pytest

from loomserve.scheduler.batching import ContinuousBatching, StaticBatching, batching_policy


def test_continuous_batching_admits_every_step_within_the_budget() -> None:
    policy = batching_policy("continuous")
    assert isinstance(policy, ContinuousBatching)
    assert policy.may_admit(0) and policy.may_admit(7)
    assert not policy.admits_past_budget


def test_static_batching_admits_a_whole_batch_into_an_empty_engine_only() -> None:
    policy = batching_policy("static")
    assert isinstance(policy, StaticBatching)
    assert policy.may_admit(0)
    assert not policy.may_admit(1)
    assert policy.admits_past_budget


def test_an_unknown_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown batching 'dynamic'"):
        batching_policy("dynamic")
