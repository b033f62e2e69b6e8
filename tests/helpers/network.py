"""Ports on loopback: a free one to bind, and whether something accepts connections on one."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing was bound to a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int, taken: tuple[int, ...] = ()) -> list[int]:
    """`count` distinct free ports, none of `taken`: bound together, so two calls of `free_port` cannot hand
    out the same port twice (a listener's port is not bound until its broker starts)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] in taken:
                s.close()
                continue
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def accepts_connections(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:`port` is accepted now (closed again at once)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
