"""Helpers for the tests that spawn gloo process groups on this machine."""
import socket


def free_port():
    """A TCP port nobody listens on now, for a group's rendezvous (tcp://127.0.0.1:PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
