"""How the embedded broker reads a connection: one whole MQTT packet at a time, bounded, pausable.

Stock amqtt reads a packet piece by piece straight off the socket, whatever length its fixed header
announces: a PUBLISH body in one read of up to 256 MB, a SUBSCRIBE as thousands of small reads
(whose SUBACK it then builds in quadratic time, on the one event loop every client shares). Here the
reader takes the fixed header itself, refuses a packet longer than `max_bytes` by aborting the
connection (nothing after it is read or trusted), and otherwise reads the whole packet, at most
`max_bytes`, before amqtt parses it from memory. A read past the end of the packet it announced is a
malformed packet: the connection is aborted too.

Between packets the reader can be told to wait (`pause`): the broker's backpressure on a client
beyond its flood limit. A pause never cuts a packet in two, and never shortens an earlier pause.

The broker may also look at the next packet before amqtt parses it (`peek`): amqtt parses a CONNECT
as MQTT 3.1.1 before it checks the protocol level, so an MQTT 5 CONNECT with properties makes it
read garbage instead of refusing the version; `connect_protocol` tells the broker what a CONNECT
asks for, so it can refuse the version first (broker/server.py).
"""

import asyncio
import logging
import struct

from amqtt.adapters import ReaderAdapter

logger = logging.getLogger(__name__)

_CONTINUES = 0x80  # a remaining-length byte with this bit set is followed by another
_MAX_LENGTH_BYTES = 4  # MQTT: the remaining length takes 1 to 4 bytes
_CONNECT = 1  # the packet type in the first byte's high nibble


def connect_protocol(packet: bytes) -> tuple[str, int] | None:
    """The protocol name and level a whole CONNECT packet announces, or None if it is not a CONNECT
    or too short to say. MQTT 3.1 sends ("MQIsdp", 3), 3.1.1 ("MQTT", 4), 5 ("MQTT", 5)."""
    if not packet or packet[0] >> 4 != _CONNECT:
        return None
    # The fixed header: the type byte, then a remaining length of 1 to 4 bytes, all but its last with
    # _CONTINUES set. `body` is where the variable header starts.
    body = 2
    while body <= _MAX_LENGTH_BYTES and body <= len(packet) and packet[body - 1] & _CONTINUES:
        body += 1
    if len(packet) < body + 2:
        return None
    (name_length,) = struct.unpack_from(">H", packet, body)
    level_at = body + 2 + name_length
    if len(packet) <= level_at:
        return None
    name = packet[body + 2 : level_at].decode("utf-8", errors="replace")
    return name, packet[level_at]


class PacketReader(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    def __init__(self, inner: ReaderAdapter, transport: asyncio.WriteTransport, max_bytes: int | None) -> None:
        self.inner = inner
        self.transport = transport
        self.max_bytes = max_bytes
        self.resume_at = 0.0  # event-loop time
        self._packet = bytearray()  # what amqtt has not read yet of the current packet
        self._aborted = False

    def pause(self, seconds: float) -> None:
        """Read no further packet for `seconds` (the one being parsed is finished)."""
        self.resume_at = max(self.resume_at, asyncio.get_running_loop().time() + seconds)

    async def read(self, n: int = -1) -> bytes:
        if not self._packet:
            if self._aborted:
                raise asyncio.IncompleteReadError(b"", n)  # amqtt's end of stream
            await self._next_packet()
        if n < 0:
            n = len(self._packet)
        if n > len(self._packet):
            self._abort(f"a packet read past its announced length ({n} > {len(self._packet)} bytes left)")
            raise asyncio.IncompleteReadError(b"", n)
        chunk = bytes(self._packet[:n])
        del self._packet[:n]
        return chunk

    async def peek(self) -> bytes:
        """The whole next packet, fixed header included, left for `read`; b"" if the stream ends first."""
        if not self._packet and not self._aborted:
            try:
                await self._next_packet()
            except (asyncio.IncompleteReadError, ConnectionError):
                return b""  # amqtt's own read then meets the same end of stream
        return bytes(self._packet)

    def feed_eof(self) -> None:
        self.inner.feed_eof()

    async def _next_packet(self) -> None:
        delay = self.resume_at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        header = bytearray(await self.inner.read(1))
        length, shift = 0, 0
        for _ in range(_MAX_LENGTH_BYTES):
            byte = (await self.inner.read(1))[0]
            header.append(byte)
            length |= (byte & ~_CONTINUES) << shift
            shift += 7
            if not byte & _CONTINUES:
                break
        else:
            self._abort("a remaining length of more than 4 bytes")
            raise asyncio.IncompleteReadError(b"", None)
        if self.max_bytes is not None and len(header) + length > self.max_bytes:
            self._abort(f"a packet of {len(header) + length} bytes, over broker.max_packet_bytes ({self.max_bytes})")
            raise asyncio.IncompleteReadError(b"", None)
        self._packet = header + (await self.inner.read(length) if length else b"")

    def _abort(self, why: str) -> None:
        logger.warning("closing a connection that sent %s", why)
        self._aborted = True
        self._packet.clear()
        self.transport.abort()
