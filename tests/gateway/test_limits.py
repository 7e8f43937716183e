"""The per-minute limits record: what it accepts and what it refuses."""

from __future__ import annotations

import pytest

from loomserve.gateway.limits import Limits


def test_limits_from_a_key_record() -> None:
    assert Limits.from_dict({}) == Limits()
    assert Limits.from_dict({"requests_per_minute": 60, "token_burst": 500, "tokens_per_minute": 9000}) == Limits(
        requests_per_minute=60, tokens_per_minute=9000, token_burst=500)


@pytest.mark.parametrize(("fields", "message"), [
    ({"requests_per_minute": 0}, "positive integer"),
    ({"tokens_per_minute": 1.5}, "positive integer"),
    ({"requests_per_minute": True}, "positive integer"),
    ({"request_burst": 5}, "request_burst needs requests_per_minute"),
    ({"token_burst": 5}, "token_burst needs tokens_per_minute"),
    ({"rpm": 5}, "unknown limit fields ['rpm']"),
])
def test_bad_limits_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        Limits.from_dict(fields)
    assert message in str(refused.value)
