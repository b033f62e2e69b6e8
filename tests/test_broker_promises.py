"""What devices are promised about the broker, held on each broker that keeps the promise (issue 9).

The same test runs on the embedded broker and on a real Mosquitto 2.0 (dynamic-security mode, and
"jwt" mode, where the provbridge_jwt plugin verifies tokens), each with the bridge serving claims:

- `device revoke` ends the device's live session, on every broker;
- a token stays valid until its `exp` unless its device is revoked: a refresh neither ends the session
  of the old token nor refuses the old token (embedded and jwt mode; dynamic-security mode holds one
  password per client, the documented difference, asserted as such);
- what a device whose client id is not `[A-Za-z0-9._:-]{1,64}` sees, broker by broker;
- the embedded broker speaks MQTT 3.1.1 only, and refuses every other version with `20 02 00 01`.

Real brokers on 127.0.0.1, real paho clients or raw bytes; waits have generous deadlines, nothing is timed.
"""

import queue
import socket
import struct
import uuid
from collections.abc import Callable, Iterator

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import Settings
from broker.server import unsupported_protocol
from provwire import topics
from provwire.models import ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.brokers import DYNSEC, EMBEDDED, JWT, bridge_on
from tests.helpers.cli import run_cli
from tests.helpers.devices import Device
from tests.helpers.mqtt import TIMEOUT, MqttClient, can_connect, token_session
from tests.helpers.raw_mqtt import connect_packet, mqtt_string, packet
from tests.helpers.refresh import provisioned
from tests.helpers.waiting import wait_for

# CONNACK (0x20), remaining length 2, no session present, then the MQTT 3.1.1 return code.
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION = bytes([0x20, 0x02, 0x00, 0x01])
CONNACK_IDENTIFIER_REJECTED = bytes([0x20, 0x02, 0x00, 0x02])
CONNACK_ACCEPTED = bytes([0x20, 0x02, 0x00, 0x00])
UNSUPPORTED_PROTOCOL_VERSION = 0x84  # the MQTT 5 CONNACK reason paho reports for return code 0x01
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK: accepted, and nobody subscribed to the topic
SUBACK_FAILURE = 0x80


@pytest.fixture(params=[EMBEDDED, DYNSEC, JWT])
def any_broker(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bridge]:
    with bridge_on(request.param, initialised, monkeypatch) as bridge:
        yield bridge


def kind_of(bridge: Bridge) -> str:
    b = bridge.settings.broker
    return EMBEDDED if b.mode == "embedded" else f"mosquitto-{b.mosquitto_auth}"


def echo(conn: MqttClient, device_id: str, payload: bytes) -> None:
    """Publish on the device's own topic and get it back: the session is up and may publish and receive."""
    topic = f"devices/{device_id}/up"
    conn.publish(topic, payload)
    assert conn.next_message()[:2] == (topic, payload)


# --- revocation ends the live session --------------------------------------------------------


def test_revoke_ends_the_live_session_and_nobody_elses(any_broker: Bridge) -> None:
    bridge = any_broker
    revoked, creds = provisioned(bridge)
    kept, kept_creds = provisioned(bridge)
    with token_session(bridge.port, creds.mqtt) as live, token_session(bridge.port, kept_creds.mqtt) as other:
        assert live.subscribe(f"devices/{revoked.device_id}/#") == [1]
        assert other.subscribe(f"devices/{kept.device_id}/#") == [1]
        echo(live, revoked.device_id, b"before")

        assert run_cli(bridge.settings, "device", "revoke", revoked.device_id) == 0

        assert live.disconnected.wait(30), f"{kind_of(bridge)}: revocation must end the live session"
        echo(other, kept.device_id, b"still here")  # another device's session is untouched
        assert not other.disconnected.is_set()
    assert not can_connect(bridge.port, revoked.device_id, revoked.device_id, creds.mqtt.token)
    assert can_connect(bridge.port, kept.device_id, kept.device_id, kept_creds.mqtt.token)


# --- the old token after a refresh -----------------------------------------------------------


def test_a_refresh_leaves_the_old_token_and_its_live_session_valid(verifying_broker: Bridge) -> None:
    """AWS and EMQX behave so: a token is valid until its `exp` unless its device is revoked."""
    bridge = verifying_broker
    device, token_a = provisioned(bridge)
    with token_session(bridge.port, token_a.mqtt) as live:
        assert live.subscribe(f"devices/{device.device_id}/#") == [1]
        with device:  # the refresh, over a provisioning connection under the claim client id
            answer = device.send_refresh(device.refresh_payload())
        assert isinstance(answer, ClaimOk)
        token_b = device.open(answer)
        assert token_b.mqtt.token != token_a.mqtt.token
        # The answer goes out only once the bridge is done with the refresh: had the refresh ended the
        # token-A session (as dynsec mode does, below), it would have ended by now.
        echo(live, device.device_id, b"token A, after the refresh")
        # Nor may anything end it a little later: the brokers' periodic checks (the embedded broker's
        # revocation check, Mosquitto jwt mode's) run every second; three of them pass here.
        assert not live.disconnected.wait(3.5)
        echo(live, device.device_id, b"token A, still")
    assert can_connect(bridge.port, device.device_id, device.device_id, token_a.mqtt.token)
    assert can_connect(bridge.port, device.device_id, device.device_id, token_b.mqtt.token)


def test_dynsec_mode_holds_one_token_per_device_so_a_refresh_ends_the_old_session(
    initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented difference: dynamic security keeps one password per client, the newest token."""
    with bridge_on(DYNSEC, initialised, monkeypatch) as bridge:
        device, token_a = provisioned(bridge)
        with token_session(bridge.port, token_a.mqtt) as live:
            with device:
                answer = device.send_refresh(device.refresh_payload())
            assert isinstance(answer, ClaimOk)
            token_b = device.open(answer)
            assert live.disconnected.wait(30), "Mosquitto ends the session of a modified dynamic-security client"
        assert not can_connect(bridge.port, device.device_id, device.device_id, token_a.mqtt.token)
        assert can_connect(bridge.port, device.device_id, device.device_id, token_b.mqtt.token)


# --- invalid client ids ----------------------------------------------------------------------


def exchange(port: int, *packets: bytes) -> bytes:
    """Send `packets` one at a time, each after the broker's answer to the previous one (if any), and
    return everything the broker sent until it closed the connection. A reset or a broker that neither
    answers nor closes fails the test: a refusal must be clean."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        received = b""
        for index, data in enumerate(packets):
            sock.sendall(data)
            if index < len(packets) - 1:
                received += sock.recv(4)  # the CONNACK, before the next packet
        while chunk := sock.recv(4096):  # socket.timeout if it never closes
            received += chunk
        return received


def rejected_client_id_events(bridge: Bridge) -> int:
    events = bridge.store.events(event="claim.rejected", limit=1000)
    return sum(e.get("reason") == "invalid_client_id" and e.get("tenant") == "_" for e in events)


def more_rejected_client_id_events(bridge: Bridge, than: int) -> Callable[[], bool]:
    return lambda: rejected_client_id_events(bridge) > than


# One topic level, but not [A-Za-z0-9._:-]{1,64}: a space, too long, not ASCII.
ONE_LEVEL = ["has space", "x" * 65, "caf\u00e9-01"]
WILDCARDS = ["plus+", "hash#"]


def test_what_a_device_with_an_invalid_client_id_sees(any_broker: Bridge) -> None:
    bridge = any_broker
    prefix = bridge.prefix
    if kind_of(bridge) == EMBEDDED:
        # Refused at CONNECT with "identifier rejected" [MQTT-3.1.3-9], whatever the id's flaw.
        for client_id in [*ONE_LEVEL, "a/b", *WILDCARDS]:
            assert exchange(bridge.port, connect_packet(client_id)) == CONNACK_IDENTIFIER_REJECTED, client_id
        return
    # Mosquitto (both modes: provisioning clients are dynamic security's and the acl file's) accepts
    # the CONNECT, and then it depends on the id.
    for client_id in ONE_LEVEL:
        # The claim reaches the bridge, which cannot answer it: dropped, with a claim.rejected event.
        before = rejected_client_id_events(bridge)
        with MqttClient(bridge.port, client_id, v5=True) as conn:
            assert conn.connect(), client_id
            assert conn.subscribe(topics.response_topic(prefix, client_id)) == [1]
            claim = Device(bridge, client_id=client_id).claim_payload(bridge.provision_key)
            assert conn.publish(topics.claim_topic(prefix, client_id), claim) == 0
            assert wait_for(more_rejected_client_id_events(bridge, before)), client_id
    # A `/` makes two levels: the acl file lets the claim through, but nobody is subscribed to it (the
    # bridge takes {prefix}/claim/+), so no event and no answer; its response topic is refused.
    with MqttClient(bridge.port, "a/b", v5=True) as conn:
        assert conn.connect()
        assert conn.subscribe(topics.response_topic(prefix, "a/b")) == [0x87]
        claim = Device(bridge, client_id="a/b").claim_payload(bridge.provision_key)
        assert conn.publish(topics.claim_topic(prefix, "a/b"), claim) == NO_MATCHING_SUBSCRIBERS
    # A wildcard makes its own topics invalid topic names: a client library will not send them, and
    # Mosquitto closes the connection of a client that does.
    for client_id in WILDCARDS:
        claim = packet(0x32, mqtt_string(topics.claim_topic(prefix, client_id)) + struct.pack(">H", 1) + b"{}")
        assert exchange(bridge.port, connect_packet(client_id), claim) == CONNACK_ACCEPTED, client_id
        subscribe = packet(0x82, struct.pack(">H", 1) + mqtt_string(topics.response_topic(prefix, client_id)) + b"\1")
        assert exchange(bridge.port, connect_packet(client_id), subscribe) == CONNACK_ACCEPTED, client_id


# --- MQTT versions: the embedded broker is MQTT 3.1.1 ----------------------------------------


@pytest.mark.parametrize(
    ("data", "level"),
    [
        (connect_packet("c", level=5, properties=b"\0"), 5),
        (connect_packet("c" * 300, level=5, properties=b"\0"), 5),  # a remaining length of 2 bytes
        (connect_packet("c", level=3, name="MQIsdp"), 3),
        (connect_packet("c"), None),  # 3.1.1: amqtt's
        (connect_packet("c", level=5, name="MQTX"), None),  # not MQTT: amqtt closes it [MQTT-3.1.2-1]
        (connect_packet("c", level=5)[:8], None),  # cut before the level byte
        (packet(0x82, b"\0\1"), None),  # not a CONNECT
        (b"", None),
    ],
    ids=["mqtt5", "mqtt5-long", "mqtt3.1", "mqtt3.1.1", "other-name", "cut-short", "subscribe", "empty"],
)
def test_unsupported_protocol_reads_the_level_of_a_connect(data: bytes, level: int | None) -> None:
    assert unsupported_protocol(data) == level


SESSION_EXPIRY_AND_RECEIVE_MAXIMUM = bytes([0x08, 0x11, 0, 0, 0, 60, 0x21, 0, 10])  # length 8, then two properties


@pytest.mark.parametrize(
    "connect",
    [
        connect_packet("hw-v5", level=5, properties=SESSION_EXPIRY_AND_RECEIVE_MAXIMUM),
        connect_packet("hw-v5", level=5, properties=b"\0"),
        connect_packet("hw-v31", level=3, name="MQIsdp"),
    ],
    ids=["mqtt5-with-properties", "mqtt5-no-properties", "mqtt3.1"],
)
def test_embedded_broker_refuses_other_mqtt_versions_with_the_3_1_1_connack(bridge: Bridge, connect: bytes) -> None:
    """[MQTT-3.1.2-2] of 3.1.1: return code 0x01, "unacceptable protocol version", then the connection is closed."""
    with Device(bridge) as before:  # a client already connected, to show it is not disturbed
        assert exchange(bridge.port, connect) == CONNACK_UNACCEPTABLE_PROTOCOL_VERSION
        assert isinstance(before.claim(bridge.provision_key), ClaimOk)
    with Device(bridge) as after:  # nor are clients connecting afterwards
        assert isinstance(after.claim(bridge.provision_key), ClaimOk)


@pytest.mark.parametrize("with_properties", [True, False], ids=["with-properties", "no-properties"])
def test_an_mqtt5_client_library_sees_unsupported_protocol_version(bridge: Bridge, with_properties: bool) -> None:
    """paho with MQTTv5 reads `20 02 00 01` as the MQTT 5 reason 0x84: a refusal, neither a hang nor a reset."""
    conn = MqttClient(bridge.port, f"hw-{uuid.uuid4().hex[:8]}", v5=True)
    reasons: queue.Queue[int] = queue.Queue()
    conn.client.on_connect = lambda _c, _u, _f, reason, _p: reasons.put(int(reason.value))
    properties = None
    if with_properties:  # what most MQTT 5 clients send, and what amqtt alone misread
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 60
        properties.ReceiveMaximum = 10
    with conn:
        conn.client.connect("127.0.0.1", bridge.port, keepalive=30, properties=properties)
        conn.client.loop_start()
        assert reasons.get(timeout=TIMEOUT) == UNSUPPORTED_PROTOCOL_VERSION
        assert conn.disconnected.wait(TIMEOUT)
    with Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk)
    assert can_connect(bridge.port, answer.device_id, answer.device_id, device.open(answer).mqtt.token)
