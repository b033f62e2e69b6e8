"""The default edge for an external broker (`bridge.edges.external`) where Mosquitto 2.0.11 cannot be made
to behave as other brokers do: a broker that sends an MQTT 5 DISCONNECT. A raw TCP listener on 127.0.0.1
plays that broker, packet by packet; everything else about the edge is tested through Mosquitto."""

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from bridge.config import Settings
from bridge.edges.external import ExternalBridge
from tests.helpers.raw_mqtt import packet, read_packet

CONNACK_V5 = packet(0x20, bytes([0, 0, 0]))  # no session present, success, no properties
DISCONNECT_SESSION_TAKEN_OVER = packet(0xE0, bytes([0x8E, 0]))


class OneShotBroker:
    """Accepts connections on a free loopback port; to each: CONNACK, SUBACK, then a DISCONNECT (session
    taken over). Counts the CONNECTs it got."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connects = 0
        self.reconnected = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):  # the edge hung up: wait for the next connection
                    self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        kind, _ = read_packet(conn)
        assert kind >> 4 == 1  # CONNECT
        self.connects += 1
        if self.connects > 1:
            self.reconnected.set()
        conn.sendall(CONNACK_V5)
        kind, body = read_packet(conn)
        while kind >> 4 != 8:  # the retained "online" status comes first: no PUBACK needed for this test
            kind, body = read_packet(conn)
        conn.sendall(packet(0x90, body[:2] + bytes([0, 1, 1])))  # SUBACK: its id, no properties, QoS 1 twice
        conn.sendall(DISCONNECT_SESSION_TAKEN_OVER)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def broker() -> Iterator[OneShotBroker]:
    running = OneShotBroker()
    yield running
    running.close()


def test_an_mqtt5_disconnect_from_the_broker_is_followed_by_a_reconnection(
    initialised: tuple[Settings, str], broker: OneShotBroker
) -> None:
    """paho closes its socket on a DISCONNECT yet keeps saying it is connected: the edge must look at the
    socket, not at that, or it never comes back."""
    settings = initialised[0]
    update = {"mode": "external", "port": broker.port, "protocol": "5", "tls_listen": "off", "dynsec": False}
    settings = settings.model_copy(update={"broker": settings.broker.model_copy(update=update)})

    async def run() -> bool:
        edge = ExternalBridge(settings)
        await edge.start()
        try:
            return await asyncio.to_thread(broker.reconnected.wait, 15)
        finally:
            await edge.stop()

    assert asyncio.run(run()), f"the edge did not reconnect ({broker.connects} CONNECT)"
