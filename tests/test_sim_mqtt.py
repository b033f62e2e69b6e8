"""The simulator's MQTT side against a real broker (amqtt, in-process) and a scripted stand-in bridge.

The stand-in answers claims the way protocol v1 says (provwire only), so these tests check the
device's I/O - SUBACK before claim, same request_id on re-sends, retry_after, stale answers, token
connect - without the real bridge. End-to-end tests against the bridge live elsewhere.
"""

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim import cli
from device_sim.device import DeviceIdentity, claim_over_mqtt, connect_with_token
from device_sim.errors import BrokerRefused, Cancelled, ClaimRejected, ClaimTimeout, ConnectError
from device_sim.session import Session
from device_sim.vault import Vault
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import Claim, ClaimError, ClaimOk, Credentials, MqttCredentials, Sealed, to_json
from tests.helpers.amqtt import BrokerThread
from tests.helpers.mqtt import MqttClient
from tests.helpers.network import free_port

PREFIX = topics.DEFAULT_PREFIX
PROVISION_KEY = "pk_test_secret_value"


def stock_amqtt(allow_anonymous: bool = True) -> BrokerThread:
    """Stock amqtt on a free loopback port, on its own event loop thread."""
    config = {
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": allow_anonymous}},
    }

    async def start() -> Broker:
        broker = Broker(config)
        await broker.start()
        return broker

    async def stop(broker: Broker) -> None:
        with contextlib.suppress(Exception):
            await broker.shutdown()

    return BrokerThread(start, stop)


class FakeBridge:
    """Answers claims per protocol v1. `script` holds one action per claim message received:
    "ok", "drop" (no answer), or an ErrorCode value answered as an error (errors are not replayed)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cloud = crypto.generate_private_key()
        self.script: list[str] = []
        self.claims: list[tuple[str, Claim]] = []  # (client id of the topic, claim)
        self.answers: dict[str, bytes] = {}  # replay cache: one answer per request_id
        self.devices: dict[bytes, str] = {}  # public key -> device id
        self.lock = threading.Lock()
        self.conn = MqttClient(port, "fake-bridge")
        self.conn.client.on_message = self._on_message  # claims answered on paho's thread, as they come
        assert self.conn.connect(), "fake bridge did not connect"
        self.conn.subscribe(topics.claim_subscription(PREFIX))  # asserts its SUBACK came

    def close(self) -> None:
        self.conn.close()

    @property
    def cloud_public(self) -> ec.EllipticCurvePublicKey:
        return self.cloud.public_key()

    def _on_message(self, client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        client_id = topics.client_id_of_claim_topic(PREFIX, message.topic)
        if client_id is None:
            # amqtt 0.12.1 pushes retained messages of other clients' subscriptions to every new
            # connection (broker.py, after CLIENT_CONNECTED); a bridge must ignore them too.
            return
        claim = Claim.model_validate_json(message.payload)
        with self.lock:
            self.claims.append((client_id, claim))
            action = self.script.pop(0) if self.script else "ok"
        if action == "drop":
            return
        reply = self.answers.get(claim.request_id)
        if reply is None and action != "ok":
            code = ErrorCode(action)
            retry_after = 0 if code.retryable else None
            reply = to_json(
                ClaimError(request_id=claim.request_id, code=code, message="scripted", retry_after=retry_after)
            )
        elif reply is None:
            reply = self._accept(claim)
        client.publish(topics.response_topic(PREFIX, client_id), reply, qos=1)

    def _accept(self, claim: Claim) -> bytes:
        with self.lock:
            created = claim.public_key_sec1 not in self.devices
            device_id = self.devices.setdefault(claim.public_key_sec1, f"dev-{len(self.devices) + 1}")
        credentials = Credentials(
            api_key="ak_secret_" + device_id if created else "",
            mqtt=MqttCredentials(
                host="broker.example",
                port=8883,
                tls=False,
                client_id=device_id,
                username=device_id,
                token="tok_secret_" + device_id,
                expires_at=int(time.time()) + 3600,
                publish=[f"devices/{device_id}/#"],
                subscribe=[f"devices/{device_id}/#"],
            ),
        )
        shared = crypto.shared_secret(self.cloud, crypto.public_key_from_sec1(claim.public_key_sec1))
        box = crypto.seal(crypto.derive_seal_key(shared, claim.request_id), to_json(credentials), claim.request_id)
        answer = to_json(
            ClaimOk(
                request_id=claim.request_id,
                device_id=device_id,
                created=created,
                labels={},
                groups=[],
                profile="default",
                cloud_key_id=crypto.key_id(self.cloud_public),
                sealed=Sealed(nonce=crypto.b64encode(box.nonce), ciphertext=crypto.b64encode(box.ciphertext)),
            )
        )
        self.answers[claim.request_id] = answer
        return answer


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with stock_amqtt() as b:
        yield b


@pytest.fixture
def bridge(broker: BrokerThread) -> Iterator[FakeBridge]:
    fake = FakeBridge(broker.port)
    yield fake
    fake.close()


def test_claim_then_connect_with_token(bridge: FakeBridge) -> None:
    identity = DeviceIdentity.generate("sim-mqtt-000001")
    result = claim_over_mqtt("127.0.0.1", bridge.port, identity, PROVISION_KEY, bridge.cloud_public, timeout=5)
    assert result.created and result.device_id == "dev-1" and result.attempts == 1
    assert result.latency_s is not None and 0 < result.latency_s < 5
    assert result.credentials.api_key == "ak_secret_dev-1"
    client_id, claim = bridge.claims[0]
    assert client_id == identity.client_id == "sim-mqtt-000001"
    assert claim.cloud_key_id == crypto.key_id(bridge.cloud_public)
    assert claim.provision_key == PROVISION_KEY
    # The advertised host (broker.example:8883) is not reachable from here: the given one is used.
    topic = connect_with_token("127.0.0.1", bridge.port, result.credentials, timeout=5)
    assert topic == "devices/dev-1/hello"  # published, acknowledged and received back


def test_token_connect_without_a_covering_subscription_relies_on_puback(bridge: FakeBridge) -> None:
    result = claim_over_mqtt(
        "127.0.0.1",
        bridge.port,
        DeviceIdentity.generate("sim-mqtt-000011"),
        PROVISION_KEY,
        bridge.cloud_public,
    )
    mqtt_creds = result.credentials.mqtt.model_copy(update={"publish": ["t/+/up/#"], "subscribe": []})
    credentials = result.credentials.model_copy(update={"mqtt": mqtt_creds})
    assert connect_with_token("127.0.0.1", bridge.port, credentials, timeout=5) == "t/sim/up/hello"


def test_sessions_disable_nagle(broker: BrokerThread) -> None:
    session = Session("nodelay-check")
    try:
        session.connect("127.0.0.1", broker.port, time.monotonic() + 5)
        sock = session.client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        session.close()
    assert session.client.socket() is None  # DISCONNECT sent and the socket closed


def test_no_answer_is_resent_with_the_same_request_id(bridge: FakeBridge) -> None:
    bridge.script = ["drop"]
    identity = DeviceIdentity.generate("sim-mqtt-000002")
    result = claim_over_mqtt(
        "127.0.0.1",
        bridge.port,
        identity,
        PROVISION_KEY,
        bridge.cloud_public,
        timeout=0.3,
        request_id="r-fixed-0002",
    )
    assert result.attempts == 2
    assert [c.request_id for _, c in bridge.claims] == ["r-fixed-0002", "r-fixed-0002"]


def test_rate_limited_is_retried_then_succeeds(bridge: FakeBridge) -> None:
    bridge.script = [ErrorCode.RATE_LIMITED.value, ErrorCode.INTERNAL_ERROR.value, "ok"]
    result = claim_over_mqtt(
        "127.0.0.1",
        bridge.port,
        DeviceIdentity.generate("sim-mqtt-000003"),
        PROVISION_KEY,
        bridge.cloud_public,
        timeout=5,
    )
    assert result.attempts == 3
    assert len({c.request_id for _, c in bridge.claims}) == 1


def test_final_error_is_not_retried(bridge: FakeBridge) -> None:
    bridge.script = [ErrorCode.PERMISSION_DENIED.value]
    with pytest.raises(ClaimRejected) as info:
        claim_over_mqtt(
            "127.0.0.1",
            bridge.port,
            DeviceIdentity.generate("sim-mqtt-000004"),
            PROVISION_KEY,
            bridge.cloud_public,
        )
    assert info.value.code is ErrorCode.PERMISSION_DENIED
    assert len(bridge.claims) == 1


def test_retryable_error_on_the_last_attempt_is_raised(bridge: FakeBridge) -> None:
    bridge.script = [ErrorCode.RATE_LIMITED.value] * 2
    with pytest.raises(ClaimRejected) as info:
        claim_over_mqtt(
            "127.0.0.1",
            bridge.port,
            DeviceIdentity.generate("sim-mqtt-000005"),
            PROVISION_KEY,
            bridge.cloud_public,
            max_attempts=2,
        )
    assert info.value.code is ErrorCode.RATE_LIMITED and len(bridge.claims) == 2


def test_timeout_after_max_attempts(bridge: FakeBridge) -> None:
    bridge.script = ["drop"] * 3
    with pytest.raises(ClaimTimeout):
        claim_over_mqtt(
            "127.0.0.1",
            bridge.port,
            DeviceIdentity.generate("sim-mqtt-000006"),
            PROVISION_KEY,
            bridge.cloud_public,
            timeout=0.1,
            max_attempts=3,
        )
    assert len(bridge.claims) == 3


def _publish_retained(port: int, topic: str, payload: bytes) -> None:
    with MqttClient(port, "retainer") as publisher:
        assert publisher.connect()
        publisher.publish(topic, payload, retain=True)


def test_cancel_stops_a_waiting_claim_promptly(bridge: FakeBridge) -> None:
    bridge.script = ["drop"]
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        claim_over_mqtt(
            "127.0.0.1",
            bridge.port,
            DeviceIdentity.generate("sim-mqtt-000012"),
            PROVISION_KEY,
            bridge.cloud_public,
            timeout=30,
            cancel=cancel,
        )
    assert time.monotonic() - started < 2


def test_retained_stale_answer_is_ignored(bridge: FakeBridge) -> None:
    identity = DeviceIdentity.generate("sim-mqtt-000007")
    topic = topics.response_topic(PREFIX, identity.client_id)
    stale = to_json(ClaimError(request_id="r-from-last-week", code=ErrorCode.PERMISSION_DENIED, message="old"))
    _publish_retained(bridge.port, topic, stale)
    try:
        result = claim_over_mqtt("127.0.0.1", bridge.port, identity, PROVISION_KEY, bridge.cloud_public, timeout=5)
    finally:
        _publish_retained(bridge.port, topic, b"")  # an empty retained message clears it
    assert result.created


def test_reclaim_with_the_same_key_is_idempotent(bridge: FakeBridge, tmp_path: Path) -> None:
    identity = DeviceIdentity.load_or_create(tmp_path / "dev", "sim-mqtt-000008")
    first = claim_over_mqtt("127.0.0.1", bridge.port, identity, PROVISION_KEY, bridge.cloud_public)
    again_identity = DeviceIdentity.load_or_create(tmp_path / "dev", "sim-mqtt-000008")
    again = claim_over_mqtt("127.0.0.1", bridge.port, again_identity, PROVISION_KEY, bridge.cloud_public)
    assert first.created and not again.created and first.device_id == again.device_id


def test_unreachable_broker_is_a_connect_error() -> None:
    port = free_port()  # nothing listens here
    started = time.monotonic()
    with pytest.raises(ConnectError):
        claim_over_mqtt(
            "127.0.0.1",
            port,
            DeviceIdentity.generate("sim-mqtt-000009"),
            PROVISION_KEY,
            crypto.generate_private_key().public_key(),
            timeout=0.2,
            max_attempts=2,
        )
    assert time.monotonic() - started < 10


def test_broker_refusal_is_final_and_fast() -> None:
    with stock_amqtt(allow_anonymous=False) as closed:
        started = time.monotonic()
        with pytest.raises(BrokerRefused):
            claim_over_mqtt(
                "127.0.0.1",
                closed.port,
                DeviceIdentity.generate("sim-mqtt-000010"),
                PROVISION_KEY,
                crypto.generate_private_key().public_key(),
                timeout=5,
                max_attempts=5,
            )
        assert time.monotonic() - started < 5


# --- the CLI against the stand-in bridge ----------------------------------------------------------------


def _write_cloud_pem(bridge: FakeBridge, path: Path) -> Path:
    path.write_bytes(
        bridge.cloud_public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


def test_cli_provisions_a_fleet_and_reports_json(
    bridge: FakeBridge, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.KEY_ENV, PROVISION_KEY)
    pem = _write_cloud_pem(bridge, tmp_path / "cloud_public.pem")
    argv = ["--port", str(bridge.port), "--cloud-key", str(pem), "--devices", "12", "--concurrency", "4"]
    argv += ["--state-dir", str(tmp_path / "sim"), "--hardware-id-prefix", "cli-", "--timeout", "5", "--json"]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["ok"] is True and doc["succeeded"] == 12 and doc["created"] == 12
    assert doc["latency_ms"]["p50"] is not None and doc["latency_ms"]["max"] >= doc["latency_ms"]["p95"]
    assert [r["hardware_id"] for r in doc["results"]] == [f"cli-{i:06d}" for i in range(1, 13)]
    for secret in (PROVISION_KEY, "ak_secret", "tok_secret"):
        assert secret not in out.out and secret not in out.err
    vault = Vault(tmp_path / "sim" / "cli-000001").load()
    assert vault is not None and vault.api_key.startswith("ak_secret_")

    # A re-run re-claims the same devices with the same keys; the vault keeps the first api_key.
    assert cli.main([a for a in argv if a != "--json"]) == 0
    table = capsys.readouterr().out
    assert "cli-000012" in table and "12/12 devices ok (0 created)" in table
    again = Vault(tmp_path / "sim" / "cli-000001").load()
    assert again is not None and again.api_key == vault.api_key


def test_cli_reports_failures_with_exit_1(
    bridge: FakeBridge, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge.script = ["ok", ErrorCode.PERMISSION_DENIED.value]
    pem = _write_cloud_pem(bridge, tmp_path / "cloud.pem")
    argv = ["--port", str(bridge.port), "--cloud-key", str(pem), "--key", PROVISION_KEY, "--devices", "2"]
    argv += ["--concurrency", "1", "--state-dir", str(tmp_path / "sim"), "--hardware-id-prefix", "f-"]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "1/2 devices ok" in out and "rejected: permission_denied" in out
    assert PROVISION_KEY not in out
