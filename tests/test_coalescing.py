"""The external edge's socket (`bridge.edges.coalescing`): paho's writes wait for one flush, its reads come
from one recv(); the bytes and their order are unchanged. On a real socket pair; the edge itself runs on it
in every Mosquitto suite (plain and TLS)."""

import socket
from collections.abc import Iterator

import pytest

from bridge.edges.coalescing import CoalescingSocket


@pytest.fixture
def pair() -> Iterator[tuple[CoalescingSocket, socket.socket]]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    yield CoalescingSocket(ours), peer
    ours.close()
    peer.close()


def _drain(peer: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


def test_sends_wait_for_flush_then_arrive_in_order(pair: tuple[CoalescingSocket, socket.socket]) -> None:
    sock, peer = pair
    assert sock.send(b"\x30\x02ab") == 4
    assert sock.send(bytearray(b"\x40\x02\x00\x01")) == 4
    assert _drain(peer) == b""  # nothing left before the flush
    assert sock.unsent == 8
    assert sock.flush() is True
    assert sock.unsent == 0
    assert _drain(peer) == b"\x30\x02ab\x40\x02\x00\x01"


def test_a_full_socket_keeps_the_rest_for_the_next_flush(pair: tuple[CoalescingSocket, socket.socket]) -> None:
    sock, peer = pair
    sock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 16 * 1024  # 4 MiB: more than the socket takes at once
    for start in range(0, len(data), 1000):
        sock.send(data[start : start + 1000])
    assert sock.flush() is False  # the socket is full
    assert 0 < sock.unsent < len(data)
    received = b""
    while not sock.flush():
        received += _drain(peer)
    received += _drain(peer)
    assert received == data


def test_reads_come_from_one_recv(pair: tuple[CoalescingSocket, socket.socket]) -> None:
    sock, peer = pair
    packets = b"\x30\x03a/b" + b"\x40\x02\x00\x07" + b"\xd0\x00"
    peer.sendall(packets)
    assert sock.recv(1) == b"\x30"
    peer.close()  # the rest was read already: served from the buffer, not from the (now closed) peer
    assert sock.pending() == len(packets) - 1
    got = b""
    while sock.pending():
        got += sock.recv(3)
    assert got == packets[1:]
    assert sock.recv(1) == b""  # then the socket's own answer: closed


def test_an_empty_socket_says_so_as_a_socket_does(pair: tuple[CoalescingSocket, socket.socket]) -> None:
    sock, _peer = pair
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    assert sock.pending() == 0


def test_close_sends_what_is_left(pair: tuple[CoalescingSocket, socket.socket]) -> None:
    """paho closes the connection right after writing a DISCONNECT: it still goes out."""
    sock, peer = pair
    sock.send(b"\xe0\x00")
    sock.close()
    assert _drain(peer) == b"\xe0\x00"
