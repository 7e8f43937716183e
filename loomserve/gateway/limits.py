"""Per-minute rate limits, as configured for a tenant or an API key.

A record of its own so that the key store (which reads limits from key records)
and the rate limiter (which enforces them) both depend on it, not on each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Per-minute limits; None means unlimited. A burst left out equals its per-minute limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    request_burst: int | None = None
    token_burst: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer, not {value!r}")
        if self.request_burst is not None and self.requests_per_minute is None:
            raise ValueError("request_burst needs requests_per_minute")
        if self.token_burst is not None and self.tokens_per_minute is None:
            raise ValueError("token_burst needs tokens_per_minute")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown limit fields {unknown}; known: {sorted(known)}")
        return cls(**data)
