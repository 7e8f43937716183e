"""A worker without a model: it answers every ``BatchPlan`` at once, for measuring the rest.

It speaks the worker protocol exactly as ``worker/server.py`` does (a DEALER socket
connected to the scheduler's worker address, ``WorkerReady``, then one ``StepResult``
per plan), keeps per-request state the way ``worker/model_runner.py`` does (new requests
once, then diffs; finished ids dropped) and samples one token for every request whose
known tokens are all computed after the step. With the model gone, what is left to time
is the scheduler, the sockets and the gateway.

It also checks each plan at least as strictly as the real runner would fail on it, and
more where the protocol allows exactly one answer, so a benchmark run doubles as a test
of the scheduler's plans. A plan that fails a check is reported with ``WorkerFailure``;
the worker then drops its state and registers again, as the real worker does::

    request unknown              a cached or finished request it does not hold, or a
                                 scheduled id with no new or cached data in this plan
    progress out of step         a cached request's num_computed_tokens is not where the
                                 last step left it; a resumed request's tokens differ
                                 from the ones this worker holds
    tokens not known             a step computes past the request's known tokens or past
                                 the maximum model length
    blocks                       an id outside the KV cache, one twice in a table, a table
                                 too short for the tokens it must hold
    shared writes                two requests of one step write into the same block (one
                                 reading a block that another writes is fine: a forward pass
                                 writes every new key and value before attending)

Sampled tokens are ``--token-id`` (default " the" in SmolLM2's vocabulary, so that a
gateway streams visible text), or ``token-id + step_id % --token-span``. A request's
stop tokens are never sampled, unless ``--stop-after N`` asks for one once the request
has N output tokens.

    python -m bench.echo_worker --scheduler-address ipc:///tmp/x/worker.sock \\
        [--num-kv-blocks N] [--max-model-len L] [--delay-ms X]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import zmq

from loomserve.shared import messages as m
from loomserve.shared.process import install_stop_handler, parent_watchdog, setup_logging

log = logging.getLogger(__name__)

BLOCK_SIZE = 16
DEFAULT_TOKEN_ID = 260  # " the" in SmolLM2's vocabulary
DEFAULT_NUM_KV_BLOCKS = 65536
DEFAULT_MAX_MODEL_LEN = 8192
MODEL_NAME = "echo"


class PlanError(Exception):
    """A plan that the real runner could not run, or that breaks the worker protocol."""


@dataclass(frozen=True)
class EchoConfig:
    num_kv_blocks: int = DEFAULT_NUM_KV_BLOCKS
    block_size: int = BLOCK_SIZE
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    token_id: int = DEFAULT_TOKEN_ID
    token_span: int = 1  # sampled id = token_id + step_id % token_span
    stop_after: int | None = None  # sample a stop token once a request has this many outputs
    delay_ms: float = 0.0  # added to every step, as if a forward pass took that long


@dataclass
class _RequestState:
    token_ids: list[int]
    block_ids: list[int]
    stop_token_ids: frozenset[int]
    num_computed_tokens: int  # where the last step that scheduled it left it
    num_sampled: int = 0


class EchoRunner:
    """The model runner's bookkeeping without the model: plan in, checked, tokens out."""

    def __init__(self, config: EchoConfig) -> None:
        if config.num_kv_blocks < 1 or config.block_size < 1 or config.token_span < 1:
            raise ValueError(f"num_kv_blocks, block_size and token_span must be positive: {config}")
        self.config = config
        self.states: dict[str, _RequestState] = {}

    def reset(self) -> None:
        self.states.clear()

    def execute(self, plan: m.BatchPlan) -> m.StepResult:
        """Apply the plan to the request states and sample; raise PlanError on a bad plan."""
        for request_id in plan.finished_request_ids:
            if self.states.pop(request_id, None) is None:
                raise PlanError(f"finished request {request_id} is not known to this worker")
        for src, dst in plan.block_copies:
            self._check_new_blocks(f"block copy ({src}, {dst})", [], [src, dst])
        start = self._apply_new(plan.new_requests)
        self._apply_cached(plan.cached_requests, start)
        return self._sample(plan, start)

    def _apply_new(self, new_requests: list[m.NewRequestData]) -> dict[str, int]:
        start: dict[str, int] = {}
        for new in new_requests:
            request_id = new.request_id
            if request_id in start:
                raise PlanError(f"request {request_id} is new twice in one plan")
            if not 0 <= new.num_computed_tokens < len(new.token_ids):
                raise PlanError(f"new request {request_id}: {new.num_computed_tokens} computed tokens "
                                f"of {len(new.token_ids)} known")
            if len(new.token_ids) > self.config.max_model_len:
                raise PlanError(f"new request {request_id} has {len(new.token_ids)} tokens, more than "
                                f"the maximum model length {self.config.max_model_len}")
            self._check_new_blocks(f"new request {request_id}", [], new.block_ids)
            state = self.states.get(request_id)
            if state is None:
                self.states[request_id] = _RequestState(
                    list(new.token_ids), list(new.block_ids), frozenset(new.sampling.stop_token_ids),
                    new.num_computed_tokens)
            else:
                # Resumed after preemption: the scheduler rebuilds the request from the tokens
                # it was told about, which are exactly the ones this worker sampled.
                if new.token_ids != state.token_ids:
                    raise PlanError(f"resumed request {request_id} has other tokens than this worker holds")
                state.block_ids = list(new.block_ids)
                state.num_computed_tokens = new.num_computed_tokens
            start[request_id] = new.num_computed_tokens
        return start

    def _apply_cached(self, cached_requests: list[m.CachedRequestData], start: dict[str, int]) -> None:
        states = self.states
        for cached in cached_requests:
            request_id = cached.request_id
            state = states.get(request_id)
            if state is None:
                raise PlanError(f"cached request {request_id} is not known to this worker")
            if request_id in start:
                raise PlanError(f"request {request_id} is listed twice in one plan")
            if cached.num_computed_tokens != state.num_computed_tokens:
                raise PlanError(f"cached request {request_id} says {cached.num_computed_tokens} tokens are "
                                f"computed; the last step left {state.num_computed_tokens}")
            if cached.new_block_ids:
                self._check_new_blocks(f"cached request {request_id}", state.block_ids, cached.new_block_ids)
                state.block_ids.extend(cached.new_block_ids)
            start[request_id] = cached.num_computed_tokens

    def _sample(self, plan: m.BatchPlan, start: dict[str, int]) -> m.StepResult:
        # This loop runs once per scheduled request and its time counts in every benchmark
        # built on this worker, hence the locals and the one-block fast path of a decode.
        block_size = self.config.block_size
        max_model_len = self.config.max_model_len
        step_token = self.config.token_id + plan.step_id % self.config.token_span
        plain_tokens = self.config.stop_after is None
        states = self.states
        writers: dict[int, str] = {}  # block id -> the request writing into it this step
        request_ids: list[str] = []
        sampled: list[list[int]] = []
        for request_id, num_new in plan.num_scheduled_tokens.items():
            begin = start.get(request_id)
            if begin is None:
                raise PlanError(f"request {request_id} is scheduled without new or cached data in this plan")
            state = states[request_id]
            token_ids = state.token_ids
            block_ids = state.block_ids
            end = begin + num_new
            if num_new < 1 or end > len(token_ids) or end > max_model_len:
                raise PlanError(f"request {request_id}: {num_new} tokens from {begin} scheduled, "
                                f"{len(token_ids)} known, maximum model length {max_model_len}")
            if len(block_ids) * block_size < end:
                raise PlanError(f"request {request_id}: {len(block_ids)} blocks cannot hold {end} tokens")
            first, last = begin // block_size, (end - 1) // block_size
            written = (block_ids[first],) if first == last else block_ids[first : last + 1]
            for block_id in written:
                writer = writers.setdefault(block_id, request_id)
                if writer != request_id:
                    raise PlanError(f"requests {writer} and {request_id} both write into block {block_id}")
            state.num_computed_tokens = end
            if end == len(token_ids):
                token_id = step_token if plain_tokens and not state.stop_token_ids else self._next_token(
                    step_token, state)
                token_ids.append(token_id)
                state.num_sampled += 1
                request_ids.append(request_id)
                sampled.append([token_id])
        return m.StepResult(step_id=plan.step_id, request_ids=request_ids, sampled_token_ids=sampled)

    def _next_token(self, step_token: int, state: _RequestState) -> int:
        stop_after = self.config.stop_after
        if stop_after is not None and state.num_sampled >= stop_after and state.stop_token_ids:
            return min(state.stop_token_ids)
        token_id = step_token
        while token_id in state.stop_token_ids:
            token_id += 1
        return token_id

    def _check_new_blocks(self, what: str, table: list[int], new_ids: list[int]) -> None:
        """``new_ids`` join ``table``: each inside the KV cache, and no block twice."""
        if not new_ids:
            return
        num_blocks = self.config.num_kv_blocks
        if min(new_ids) < 0 or max(new_ids) >= num_blocks:
            raise PlanError(f"{what}: a block id outside the KV cache of {num_blocks} blocks in {new_ids}")
        new_set = set(new_ids)
        if len(new_set) != len(new_ids) or not new_set.isdisjoint(table):
            raise PlanError(f"{what}: a block appears twice in {table} + {new_ids}")


class EchoWorkerServer:
    """The socket side, the same as ``worker.server.WorkerServer`` with ``EchoRunner`` inside."""

    def __init__(self, scheduler_address: str, config: EchoConfig) -> None:
        self.config = config
        self.runner = EchoRunner(config)
        self._scheduler_address = scheduler_address
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(scheduler_address)
        self._encoder = m.encoder()
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def _send(self, msg: m.WorkerReady | m.StepResult | m.WorkerFailure) -> None:
        self._sock.send(self._encoder.encode(msg))

    def _register(self) -> None:
        self._send(m.WorkerReady(
            rank=0,
            world_size=1,
            num_kv_blocks=self.config.num_kv_blocks,
            block_size=self.config.block_size,
            max_model_len=self.config.max_model_len,
            model=MODEL_NAME,
            device="none (echo worker)",
        ))
        log.info("echo worker ready: %d KV blocks of %d tokens, max model length %d, %.1f ms a step; "
                 "registered with %s", self.config.num_kv_blocks, self.config.block_size,
                 self.config.max_model_len, self.config.delay_ms, self._scheduler_address)

    def run(self) -> None:
        self._register()
        while not self._stopping:
            if not self._sock.poll(200):
                continue
            frame = self._sock.recv()
            try:
                msg = m.scheduler_to_worker.decode(frame)
            except msgspec.DecodeError as e:
                log.warning("dropped an undecodable scheduler frame (%d bytes): %s", len(frame), e)
                continue
            if isinstance(msg, m.Shutdown):
                log.info("shutdown requested by the scheduler")
                return
            if isinstance(msg, m.BatchPlan):  # a Flush asks for nothing: every plan is answered at once
                self._step(msg)

    def _step(self, plan: m.BatchPlan) -> None:
        started = time.perf_counter()
        try:
            result = self.runner.execute(plan)
        except Exception as e:
            log.exception("step %d failed", plan.step_id)
            self._send(m.WorkerFailure(0, f"{type(e).__name__}: {e}"))
            self.runner.reset()
            self._register()
            return
        host_ms = (time.perf_counter() - started) * 1000.0
        if self.config.delay_ms > 0:  # the device time this worker stands in for
            time.sleep(max(0.0, started + self.config.delay_ms / 1000.0 - time.perf_counter()))
        forward_ms = (time.perf_counter() - started) * 1000.0
        self._send(msgspec.structs.replace(result, forward_ms=forward_ms, host_ms=host_ms,
                                           wait_ms=forward_ms - host_ms))

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_worker",
                                     description="A worker that answers every plan at once, without a model.")
    parser.add_argument("--scheduler-address", required=True, help="ZeroMQ address of the scheduler's worker socket")
    parser.add_argument("--num-kv-blocks", type=int, default=DEFAULT_NUM_KV_BLOCKS,
                        help="KV blocks to announce (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN,
                        help="longest sequence to announce (default: %(default)s)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="time every step takes (default: 0)")
    parser.add_argument("--token-id", type=int, default=DEFAULT_TOKEN_ID,
                        help="the token sampled (default: %(default)s)")
    parser.add_argument("--token-span", type=int, default=1,
                        help="sample token-id + step_id %% span instead (default: 1, always token-id)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="sample a request's stop token once it has this many output tokens (default: never)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging("echo-worker")
    config = EchoConfig(
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        token_id=args.token_id,
        token_span=args.token_span,
        stop_after=args.stop_after,
        delay_ms=args.delay_ms,
    )
    server = EchoWorkerServer(args.scheduler_address, config)
    install_stop_handler(server.stop)
    parent_watchdog(int(os.environ.get("LOOMSERVE_SUPERVISOR_PID", "0")), server.stop)
    try:
        server.run()
    finally:
        server.close()
        log.info("echo worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
