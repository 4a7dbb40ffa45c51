"""Free TCP ports on loopback for the servers we start (the local Ray's dashboard, Serve's proxy, moto_server).

Not the usual bind-to-0: that port comes from the kernel's ephemeral range, and between our check and the
server's own bind any process's next outgoing connection may be handed it. That happened in CI: a local
Ray's dashboard "Failed to bind to 127.0.0.1:36405 because it's already occupied" while the suite's other
Ray opened connections. Ports below the ephemeral range are never handed out implicitly, only taken by
an explicit bind, so a free one stays free unless another process picks the same number.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

# Below Linux's default ephemeral range (32768-60999) and above Ray's worker ports (10002-19999 by default),
# which other Ray instances on the machine bind explicitly.
_LOW, _HIGH = 20000, 32768
_TRIES = 200
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that nothing on `host` listens on now, outside the kernel's ephemeral range."""
    candidates = _candidates()
    rng = random.SystemRandom()
    found: list[int] = []
    for _ in range(_TRIES):
        if len(found) == n or not candidates:
            break
        port = rng.choice(candidates)
        if port not in found and _bindable(host, port):
            found.append(port)
    while len(found) < n:  # no room outside the ephemeral range: the kernel's choice, as a last resort
        with socket.socket() as s:
            s.bind((host, 0))
            if s.getsockname()[1] not in found:
                found.append(s.getsockname()[1])
    return found


def _candidates() -> list[int]:
    lo, hi = _ephemeral_range()
    return [p for p in range(_LOW, _HIGH) if not lo <= p <= hi]


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in _EPHEMERAL.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; other systems' ranges lie above _HIGH too (IANA: 49152-65535)


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0,
                   host: str = "127.0.0.1") -> None:
    """Return once `proc` (the server we started on `port`) accepts connections; raise if it exits or is slow."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited at start (exit code {proc.returncode})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s") from None
            time.sleep(0.1)
