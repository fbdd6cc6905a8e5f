"""Helpers for the tests that spawn gloo process groups on this machine."""
import contextlib
import socket


def free_port():
    """A TCP port nobody listens on now, for a group's rendezvous (tcp://127.0.0.1:PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_process_group():
    """A gloo group of this process alone (world size 1) for the duration, unless one is already up; skips the
    test where torch.distributed is not built."""
    import pytest

    dist = pytest.importorskip("torch.distributed", reason="torch.distributed is not available")
    if not dist.is_available():
        pytest.skip("torch.distributed is not built in this torch")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        if created:
            dist.destroy_process_group()
