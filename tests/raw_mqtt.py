"""MQTT 3.1.1 packets as bytes, for tests that must send what no client library would (or only just)."""

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
