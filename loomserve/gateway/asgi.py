"""Plain ASGI pieces: an SSE response and a race against client disconnect.

Both listen for ``http.disconnect`` themselves rather than trusting
``Request.is_disconnected`` (which middleware can hide) or waiting for the next
write to fail (which can be long while a request waits in the queue): the
moment the client goes away, the generating task is cancelled, and its
``finally`` aborts the request in the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


class SSEResponse(Response):
    """``text/event-stream`` from an async iterator of ready-made ``data: ...`` events."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})
        # The body streams: no content-length (the base class sets one for its empty body).
        self.raw_headers = [h for h in self.raw_headers if h[0] != b"content-length"]
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def stream() -> None:
            try:
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                return  # the client went away while we wrote
            finally:
                aclose: Any = getattr(self.events, "aclose", None)
                if aclose is not None:
                    await aclose()

        with contextlib.suppress(ClientDisconnected):
            await race_disconnect(receive, stream())
