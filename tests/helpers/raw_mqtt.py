"""MQTT packets as bytes, for tests that must send what no client library would (or only just)."""

import socket
import struct


def remaining_length(n: int) -> bytes:
    """The fixed header's variable-length integer: 7 bits a byte, high bit = more follows."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(kind: int, body: bytes) -> bytes:
    """A whole packet: the first byte (type and flags), its remaining length, the body."""
    return bytes([kind]) + remaining_length(len(body)) + body


def mqtt_string(value: str | bytes) -> bytes:
    """A length-prefixed UTF-8 string, as topics, client ids and credentials are sent."""
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">H", len(raw)) + raw


def connect_packet(
    client_id: str | bytes,
    *,
    username: str | None = None,
    password: str | None = None,
    level: int = 4,
    name: str = "MQTT",
    keepalive: int = 30,
    properties: bytes = b"",
) -> bytes:
    """A clean-session CONNECT: protocol `name` and `level` (4 = 3.1.1, 5, 3 with "MQIsdp"), `keepalive`
    seconds, then `properties` as given (MQTT 5 needs at least their length byte), the client id and the
    credentials given. No will."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = mqtt_string(name) + bytes([level, flags]) + struct.pack(">H", keepalive) + properties
    body += mqtt_string(client_id)
    if username is not None:
        body += mqtt_string(username)
    if password is not None:
        body += mqtt_string(password)
    return packet(0x10, body)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        data += chunk
    return data


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """The next whole packet on `sock`: its first byte (type and flags) and its body."""
    first = read_exactly(sock, 1)[0]
    length, shift = 0, 0
    while True:
        digit = read_exactly(sock, 1)[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
    return first, read_exactly(sock, length)
