"""The one MQTT test client: a blocking paho connection, MQTT 3.1.1 or 5, that tells what the broker decided.

`connack` returns the CONNACK reason code (`connect` whether it was 0), `subscribe` the SUBACK codes,
`publish` the PUBACK reason code (MQTT 5 says 0x87 when the ACL refused; 3.1.1 cannot tell). It never
reconnects by itself: a session the broker ends stays ended (`disconnected`).
"""

import queue
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from provwire.models import MqttCredentials

TIMEOUT = 10.0
NOT_AUTHORIZED = 0x87  # MQTT 5 PUBACK / SUBACK reason
ACCEPTED = (0x00, 0x10)  # MQTT 5 PUBACK: success, or success with no matching subscribers


class Message(NamedTuple):
    """A message received: equal to the tuple `(topic, payload)`."""

    topic: str
    payload: bytes


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small packets go out at once


class MqttClient:
    """One MQTT connection to 127.0.0.1. Messages on subscribed topics land in `messages`, as
    `(topic, payload, properties)`; `client` is the paho client, for what a test does by hand."""

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        v5: bool = False,
        ca_file: Path | None = None,
        client_certificate: tuple[Path, Path] | None = None,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = True,
        manual_ack: bool = False,
    ) -> None:
        self.port = port
        self.v5 = v5
        self.messages: queue.Queue[tuple[str, bytes, Any]] = queue.Queue()
        self._connack = threading.Event()
        self.disconnected = threading.Event()
        self.reason: int | None = None  # of the CONNACK
        self.session_present = False
        self._subacks: dict[int, list[int]] = {}
        self._suback = threading.Condition()
        self._pubacks: dict[int, queue.Queue[int]] = {}
        session: dict[str, Any] = (
            {"protocol": mqtt.MQTTv5} if v5 else {"protocol": mqtt.MQTTv311, "clean_session": clean_session}
        )
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            reconnect_on_failure=False,  # a session the broker ended must stay ended during a test
            manual_ack=manual_ack,
            **session,
        )
        if username is not None:
            c.username_pw_set(username, password)
        if will is not None:
            c.will_set(will[0], will[1])
        if ca_file is not None:
            # Verifies the broker's name and chain; `client_certificate` is (certificate file, key file).
            certfile, keyfile = (str(path) for path in client_certificate) if client_certificate else (None, None)
            c.tls_set(ca_certs=str(ca_file), certfile=certfile, keyfile=keyfile, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_socket_open = _no_delay
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_args: self.disconnected.set()
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload), m.properties))
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        self.client = c

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self.reason = int(reason.value)
        self.session_present = bool(flags.session_present)
        self._connack.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        with self._suback:
            self._subacks[mid] = [int(code.value) for code in codes]
            self._suback.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._pubacks.setdefault(mid, queue.Queue()).put(int(reason.value))

    def connack(self) -> int | None:
        """Connect; the CONNACK reason code (0: accepted), or None when nothing listens, TLS fails, or the
        broker closes the connection without one. Looped by hand until then, so a refusal leaves no thread."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except OSError:
            return None
        deadline = time.monotonic() + TIMEOUT
        while not self._connack.is_set() and not self.disconnected.is_set() and time.monotonic() < deadline:
            self.client.loop(timeout=0.05)
        if self.reason == 0:
            self.client.loop_start()
        return self.reason

    def connect(self) -> bool:
        """True when the broker accepted the connection."""
        return self.connack() == 0

    def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        """SUBACK codes, one per filter: the granted QoS, or a failure (0x80; MQTT 5: 0x87 not authorized)."""
        _, mid = self.client.subscribe([(f, qos) for f in filters])
        assert mid is not None
        with self._suback:
            assert self._suback.wait_for(lambda: mid in self._subacks, TIMEOUT), "no SUBACK"
            return self._subacks.pop(mid)

    def publish(
        self,
        topic: str,
        payload: bytes = b"x",
        properties: Properties | None = None,
        *,
        qos: int = 1,
        retain: bool = False,
    ) -> int:
        """Publish and wait until it is out: the PUBACK reason code at QoS 1 (0 at QoS 0)."""
        info = self.client.publish(topic, payload, qos, retain=retain, properties=properties)
        if qos == 0:
            info.wait_for_publish(TIMEOUT)
            return 0
        return self.puback(info.mid)

    def puback(self, mid: int, timeout: float = TIMEOUT) -> int:
        """The PUBACK reason code of the message `mid` (one published through `client` directly, too)."""
        return self._pubacks.setdefault(mid, queue.Queue()).get(timeout=timeout)

    def next_message(self, timeout: float = TIMEOUT) -> Message:
        topic, payload, _properties = self.messages.get(timeout=timeout)
        return Message(topic, payload)

    def next_message_with_properties(self, timeout: float = TIMEOUT) -> tuple[str, bytes, Any]:
        """The next message with its MQTT 5 properties."""
        return self.messages.get(timeout=timeout)

    def received_topics(self) -> list[str]:
        """The topics of every message received and not read yet (without waiting for more)."""
        found = []
        while not self.messages.empty():
            found.append(self.messages.get_nowait()[0])
        return found

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT, as a crashed device would: its will goes out."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # also wakes paho's network thread, which then ends
        self.client.loop_stop()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "MqttClient":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def request_properties(response_topic: str | None, correlation: bytes | None) -> Properties:
    """MQTT 5 PUBLISH properties: a Response Topic and Correlation Data, each if given."""
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        properties.ResponseTopic = response_topic
    if correlation is not None:
        properties.CorrelationData = correlation
    return properties


def can_connect(port: int, client_id: str, username: str | None, password: str | None, v5: bool = False) -> bool:
    with MqttClient(port, client_id, username, password, v5=v5) as conn:
        return conn.connect()


def token_session(port: int, mqtt_credentials: MqttCredentials) -> MqttClient:
    """A connected MQTT 3.1.1 session with a device's token (`disconnected` tells when it ends)."""
    conn = MqttClient(port, mqtt_credentials.client_id, mqtt_credentials.username, mqtt_credentials.token)
    assert conn.connect()
    return conn
