"""Ports on loopback: a free one to bind, and whether something accepts connections on one."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing was bound to a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts_connections(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:`port` is accepted now (closed again at once)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
