"""One rank of a worker group: receives plans from the scheduler, runs them, answers.

Start-up: resolve the device, join the tensor-parallel group (if there is more
than one rank), ask the scheduler for its step limits (``WorkerHello``, answered by
``StepLimits``: the most tokens and sequences of a plan), load this rank's share of
the model, size the activation reserve, the KV cache and the CUDA graphs by those
limits, then send ``WorkerReady``. Every rank receives every plan; rank 0 alone
answers with the ``StepResult``.

A plan marked ``lookahead`` is launched and held: its tokens are read and
answered only when the next message comes, after the next plan's forward pass
is queued behind it (or at once for a ``Flush``), so the GPU runs the next
step while this process reads the tokens and the scheduler plans the one after.

A step that raises is reported as ``WorkerFailure`` (the scheduler fails the
in-flight requests). A group of one then drops all request state and registers
again, so one bad batch does not take the service down. A rank of a larger
group exits instead: the other ranks may be waiting in a collective that will
never complete, so its launcher (``worker.group``) stops the whole group and
whoever supervises it starts a fresh one.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec
import torch
import zmq

from loomserve.shared import messages as m
from loomserve.shared.config import WorkerConfig
from loomserve.shared.model_files import resolve_model
from loomserve.shared.process import install_stop_handler, parent_watchdog
from loomserve.shared.tracing import (
    context_from_traceparent,
    record_span,
    setup_tracing,
    shutdown_tracing,
    tracing_enabled,
)
from loomserve.worker.device import DeviceInfo
from loomserve.worker.model_runner import LaunchedStep, ModelRunner
from loomserve.worker.parallel import destroy_tensor_parallel, init_tensor_parallel

log = logging.getLogger(__name__)

# Fault injection for the crash tests: raise inside the forward pass of this step.
_FAIL_AT_STEP_ENV = "LOOMSERVE_INJECT_FAILURE_AT_STEP"


class StepFailed(RuntimeError):
    """A rank of a group of several could not run a step; it leaves the group."""


class WorkerServer:
    def __init__(self, config: WorkerConfig, model_path: Path, rank: int = 0) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = DeviceInfo.resolve(config)
        if device.is_cuda:
            torch.cuda.set_device(device.device)  # Triton launches and NCCL use the current device
        if config.tp > 1 and config.dist_init_address is None:
            raise ValueError("a rank of a worker group needs --dist-init-address (host:port of the rendezvous)")
        self.tp = init_tensor_parallel(rank, config.tp, config.dist_init_address or "", device.device)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(config.scheduler_address)
        self._encoder = m.encoder()
        limits = self._step_limits()
        self.runner = ModelRunner(config, model_path, device, limits, use_cuda_graphs=not config.enforce_eager,
                                  tp=self.tp)
        if device.is_cuda and not config.num_threads:
            # A GPU worker's host tensors are small; torch's thread pool only makes its threads
            # wait for each other on a host that also runs gateways and clients.
            torch.set_num_threads(1)
        self.device_name = device.describe()
        self.model_name = model_path.name if config.load_format != "dummy" else str(config.model)
        self._stopping = False
        # The last lookahead plan, launched and sampled, not answered yet.
        self._held: tuple[m.BatchPlan, LaunchedStep, int] | None = None
        fail_at = os.environ.get(_FAIL_AT_STEP_ENV)
        self._fail_at_step = int(fail_at) if fail_at else None

    def stop(self) -> None:
        self._stopping = True

    def _send(self, msg: m.WorkerHello | m.WorkerReady | m.StepResult | m.WorkerFailure) -> None:
        self._sock.send(self._encoder.encode(msg))

    def _receive(self, timeout_ms: int) -> m.SchedulerToWorker | None:
        """The scheduler's next message, or None if none came in time or it did not decode."""
        if not self._sock.poll(timeout_ms):
            return None
        frame = self._sock.recv()
        try:
            return m.scheduler_to_worker.decode(frame)
        except msgspec.DecodeError as e:
            log.warning("dropped an undecodable scheduler frame (%d bytes): %s", len(frame), e)
            return None

    def _step_limits(self) -> m.StepLimits:
        """The scheduler's answer to this rank's ``WorkerHello``; waits for the scheduler to
        come up (ZeroMQ delivers the hello once it binds)."""
        self._send(m.WorkerHello(rank=self.tp.rank, world_size=self.tp.size))
        started = time.monotonic()
        next_note = started + 30
        while not isinstance(msg := self._receive(1000), m.StepLimits):
            if msg is not None:
                log.warning("ignored a %s that came before the step limits", type(msg).__name__)
            if time.monotonic() >= next_note:
                next_note += 30
                log.info("rank %d still waiting for the scheduler at %s (%.0f s)", self.tp.rank,
                         self.config.scheduler_address, time.monotonic() - started)
        log.info("scheduler's step limits: %d tokens, %d sequences", msg.max_num_batched_tokens, msg.max_num_seqs)
        return msg

    def _register(self) -> None:
        self._send(m.WorkerReady(
            rank=self.tp.rank,
            world_size=self.tp.size,
            num_kv_blocks=self.runner.num_blocks,
            block_size=self.runner.block_size,
            max_model_len=self.runner.max_model_len,
            model=self.model_name,
            device=self.device_name,
            graph_max_seqs=self.runner.graph_max_seqs,
        ))
        log.info("rank %d/%d ready on %s: %d KV blocks of %d tokens; registered with %s",
                 self.tp.rank, self.tp.size, self.device_name, self.runner.num_blocks, self.runner.block_size,
                 self.config.scheduler_address)

    def run(self) -> None:
        self._register()
        while not self._stopping:
            msg = self._receive(200)
            if msg is None:
                continue
            if isinstance(msg, m.Shutdown):
                log.info("shutdown requested by the scheduler")
                return
            if isinstance(msg, m.StepLimits):
                log.warning("ignored step limits sent after start-up")
                continue
            self._step(msg)

    def _step(self, msg: m.BatchPlan | m.Flush) -> None:
        step_id = msg.step_id if isinstance(msg, m.BatchPlan) else None
        try:
            launched = None
            if isinstance(msg, m.BatchPlan):
                if self._fail_at_step is not None and msg.step_id == self._fail_at_step:
                    self._fail_at_step = None
                    raise RuntimeError(f"failure injected at step {msg.step_id} ({_FAIL_AT_STEP_ENV})")
                started_ns = time.time_ns()
                launched = (msg, self.runner.launch(msg), started_ns)
            if self._held is not None:
                held, self._held = self._held, None
                step_id = held[0].step_id
                self._answer(*held)
            if launched is not None:
                plan, step, _ = launched
                step_id = plan.step_id
                self.runner.sample(step)
                if plan.lookahead:
                    self._held = launched
                else:
                    self._answer(*launched)
        except Exception as e:
            log.exception("step %s failed", step_id)
            self._send(m.WorkerFailure(self.tp.rank, f"{type(e).__name__}: {e}"))
            if self.tp.size > 1:
                raise StepFailed(f"rank {self.tp.rank} failed step {step_id}; leaving the group") from e
            self._held = None
            self.runner.reset()
            self._register()

    def _answer(self, plan: m.BatchPlan, step: LaunchedStep, started_ns: int) -> None:
        result = self.runner.finalize(step)
        if self.tp.rank == 0:
            if tracing_enabled():
                self._trace_step(plan, started_ns, time.time_ns())
            self._send(result)

    @staticmethod
    def _trace_step(plan: m.BatchPlan, start_ns: int, end_ns: int) -> None:
        """The step in which a traced request starts (its prefill), as a child of its scheduler span."""
        for new in plan.new_requests:
            if new.traceparent is not None:
                record_span("worker.step", start_ns, end_ns, context_from_traceparent(new.traceparent),
                            attributes={"loomserve.step_id": plan.step_id,
                                        "loomserve.batch_size": len(plan.num_scheduled_tokens),
                                        "loomserve.scheduled_tokens": plan.num_scheduled_tokens[new.request_id]},
                            tracer_name="loomserve.worker")

    def close(self) -> None:
        # A failure report must reach the scheduler before the process exits.
        self._sock.close(linger=1000)
        self._ctx.term()
        destroy_tensor_parallel(self.tp)


def serve_worker(config: WorkerConfig, rank: int = 0) -> None:
    """Run rank ``rank`` of the worker group in this process."""
    setup_tracing("loomserve-worker", config.otlp_endpoint)
    model_path = resolve_model(config.model) if config.load_format != "dummy" else Path(str(config.model))
    server = WorkerServer(config, model_path, rank)
    install_stop_handler(server.stop)
    parent_watchdog(int(os.environ.get("LOOMSERVE_SUPERVISOR_PID", "0")), server.stop)
    try:
        server.run()
    finally:
        server.close()
        shutdown_tracing()
        log.info("worker stopped")
