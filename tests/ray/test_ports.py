"""Ports for the servers we start come from outside the kernel's ephemeral range, where no other process's
outgoing connection can take them between our check and the server's bind (the CI failure: a local Ray's
dashboard found its port 36405, chosen by bind-to-0, already occupied)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from imgcls_dist import ports


def test_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    lo, hi = ports._ephemeral_range()
    got = ports.free_ports(20)
    assert len(set(got)) == 20
    for p in got:
        assert not lo <= p <= hi, p
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # raises if something holds it


def test_a_port_in_use_is_never_handed_out(monkeypatch):
    held = []
    for _ in range(50):  # three consecutive free ports below the ephemeral range
        base = ports.free_port()
        try:
            for p in (base, base + 1, base + 2):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                held.append(s)
            break
        except OSError:
            for s in held:
                s.close()
            held = []
    assert len(held) == 3
    for s in held[:2]:
        s.listen()
    held[2].close()
    monkeypatch.setattr(ports, "_LOW", base)
    monkeypatch.setattr(ports, "_HIGH", base + 3)
    try:
        assert {ports.free_port() for _ in range(10)} == {base + 2}
    finally:
        for s in held[:2]:
            s.close()


def test_with_no_room_outside_the_ephemeral_range_the_kernel_chooses(monkeypatch):
    monkeypatch.setattr(ports, "_ephemeral_range", lambda: (1, 65535))
    got = ports.free_ports(3)
    assert len(set(got)) == 3 and all(1024 <= p <= 65535 for p in got)


def test_waiting_for_a_server_that_exits_says_which_one_and_does_not_hang():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match=r"^fake_server exited at start \(exit code 3\)$"):
        ports.wait_listening(ports.free_port(), proc, "fake_server", timeout=60)


def test_waiting_returns_once_the_server_listens():
    port = ports.free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); time.sleep(0.5); "
                             f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(30)"])
    try:
        ports.wait_listening(port, proc, "late_server", timeout=20)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
