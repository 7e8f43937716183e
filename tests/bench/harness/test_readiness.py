"""Waiting for a server's health: a real HTTP server in a thread, a real process group."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.harness.processes import ProcessGroup
from bench.harness.readiness import free_port, local_url, wait_healthy


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def healthy_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield local_url(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_free_port_can_be_bound() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_returns_once_healthy(healthy_url: str) -> None:
    with ProcessGroup() as group:
        wait_healthy(group, "server", healthy_url, timeout_s=5)


def test_times_out_with_the_log_tail() -> None:
    with ProcessGroup() as group:
        (group.runtime / "server.log").write_text("still loading")
        with pytest.raises(TimeoutError, match=r"server at .* was not healthy after 0 s:\nstill loading"):
            wait_healthy(group, "server", local_url(free_port()), timeout_s=0.3, interval_s=0.05)


def test_a_dead_process_fails_at_once() -> None:
    with ProcessGroup() as group:
        group.spawn("server", ["timeit", "-n", "1", "-r", "1", "raise SystemExit(1)"])
        group.procs["server"].wait(20)
        with pytest.raises(RuntimeError, match="server exited with code 1"):
            wait_healthy(group, "server", local_url(free_port()), timeout_s=60)
