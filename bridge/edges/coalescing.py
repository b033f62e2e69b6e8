"""paho's connection read and written in bulk, for the edge that drives paho from the event loop.

paho sends each MQTT packet with its own `send()` and reads each packet in three or more `recv()` calls
(the first byte, the length bytes one by one, the rest). A claim is two packets each way (the claim and
our PUBACK, the answer and the broker's PUBACK): a dozen syscalls, and on loopback a `send()` also runs
the receiving end's TCP work. py-spy put a fifth of the external edge's CPU in `send()` alone
(docs/BENCHMARKS.md). `CoalescingSocket` keeps what paho sends until the edge `flush`es it, once per turn
of the event loop, and serves paho's reads from one `recv()` of up to `READ_SIZE` bytes. The bytes and
their order are paho's: only the number of syscalls changes.

`CoalescingClient` is a paho client whose connection is wrapped so. paho types its connection as a
`SocketLike` (send, recv, close, fileno, setblocking, and `pending` when it has one), the protocol its
own websocket wrapper follows; `_create_socket` is where paho makes it, and the one place we override.
"""

import contextlib
import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt

READ_SIZE = 256 * 1024  # one recv(): a burst of claims, and no more than that held here at a time


class CoalescingSocket:
    """A connected, non-blocking socket (plain or TLS) whose sends wait for `flush` and whose reads are
    served from a buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._read = b""
        self._read_at = 0
        self._unsent = bytearray()

    # --- what paho calls ---------------------------------------------------------------------

    def send(self, data: bytes | bytearray) -> int:
        """Take all of `data` for the next `flush`."""
        self._unsent += data
        return len(data)

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes, from the buffer or from one `recv()` of the socket, which may raise
        BlockingIOError (nothing to read) or return b"" (closed) as a socket's would."""
        if self._read_at >= len(self._read):
            self._read = self.sock.recv(READ_SIZE)
            self._read_at = 0
        chunk = self._read[self._read_at : self._read_at + size]
        self._read_at += len(chunk)
        return chunk

    def pending(self) -> int:
        """Bytes readable without waiting for the socket: read from it already, or decrypted by TLS."""
        buffered = len(self._read) - self._read_at
        if isinstance(self.sock, ssl.SSLSocket):
            buffered += self.sock.pending()
        return buffered

    def close(self) -> None:
        """Close, after one non-blocking try at what is unsent: paho closes right after writing a DISCONNECT
        (two bytes, which a live connection takes at once). Never waits: paho also closes connections it has
        given up on, whose send buffer may be full."""
        if self._unsent:
            with contextlib.suppress(OSError):  # gone or full: the broker learns of it as of any lost connection
                self.sock.send(self._unsent)
            self._unsent.clear()
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    # --- what the edge calls -----------------------------------------------------------------

    def flush(self) -> bool:
        """Send what paho wrote, in as few `send()`s as the socket takes; True once nothing is left
        (else the edge waits until the socket is writable and flushes again). Raises OSError when the
        connection is gone (paho notices it at its next read or write, as without this)."""
        while self._unsent:
            try:
                sent = self.sock.send(self._unsent)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            except OSError:
                self._unsent.clear()  # the connection is gone; paho resends what is unacknowledged after it reconnects
                raise
            del self._unsent[:sent]
        return True

    @property
    def unsent(self) -> int:
        return len(self._unsent)


# paho-mqtt 2.1 and 2.2 make their connection there; a release that does not would leave the edge a bare socket.
if not callable(getattr(mqtt.Client, "_create_socket", None)):
    raise ImportError("paho-mqtt's Client has no _create_socket, which bridge/edges/coalescing.py wraps (2.1, 2.2)")


class CoalescingClient(mqtt.Client):
    """A paho client whose connection is a `CoalescingSocket`: whoever drives it calls `flush` after
    each `loop_write` (and when the socket is writable while something is unsent)."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        assert isinstance(sock, socket.socket)  # not websockets: the bridge never asks for them
        return CoalescingSocket(sock)
