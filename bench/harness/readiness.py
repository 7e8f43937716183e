"""Waiting for an HTTP server that a benchmark started to answer, on a port of its own."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx

from bench.harness.processes import ProcessGroup


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def wait_healthy(group: ProcessGroup, name: str, base_url: str, timeout_s: float, interval_s: float = 0.25) -> None:
    """Poll ``GET /health`` until it answers 200. Fails at once if a process of ``group`` exits,
    and after ``timeout_s`` with the log tail of process ``name``."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while True:
            group.check_alive()
            with contextlib.suppress(httpx.TransportError):
                if client.get("/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} at {base_url} was not healthy after {timeout_s:.0f} s:\n"
                                   f"{group.log_tail(name)}")
            time.sleep(interval_s)
