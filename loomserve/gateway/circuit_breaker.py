"""A circuit breaker for the gateway's calls to Redis (API keys, rate limits)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class CircuitBreaker:
    """Stops calls to a failing dependency for a back-off, then lets one probe through.

    closed --failure--> open (back-off) --elapsed--> one probe --success--> closed
                                                         \\--failure--> open (back-off doubled, capped)

    Failures of calls that were already in flight when it opened change nothing, so
    an outage logs one warning per back-off however many requests were waiting.
    """

    def __init__(self, name: str, base_backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self._backoff_s = base_backoff_s
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        if self._open_until is None:
            return True
        if self._probing or self.clock() < self._open_until:
            return False
        self._probing = True
        return True

    def retry_after_s(self) -> float:
        if self._open_until is None:
            return 0.0
        return max(self._open_until - self.clock(), self.base_backoff_s)

    def record_success(self) -> None:
        if self._open_until is not None:
            log.info("%s: reachable again", self.name)
        self._open_until = None
        self._probing = False
        self._backoff_s = self.base_backoff_s

    def record_failure(self, error: BaseException) -> None:
        if self._open_until is not None and not self._probing:
            return
        if self._probing:
            self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
        self._probing = False
        self._open_until = self.clock() + self._backoff_s
        log.warning("%s: unavailable (%s: %s); not trying again for %.1fs", self.name,
                    type(error).__name__, error, self._backoff_s)

    def record_abandoned(self) -> None:
        """A call was cancelled before it could tell: let the next caller probe instead."""
        self._probing = False
