"""A request as the scheduler sees it: token ids, progress and state. No torch here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loomserve.shared.messages import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; recomputes its tokens later
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    """One sequence being generated.

    ``token_ids`` is the prompt followed by every output token received so far;
    ``num_pending`` more are being sampled by plans in flight (asynchronous
    scheduling). ``num_computed_tokens`` counts the tokens whose keys and values
    are in the KV cache once the plans sent so far have run: it advances when a
    plan is made, and may count pending tokens.
    ``block_hashes`` holds the hash of each *full* block of ``token_ids``, filled
    in by the KV cache manager as blocks fill up (prefix caching).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float = 0.0  # seconds; orders the queue (wall clock of the receiving gateway)
    queue_deadline: float | None = None  # same clock: fail if still waiting (never started) then
    priority: int = 0
    cache_salt: str = ""
    traceparent: str | None = None
    # Parallel sampling: a parent of n > 1 choices until it is forked; a choice points at its parent.
    n: int = 1
    parent: Request | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    # Set at admission: the length (prompt + outputs) at which it ends with "length".
    max_num_tokens: int = 0
    # Wall-clock times (ns) for the request's trace: first admitted, first token, preempted.
    first_scheduled_ns: int | None = None
    first_token_ns: int | None = None
    preempted_ns: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
