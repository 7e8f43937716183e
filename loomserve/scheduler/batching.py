"""When waiting requests may join the running ones (``--batching``).

    continuous  every step, as far as the token budget, seats and KV blocks go
                (iteration-level batching)
    static      only into an empty engine, and then a whole batch at once, even past
                the step's token budget: the prompts it could not compute are prefilled
                over the next steps. The slots of requests that end stay empty until the
                whole batch has ended: the naive baseline continuous batching is held against.

Either way, no request is admitted in a step that preempted one: it would only evict again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class BatchingPolicy(ABC):
    # Whether admission goes on once the step's token budget is spent: a request admitted
    # then takes its seat and blocks now and has its prompt computed from the next step on.
    admits_past_budget: bool = False

    @abstractmethod
    def may_admit(self, num_running: int) -> bool:
        """Whether waiting requests may join the ``num_running`` running ones this step."""


class ContinuousBatching(BatchingPolicy):
    def may_admit(self, num_running: int) -> bool:
        return True


class StaticBatching(BatchingPolicy):
    admits_past_budget = True

    def may_admit(self, num_running: int) -> bool:
        return num_running == 0


BATCHING_POLICIES: dict[str, type[BatchingPolicy]] = {"continuous": ContinuousBatching, "static": StaticBatching}


def batching_policy(name: str) -> BatchingPolicy:
    """The policy named by ``SchedulerConfig.batching``."""
    if name not in BATCHING_POLICIES:
        raise ValueError(f"unknown batching {name!r}; choose one of {tuple(BATCHING_POLICIES)}")
    return BATCHING_POLICIES[name]()
