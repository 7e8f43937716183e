"""The gateway's side of the scheduler socket.

One DEALER socket per gateway process, used only from the event loop. A
background task receives ``RequestOutputs`` and routes each output to the
queue of its request; another polls the scheduler's status every second, which
is what ``/health`` reports. If the scheduler stops answering, or its
connection drops, every open stream ends with an error instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from loomserve.shared import messages as m

log = logging.getLogger(__name__)

_STATUS_INTERVAL_S = 1.0
_STATUS_STALE_S = 5.0


class EngineError(Exception):
    """The engine could not serve a request; ``error.status`` is the HTTP status."""

    def __init__(self, error: m.ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


class EngineClient:
    def __init__(self, scheduler_address: str) -> None:
        self.scheduler_address = scheduler_address
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(scheduler_address)
        self._encoder = m.encoder()
        self._streams: dict[str, asyncio.Queue[m.RequestOutput]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._nonce = itertools.count(1)
        self._control: dict[int, asyncio.Future[m.ControlReply]] = {}
        self.status: m.SchedulerStatus | None = None
        self._status_time = 0.0

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="engine-receive"),
            asyncio.create_task(self._status_loop(), name="engine-status"),
            asyncio.create_task(self._monitor_loop(), name="engine-monitor"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()

    # -- health --------------------------------------------------------------

    def engine_problem(self) -> str | None:
        """None when the scheduler answers and its workers are ready; else why not."""
        if self.status is None:
            return f"the scheduler at {self.scheduler_address} has not answered yet"
        if time.monotonic() - self._status_time > _STATUS_STALE_S:
            return f"the scheduler at {self.scheduler_address} stopped answering"
        if not self.status.workers_ready:
            return f"the worker group is down: {self.status.error}" if self.status.error else \
                "the worker group is still starting"
        return None

    # -- requests ------------------------------------------------------------

    async def generate(self, request: m.AddRequest) -> AsyncGenerator[m.RequestOutput, None]:
        """Yield the request's outputs until each of its choices finished; an output's
        ``request_id`` names its choice (``m.choice_request_ids``). An error ends the whole
        request with EngineError. Leaving early (client gone, stop string found) aborts
        what still runs in the scheduler."""
        queue: asyncio.Queue[m.RequestOutput] = asyncio.Queue()
        unfinished = set(m.choice_request_ids(request.request_id, request.n))
        for output_id in unfinished:
            self._streams[output_id] = queue
        try:
            await self._sock.send(self._encoder.encode(request))
            while unfinished:
                out = await queue.get()
                if out.finish_reason is not None:
                    unfinished.discard(out.request_id)
                    if out.error is not None and out.finish_reason == "error":
                        raise EngineError(out.error)
                yield out
        finally:
            for output_id in m.choice_request_ids(request.request_id, request.n):
                del self._streams[output_id]
            if unfinished:
                await self.abort([request.request_id])

    async def abort(self, request_ids: list[str]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self._sock.send(self._encoder.encode(m.AbortRequest(request_ids)))

    async def reset_prefix_cache(self, timeout_s: float = 5.0) -> m.ControlReply:
        """Ask the scheduler to forget every cached prefix block."""
        nonce = next(self._nonce)
        waiter: asyncio.Future[m.ControlReply] = asyncio.get_running_loop().create_future()
        self._control[nonce] = waiter
        try:
            await self._sock.send(self._encoder.encode(m.ResetPrefixCache(nonce)))
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            return m.ControlReply(nonce, False, "the scheduler did not answer")
        finally:
            self._control.pop(nonce, None)

    def _fail_all(self, message: str) -> None:
        error = m.ErrorInfo(503, message, "engine_error")
        for request_id, queue in self._streams.items():
            queue.put_nowait(m.RequestOutput(request_id, [], "error", error=error))

    # -- background tasks ----------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                msg = m.scheduler_to_gateway.decode(frame)
            except msgspec.DecodeError as e:
                log.warning("dropped an undecodable scheduler frame (%d bytes): %s", len(frame), e)
                continue
            if isinstance(msg, m.SchedulerStatus):
                self.status = msg
                self._status_time = time.monotonic()
                continue
            if isinstance(msg, m.ControlReply):
                waiter = self._control.pop(msg.nonce, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
                continue
            for out in msg.outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(zmq.ZMQError):
                await self._sock.send(self._encoder.encode(m.StatusQuery(next(self._nonce))))
            await asyncio.sleep(_STATUS_INTERVAL_S)
            if self._streams and time.monotonic() - self._status_time > _STATUS_STALE_S:
                self._fail_all(f"the scheduler at {self.scheduler_address} stopped answering")

    async def _monitor_loop(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                log.error("lost the connection to the scheduler at %s", self.scheduler_address)
                self.status = None
                self._fail_all(f"lost the connection to the scheduler at {self.scheduler_address}")
