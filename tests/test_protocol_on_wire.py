"""What docs/PROTOCOL.md tells a firmware author a device will see, checked byte for byte on real brokers.

* §10.3, a publish and a subscription outside the token's scope. A device connects with its token and
  publishes QoS 1 to another device's topic, then subscribes to it. The packets are written and read
  as bytes here (tests/helpers/raw_mqtt.py), so the test records exactly what the broker answers, on every
  broker and MQTT version provbridge supports: the embedded broker (MQTT 3.1.1 only), and Mosquitto
  2.0 from `provbridge mosquitto-config`, with tokens mirrored into dynamic security (`dynsec`) or
  verified by the provbridge_jwt plugin (`jwt`), over MQTT 3.1.1 and 5. After the refusals the same
  connection must still work (PINGREQ, a publish within the scope), and the refused message must reach
  nobody: the device it was aimed at receives a message published after it, and nothing before.
* §7.3, the answers to an oversized claim and an oversized token refresh: the document's example
  bytes, exactly, with no request_id although the payload carries one.
* §7.5, MQTT 5 Correlation Data: echoed by a bridge speaking MQTT 5 to Mosquitto, even on an answer
  without request_id and with a Response Topic it ignores; absent with the default bridge protocol.
"""

import json
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.config import Settings
from provwire import topics
from provwire.models import MAX_CLAIM_BYTES, MAX_REFRESH_BYTES, ClaimError, Credentials
from tests.helpers.bridge import Bridge
from tests.helpers.brokers import bridge_on
from tests.helpers.devices import provision
from tests.helpers.mosquitto import mosquitto_bridge
from tests.helpers.mqtt import MqttClient, request_properties
from tests.helpers.raw_mqtt import connect_packet, mqtt_string, packet, read_packet, remaining_length

TIMEOUT = 10.0
PUBLISH_QOS1 = 0x32
PUBACK = 0x40
SUBSCRIBE, SUBACK = 0x82, 0x90
PINGREQ, PINGRESP = 0xC0, 0xD0
DISCONNECT = 0xE0
NOT_AUTHORIZED = 0x87


class RawDevice:
    """One MQTT 3.1.1 or 5 connection over a plain socket: every packet the broker sends is returned as is."""

    def __init__(self, port: int, credentials: Credentials, version: str) -> None:
        self.v5 = version == "5"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        mqtt = credentials.mqtt
        level, properties = (5, b"\x00") if self.v5 else (4, b"")  # MQTT 5: no properties
        connect = connect_packet(
            mqtt.client_id, username=mqtt.username, password=mqtt.token, level=level, properties=properties
        )
        self.sock.sendall(connect)
        kind, connack = self.read()
        assert kind == 0x20 and connack[1] == 0x00, f"CONNACK {connack.hex()}: the token was refused"

    def read(self) -> tuple[int, bytes]:
        """The next packet: its first byte and its body."""
        return read_packet(self.sock)

    def publish(self, topic: str, payload: bytes, packet_id: int) -> bytes:
        """PUBLISH QoS 1; returns the whole packet the broker answers with (a PUBACK, or a DISCONNECT)."""
        properties = b"\x00" if self.v5 else b""
        self.sock.sendall(
            packet(PUBLISH_QOS1, mqtt_string(topic) + struct.pack(">H", packet_id) + properties + payload)
        )
        first, body = self.read()
        return bytes([first]) + remaining_length(len(body)) + body

    def subscribe(self, topic_filter: str, packet_id: int) -> bytes:
        """SUBSCRIBE at QoS 1; returns the whole SUBACK."""
        properties = b"\x00" if self.v5 else b""
        body = struct.pack(">H", packet_id) + properties + mqtt_string(topic_filter) + b"\x01"
        self.sock.sendall(packet(SUBSCRIBE, body))
        first, reply = self.read()
        return bytes([first]) + remaining_length(len(reply)) + reply

    def ping(self) -> bool:
        self.sock.sendall(packet(PINGREQ, b""))
        return self.read() == (PINGRESP, b"")

    def close(self) -> None:
        try:
            self.sock.sendall(packet(DISCONNECT, b"\x00" if self.v5 else b""))
        finally:
            self.sock.close()


@dataclass(frozen=True)
class Case:
    broker: str  # "embedded", "mosquitto-dynsec", "mosquitto-jwt"
    version: str  # MQTT version of the device connection
    refused_puback: bytes  # what the device gets for a publish outside its scope (packet id 1)
    refused_suback: bytes  # and for a subscription outside it (packet id 3)

    @property
    def accepted_puback(self) -> bytes:
        """The PUBACK of a publish within the scope (packet id 2). MQTT 5 says 0x10, "no matching
        subscribers": nobody subscribes to the publishing device's own topic in this test."""
        return bytes([PUBACK, 3, 0, 2, 0x10]) if self.version == "5" else bytes([PUBACK, 2, 0, 2])


CASES = [
    # MQTT 3.1.1 has no negative PUBACK: the broker acknowledges the publish and drops it.
    # A refused subscription gets SUBACK return code 0x80 (failure).
    Case("embedded", "3.1.1", bytes([PUBACK, 2, 0, 1]), bytes([SUBACK, 3, 0, 3, 0x80])),
    Case("mosquitto-dynsec", "3.1.1", bytes([PUBACK, 2, 0, 1]), bytes([SUBACK, 3, 0, 3, 0x80])),
    Case("mosquitto-jwt", "3.1.1", bytes([PUBACK, 2, 0, 1]), bytes([SUBACK, 3, 0, 3, 0x80])),
    # MQTT 5: a PUBACK with reason code 0x87 (Not authorized), a SUBACK with 0x87 too (after the
    # properties length 0); the connection stays open.
    Case(
        "mosquitto-dynsec", "5", bytes([PUBACK, 3, 0, 1, NOT_AUTHORIZED]), bytes([SUBACK, 4, 0, 3, 0, NOT_AUTHORIZED])
    ),
    Case("mosquitto-jwt", "5", bytes([PUBACK, 3, 0, 1, NOT_AUTHORIZED]), bytes([SUBACK, 4, 0, 3, 0, NOT_AUTHORIZED])),
]


@pytest.fixture
def running(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bridge]:
    case: Case = request.param
    with bridge_on(case.broker, initialised, monkeypatch) as bridge:
        yield bridge


@pytest.mark.parametrize(
    ("running", "case"),
    [(case, case) for case in CASES],
    ids=[f"{c.broker}-mqtt{c.version}" for c in CASES],
    indirect=["running"],
)
def test_a_publish_and_a_subscription_outside_the_token_scope(running: Bridge, case: Case) -> None:
    (_, a), (_, b) = provision(running), provision(running)
    a_id, b_id = a.mqtt.client_id, b.mqtt.client_id
    with MqttClient(running.port, b_id, b_id, b.mqtt.token) as watcher:
        assert watcher.connect()
        assert watcher.subscribe(f"devices/{b_id}/#") in ([0], [1])
        device = RawDevice(running.port, a, case.version)
        try:
            refused = device.publish(f"devices/{b_id}/cmd", b"intrusion", packet_id=1)
            assert refused == case.refused_puback, f"got {refused.hex()}"
            # The connection is still open and in use: a ping, and a publish within the scope.
            assert device.ping()
            accepted = device.publish(f"devices/{a_id}/up", b"mine", packet_id=2)
            assert accepted == case.accepted_puback, accepted.hex()
            # A subscription outside the scope: SUBACK with the failure code of its version.
            assert device.subscribe(f"devices/{b_id}/#", packet_id=3) == case.refused_suback
            assert device.ping()
        finally:
            device.close()
        # The refused message reached nobody: the first message the other device gets is one published after.
        watcher.client.publish(f"devices/{b_id}/own", b"after", 1).wait_for_publish(TIMEOUT)
        assert watcher.next_message()[:2] == (f"devices/{b_id}/own", b"after")
        assert watcher.messages.empty()


# --------------------------------------------------------------------------- oversized requests (§7.3, §7.5)

DOC = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")


def _documented_answers() -> tuple[bytes, bytes]:
    """The two lines of the code block after `<!-- oversized-answers -->`: the claim's answer, the refresh's."""
    lines = DOC[DOC.index("<!-- oversized-answers -->") :].split("\n")
    assert lines[1] == "```", "the marker must be followed by a plain code block"
    claim, refresh, end = lines[2:5]
    assert end == "```"
    return claim.encode("utf-8"), refresh.encode("utf-8")


OVERSIZED_CLAIM_ANSWER, OVERSIZED_REFRESH_ANSWER = _documented_answers()


def oversized(max_bytes: int) -> bytes:
    """A JSON object one byte over `max_bytes`, with a valid request_id in front."""
    head = b'{"request_id":"r-oversized-0001","pad":"'
    payload = head + b"x" * (max_bytes + 1 - len(head) - 2) + b'"}'
    assert len(payload) == max_bytes + 1 and json.loads(payload)["request_id"] == "r-oversized-0001"
    return payload


def test_oversized_claims_and_refreshes_get_the_documented_answers(bridge: Bridge) -> None:
    client_id = "c-oversized"
    response = topics.response_topic(bridge.prefix, client_id)
    requests = [
        (topics.claim_topic(bridge.prefix, client_id), MAX_CLAIM_BYTES, OVERSIZED_CLAIM_ANSWER, "claim.rejected"),
        (
            topics.token_topic(bridge.prefix, client_id),
            MAX_REFRESH_BYTES,
            OVERSIZED_REFRESH_ANSWER,
            "token.refresh_rejected",
        ),
    ]
    with MqttClient(bridge.port, client_id) as conn:
        assert conn.connect()
        assert conn.subscribe(response) == [1]
        for topic, max_bytes, documented, event in requests:
            conn.publish(topic, oversized(max_bytes))
            assert conn.next_message() == (response, documented)
            answer = ClaimError.model_validate_json(documented)
            assert answer.request_id is None and answer.errors is not None
            assert [error.field for error in answer.errors] == [""]
            (stored,) = bridge.store.events(event=event)
            assert (stored["tenant"], stored["reason"], stored["client_id"]) == ("_", "validation_error", client_id)
            assert "request_id" not in stored


@pytest.mark.parametrize("bridge_protocol", ["5", "3.1.1"], ids=["bridge-mqtt5", "bridge-mqtt3.1.1"])
def test_correlation_data_comes_back_only_through_an_mqtt5_bridge(
    initialised: tuple[Settings, str], bridge_protocol: str
) -> None:
    with mosquitto_bridge(*initialised, protocol=bridge_protocol) as running:
        client_id = "c-correlation"
        response = topics.response_topic(running.prefix, client_id)
        elsewhere = topics.response_topic(running.prefix, "someone-else")  # a Response Topic the bridge ignores
        requests = [
            (topics.claim_topic(running.prefix, client_id), MAX_CLAIM_BYTES, OVERSIZED_CLAIM_ANSWER),
            (topics.token_topic(running.prefix, client_id), MAX_REFRESH_BYTES, OVERSIZED_REFRESH_ANSWER),
        ]
        with MqttClient(running.port, client_id, v5=True) as conn:
            assert conn.connect()
            assert conn.subscribe(response) == [1]
            for n, (topic, max_bytes, documented) in enumerate(requests):
                correlation = b"corr-\x00\xff-" + bytes([n])
                properties = request_properties(elsewhere, correlation)
                assert conn.publish(topic, oversized(max_bytes), properties) == 0
                answer_topic, answer, answer_properties = conn.next_message_with_properties()
                assert (answer_topic, answer) == (response, documented)
                expected = correlation if bridge_protocol == "5" else None
                assert getattr(answer_properties, "CorrelationData", None) == expected
