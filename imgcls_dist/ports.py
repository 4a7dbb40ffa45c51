"""A free TCP port on loopback, for servers started by benchmarks and tests (Serve's proxy, moto_server)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    # Bind to port 0 and let the kernel choose; the port is free again once the socket closes.
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
