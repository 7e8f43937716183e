"""The gateway's listening socket when several gateway processes share one port."""

from __future__ import annotations

import errno
import socket

import pytest

from loomserve.gateway.server import shared_listening_socket


def _accept_all(listener: socket.socket) -> int:
    listener.setblocking(False)
    accepted = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return accepted
        conn.close()
        accepted += 1


def test_gateways_with_reuse_port_share_one_port_and_its_connections() -> None:
    first = shared_listening_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = shared_listening_socket("127.0.0.1", port)
    with first, second:
        assert second.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        first.listen()
        second.listen()
        with socket.socket() as plain, pytest.raises(OSError) as taken:
            plain.bind(("127.0.0.1", port))  # a socket without SO_REUSEPORT cannot join
        assert taken.value.errno == errno.EADDRINUSE
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
        try:
            # connect() returns once the kernel queued the connection on one listener
            counts = (_accept_all(first), _accept_all(second))
        finally:
            for client in clients:
                client.close()
    assert sum(counts) == 64
    assert min(counts) > 0, f"the kernel gave every connection to one socket: {counts}"
