"""Parallel sampling: a request of ``n`` > 1 choices prefills its prompt once, then forks::

    parent  P  tokens t0 .. t(L-2) computed, like any prompt (never sampled)
       | fork, at the start of the step after (or at admission, if nothing is left)
       v
    P#0 .. P#(n-1)   each computes t(L-1) and samples its own first token from there

The parent holds ``n`` of the ``max_num_seqs`` seats from its admission on. The
fork shares every full block; the partial last block, if any, is copied on
write for the first n-1 choices (``BatchPlan.block_copies``) and handed to the
last one. The choices are new requests to the worker, with their computed
tokens and block tables; from then on each is an ordinary request (it is
preempted and recomputed alone). Choice ``i`` of a seeded request samples with
``seed + i``.
"""

from __future__ import annotations

import msgspec

from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.request import Request, RequestStatus
from loomserve.shared.messages import ErrorInfo, choice_request_ids


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index``: ``seed + index``, wrapped past 2**64 (the sampler keeps
    a seed's low 64 bits; the wire carries at most 64)."""
    seed += index
    return seed - 2**64 if seed >= 2**64 else seed


class ParallelSampling:
    """The requests of n > 1 choices: parents not forked yet, the live choices of forked
    ones, and the seats running parents hold for their choices.

    The scheduler calls it where a request is admitted (``fit_error``, ``add``), starts
    running (``hold_seats``), stops running (``free_seats``) or ends (``forget``), and at
    the fork (``ready_to_fork``, ``num_copies``, ``fork``); a parent's id names its live
    choices (``choices``), so that aborting it ends them all.
    """

    def __init__(self, kv_cache: KVCacheManager) -> None:
        self.kv_cache = kv_cache
        self.parents: dict[str, Request] = {}  # not forked yet: waiting or running
        self.children: dict[str, list[Request]] = {}  # by parent id, until the last one ends
        self.num_reserved_seqs = 0  # seats held by running parents beyond their own: n - 1 each

    def fit_error(self, request: Request) -> ErrorInfo | None:
        """Why the n > 1 choices of ``request`` can never fit in the KV cache at once, or None."""
        if request.n == 1:
            return None
        # The choices share the prompt's full blocks (all but the last prompt token's);
        # each needs its own blocks from there to its end.
        block_size = self.kv_cache.block_size
        prompt_len = request.num_prompt_tokens
        total = prompt_len + request.sampling.max_tokens
        num_shared = (prompt_len - 1) // block_size
        num_blocks = num_shared + request.n * (-(-total // block_size) - num_shared)
        if num_blocks <= self.kv_cache.num_blocks:
            return None
        return ErrorInfo(
            400,
            f"n = {request.n} choices of {prompt_len} prompt tokens (shared) + "
            f"{request.sampling.max_tokens} max_tokens need {num_blocks} blocks of {block_size} tokens "
            f"and can never fit in the KV cache ({self.kv_cache.num_blocks} blocks, "
            f"{self.kv_cache.max_tokens_ever()} tokens); lower max_tokens or n",
        )

    def add(self, request: Request) -> None:
        """``request`` was queued: one of n > 1 choices waits for its fork."""
        if request.n > 1:
            self.parents[request.request_id] = request

    def hold_seats(self, request: Request) -> None:
        """``request`` started running: a parent takes the seats of all its choices."""
        if request.n > 1:
            self.num_reserved_seqs += request.n - 1

    def free_seats(self, request: Request) -> None:
        """``request`` stopped running (preempted or ended)."""
        if request.n > 1:
            self.num_reserved_seqs -= request.n - 1

    def ready_to_fork(self) -> list[Request]:
        """The running parents computed up to their last prompt token."""
        if not self.parents:
            return []
        running = RequestStatus.RUNNING
        return [p for p in self.parents.values()
                if p.status is running and p.num_computed_tokens == len(p.token_ids) - 1]

    def num_copies(self, parent: Request) -> int:
        """The free blocks that forking ``parent`` takes: a copy of its partial block per choice but one."""
        return parent.n - 1 if parent.num_computed_tokens % self.kv_cache.block_size else 0

    def fork(self, parent: Request) -> tuple[list[Request], list[tuple[int, int]]]:
        """Split ``parent``, computed up to its last prompt token, into its n running choices.

        Needs ``num_copies(parent)`` free blocks. Returns the choices, which hold the
        parent's blocks and progress from now on, and the ``(src, dst)`` block copies the
        workers must make before they run. The parent ends here, without an output of its own.
        """
        parent_id = parent.request_id
        children = []
        for index, child_id in enumerate(choice_request_ids(parent_id, parent.n)):
            sampling = parent.sampling
            if sampling.seed is not None:
                sampling = msgspec.structs.replace(sampling, seed=choice_seed(sampling.seed, index))
            children.append(Request(
                request_id=child_id, prompt_token_ids=parent.prompt_token_ids, sampling=sampling,
                arrival_time=parent.arrival_time, priority=parent.priority, cache_salt=parent.cache_salt,
                traceparent=parent.traceparent, status=RequestStatus.RUNNING,
                num_cached_tokens=parent.num_cached_tokens, max_num_tokens=parent.max_num_tokens,
                first_scheduled_ns=parent.first_scheduled_ns, parent=parent,
            ))
        copies: list[tuple[int, int]] = []
        for child in children[:-1]:
            child_copies = self.kv_cache.fork(parent, child)
            assert child_copies is not None, "the caller made num_copies(parent) blocks free"
            copies += child_copies
        self.kv_cache.transfer(parent, children[-1])
        del self.parents[parent_id]
        self.free_seats(parent)
        self.children[parent_id] = list(children)  # the caller may keep the returned list
        return children, copies

    def forget(self, request: Request) -> None:
        """``request`` ended: a parent before its fork, or one choice."""
        if request.n > 1:
            del self.parents[request.request_id]
        if request.parent is not None:
            siblings = self.children[request.parent.request_id]
            siblings.remove(request)
            if not siblings:
                del self.children[request.parent.request_id]

    def choices(self, parent_id: str) -> list[Request]:
        """The live choices of a forked request (none if it is not forked, or all ended)."""
        return list(self.children.get(parent_id, ()))

    def is_empty(self) -> bool:
        return not self.parents and not self.children and self.num_reserved_seqs == 0
