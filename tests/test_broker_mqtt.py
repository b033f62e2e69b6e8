"""The embedded broker end to end: real amqtt on loopback, real paho-mqtt 2.x clients.

The broker runs on its own event loop in a thread so tests can block on paho with timeouts.
A message that must *not* arrive is only checked once a message that must arrive, and that
the broker would have sent after it, is in: usually one sent later on the same connection
(amqtt handles a connection's packets in order and delivers through one FIFO queue). Where
the order comes from elsewhere, the test says so. No test asserts on timing.
"""

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from amqtt.broker import Broker
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

from broker.denylist import DENYLIST_FILE_NAME, Entries, render_denylist
from broker.embedded import (
    EmbeddedBrokerSettings,
    broker_config,
    start_embedded_broker,
    stop_embedded_broker,
)
from broker.errors import BrokerConfigError, BrokerStartError
from tests.helpers.amqtt import BrokerThread
from tests.helpers.mqtt import MqttClient
from tests.helpers.network import accepts_connections, free_port
from tests.helpers.waiting import wait_for

TIMEOUT = 5.0
SECRET = "bridge-secret-for-tests"
BRIDGE = "provbridge-bridge"
NOT_AUTHORIZED = 0x87  # paho 2 reports MQTT 3.1.1 CONNACK code 5 as the v5 reason code 0x87
IDENTIFIER_REJECTED = 0x85  # and code 2, "identifier rejected", as 0x85 "client identifier not valid"
SUBACK_FAILURE = 0x80
ROOT = Path(__file__).resolve().parent.parent

# --- keys, tokens and the data directory -------------------------------------------------------

SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())


def mint(
    device_id: str,
    *,
    pub: list[str],
    sub: list[str],
    key: Any = SIGNING_KEY,
    algorithm: str = "ES256",
    **overrides: Any,
) -> str:
    now = int(time.time())
    claims = {
        "iss": "provbridge",
        "aud": "provbridge-mqtt",
        "sub": device_id,
        "tenant": "acme",
        "iat": now,
        "exp": now + 600,
        "jti": f"jti-{device_id}",
        "acl": {"pub": pub, "sub": sub},
        **overrides,
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": "k1"})


def make_data_dir(path: Path) -> Path:
    jwk = {
        **ECAlgorithm.to_jwk(SIGNING_KEY.public_key(), as_dict=True),
        "kid": "k1",
        "alg": "ES256",
        "use": "sig",
    }
    (path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (path / "bridge.secret").write_text(SECRET + "\n")
    return path


# --- a broker on its own loop --------------------------------------------------------------------


def ours(settings: EmbeddedBrokerSettings) -> BrokerThread:
    return BrokerThread(lambda: start_embedded_broker(settings), stop_embedded_broker)


def stock(settings: EmbeddedBrokerSettings) -> BrokerThread:
    """amqtt's own Broker with exactly our configuration and plugin: the control for the fixes."""

    async def start() -> Broker:
        broker = Broker(broker_config(settings))
        await broker.start()
        return broker

    async def stop(broker: Broker) -> None:
        await broker.shutdown()

    return BrokerThread(start, stop)


def settings_for(data_dir: Path, **overrides: Any) -> EmbeddedBrokerSettings:
    return EmbeddedBrokerSettings(data_dir=data_dir, port=0, **overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("broker-data"))


@pytest.fixture(scope="module")
def shared_broker(data_dir: Path) -> Iterator[BrokerThread]:
    running = ours(settings_for(data_dir))
    yield running
    running.close()


@pytest.fixture
def port(shared_broker: BrokerThread) -> int:
    return shared_broker.port


# --- clients (tests/helpers/mqtt.py), closed after each test ------------------------------------


@pytest.fixture
def clients() -> Iterator[Callable[..., MqttClient]]:
    made: list[MqttClient] = []

    def make(*args: Any, **kwargs: Any) -> MqttClient:
        made.append(MqttClient(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


def connected(make: Callable[..., MqttClient], *args: Any, **kwargs: Any) -> MqttClient:
    client = make(*args, **kwargs)
    assert client.connack() == 0
    return client


def device(make: Callable[..., MqttClient], port: int, device_id: str, **acl: list[str]) -> MqttClient:
    token = mint(device_id, pub=acl.get("pub", []), sub=acl.get("sub", []))
    return connected(make, port, device_id, device_id, token)


def observer(make: Callable[..., MqttClient], port: int) -> MqttClient:
    """A device allowed to watch everything the tests publish, to catch what must not get through."""
    watcher = device(make, port, "observer", sub=["devices/#", "prov/v1/#"])
    assert watcher.subscribe("devices/#", "prov/v1/#", qos=0) == [0, 0]
    return watcher


# --- devices -------------------------------------------------------------------------------------


def test_device_publishes_and_subscribes_within_its_token_scope(port: int, clients: Any) -> None:
    d1 = device(clients, port, "dev-a", pub=["devices/dev-a/#"], sub=["devices/dev-a/cmd/#"])
    ops = device(clients, port, "ops-a", pub=["devices/+/cmd/#"], sub=["devices/+/telemetry"])
    assert d1.subscribe("devices/dev-a/cmd/+", qos=0) == [0]
    assert ops.subscribe("devices/+/telemetry", qos=0) == [0]

    d1.publish("devices/dev-a/telemetry", b"21.5")
    message = ops.next_message()
    assert (message.topic, message.payload) == ("devices/dev-a/telemetry", b"21.5")

    ops.publish("devices/dev-a/cmd/reboot", b"now")
    assert d1.next_message().topic == "devices/dev-a/cmd/reboot"


def test_device_publish_outside_its_scope_is_never_delivered(port: int, clients: Any) -> None:
    watcher = observer(clients, port)
    d1 = device(clients, port, "dev-b", pub=["devices/dev-b/#"])
    d1.publish("devices/dev-other/telemetry", b"forged")  # out of scope: dropped silently
    d1.publish("devices/dev-b/telemetry", b"real")  # in scope, and later on the same connection
    assert watcher.next_message().topic == "devices/dev-b/telemetry"
    assert watcher.received_topics() == []


def test_device_subscribe_outside_its_scope_gets_suback_failure(port: int, clients: Any) -> None:
    d1 = device(clients, port, "dev-c", sub=["devices/dev-c/cmd/#"])
    codes = d1.subscribe("devices/dev-c/cmd/#", "devices/#", "devices/dev-d/cmd/#", "#", "devices/+/cmd/#", qos=0)
    assert codes == [0, SUBACK_FAILURE, SUBACK_FAILURE, SUBACK_FAILURE, SUBACK_FAILURE]


FOREIGN_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    ("client_id", "make_token"),
    [
        ("dev-x", lambda: mint("dev-x", pub=["#"], sub=["#"], key=FOREIGN_KEY)),  # forged: other key
        ("dev-x", lambda: mint("dev-x", pub=["#"], sub=["#"], exp=int(time.time()) - 5)),
        ("dev-x", lambda: mint("dev-x", pub=["#"], sub=["#"], aud="other-audience")),
        ("dev-x", lambda: mint("dev-x", pub=["#"], sub=["#"], key=None, algorithm="none")),
        ("dev-x", lambda: mint("dev-x", pub=["#"], sub=["#"], key="k" * 32, algorithm="HS256")),
        ("dev-x", lambda: mint("dev-y", pub=["#"], sub=["#"])),  # token of another device
        ("dev-y", lambda: mint("dev-x", pub=["#"], sub=["#"])),  # client id != device id
    ],
    ids=["forged", "expired", "wrong-aud", "alg-none", "hs256", "other-sub", "other-client-id"],
)
def test_bad_device_credentials_are_refused(port: int, clients: Any, client_id: str, make_token: Any) -> None:
    assert clients(port, client_id, "dev-x", make_token()).connack() == NOT_AUTHORIZED


def test_token_expiring_mid_session_loses_access(shared_broker: BrokerThread, port: int, clients: Any) -> None:
    # SUBACK shows the broker's decision outright. A publish after expiry is dropped by the same
    # check (Grant.permits, unit-tested), but nothing later on that connection could prove it here.
    watcher = observer(clients, port)
    exp = int(time.time()) + 2
    will = ("devices/dev-exp/status", b"gone")
    token = mint("dev-exp", pub=["devices/dev-exp/#"], sub=["devices/dev-exp/#"], exp=exp)
    expiring = connected(clients, port, "dev-exp", "dev-exp", token, will=will)
    control = device(clients, port, "dev-ctl", pub=["devices/dev-ctl/#"])
    assert expiring.subscribe("devices/dev-exp/a", qos=0) == [0]
    while time.time() < exp + 0.1:  # waits for the clock, not for the broker
        time.sleep(0.1)
    assert expiring.subscribe("devices/dev-exp/b", qos=0) == [SUBACK_FAILURE]

    # Its will was allowed at CONNECT but is not any more: dropping the connection must not send it.
    expiring.drop()
    assert wait_for(lambda: disconnected(shared_broker, "dev-exp"), TIMEOUT, 0.01), "the broker never saw dev-exp go"
    # The will would have been queued for delivery before this, which the broker queues after.
    control.publish("devices/dev-ctl/marker")
    assert watcher.next_message().topic == "devices/dev-ctl/marker"
    assert watcher.received_topics() == []


def test_will_of_a_dropped_connection_is_delivered(shared_broker: BrokerThread, port: int, clients: Any) -> None:
    """The control for the test above: a dropped connection does publish an allowed will."""
    watcher = observer(clients, port)
    token = mint("dev-will", pub=["devices/dev-will/#"], sub=[])
    dropped = connected(clients, port, "dev-will", "dev-will", token, will=("devices/dev-will/status", b"gone"))
    dropped.drop()
    message = watcher.next_message()
    assert (message.topic, message.payload) == ("devices/dev-will/status", b"gone")


def disconnected(running: BrokerThread, client_id: str) -> bool:
    """Whether amqtt has handled the disconnect, will included (it may already have dropped the session)."""
    session = running.broker.sessions.get(client_id, (None, None))[0]
    return session is None or session.transitions.state == "disconnected"


# --- provisioning clients ----------------------------------------------------------------------


def test_provisioning_client_only_uses_its_own_claim_and_response_topics(port: int, clients: Any) -> None:
    bridge = connected(clients, port, "bridge-p", BRIDGE, SECRET)
    assert bridge.subscribe("prov/v1/claim/+", qos=0) == [0]
    watcher = observer(clients, port)
    hw = connected(clients, port, "hw-1")  # anonymous

    denied = ["prov/v1/res/hw-2", "#", "prov/v1/events/#", "prov/v1/claim/+", "prov/v1/res/+"]
    assert hw.subscribe("prov/v1/res/hw-1", *denied, qos=0) == [0] + [SUBACK_FAILURE] * len(denied)

    hw.publish("prov/v1/claim/hw-2", b"impersonation")
    hw.publish("prov/v1/events/acme/device_created", b"fake event")
    hw.publish("prov/v1/res/hw-1", b"self-answer")
    hw.publish("prov/v1/claim/hw-1", b"claim")
    assert bridge.next_message().topic == "prov/v1/claim/hw-1"
    assert watcher.next_message().topic == "prov/v1/claim/hw-1"
    assert bridge.received_topics() == watcher.received_topics() == []

    bridge.publish("prov/v1/res/hw-1", b"answer")
    assert hw.next_message().payload == b"answer"


def test_provision_username_is_a_provisioning_client(port: int, clients: Any) -> None:
    hw = connected(clients, port, "hw-2", "provision", "whatever")
    assert hw.subscribe("prov/v1/res/hw-2", "prov/v1/res/hw-1", qos=0) == [0, SUBACK_FAILURE]


@pytest.mark.parametrize("client_id", ["has space", "x" * 65, "a/b", "plus+"])
def test_provisioning_client_id_must_be_topic_safe(port: int, clients: Any, client_id: str) -> None:
    assert clients(port, client_id).connack() == IDENTIFIER_REJECTED  # [MQTT-3.1.3-9]


def test_will_on_a_topic_the_client_may_not_publish_is_refused(port: int, clients: Any) -> None:
    assert clients(port, "hw-w1", will=("prov/v1/res/hw-other", b"fake")).connack() == NOT_AUTHORIZED
    assert clients(port, "hw-w2", will=("prov/v1/claim/hw-w2", b"bye")).connack() == 0


def test_anonymous_provisioning_can_be_disabled(data_dir: Path, clients: Any) -> None:
    running = ours(settings_for(data_dir, allow_anonymous_provisioning=False))
    try:
        assert clients(running.port, "hw-3").connack() == NOT_AUTHORIZED
        assert clients(running.port, "hw-3", "provision", "").connack() == 0
    finally:
        running.close()


def test_persistent_device_session_resumes_for_that_device_only(port: int, clients: Any) -> None:
    token = mint("dev-p", pub=[], sub=["devices/dev-p/#"])
    first = connected(clients, port, "dev-p", "dev-p", token, clean_session=False)
    assert first.subscribe("devices/dev-p/#", qos=0) == [0]
    first.close()
    assert clients(port, "dev-p", clean_session=False).connack() == NOT_AUTHORIZED  # anonymous squatter
    again = connected(clients, port, "dev-p", "dev-p", token, clean_session=False)
    assert again.session_present
    device(clients, port, "ops-p", pub=["devices/+/cmd"]).publish("devices/dev-p/cmd")
    assert again.next_message().topic == "devices/dev-p/cmd"  # the subscription survived


# --- the bridge ----------------------------------------------------------------------------------


def test_bridge_account_needs_the_secret(port: int, clients: Any) -> None:
    assert clients(port, "bridge-x", BRIDGE, "wrong").connack() == NOT_AUTHORIZED
    assert clients(port, "bridge-x", BRIDGE).connack() == NOT_AUTHORIZED
    bridge = connected(clients, port, "bridge-x", BRIDGE, SECRET)
    codes = bridge.subscribe("prov/v1/claim/+", "$share/bridges/prov/v1/claim/+", "#", "prov/v1/res/+", qos=0)
    assert codes == [0, 0, SUBACK_FAILURE, SUBACK_FAILURE]


# --- what stock amqtt gets wrong -----------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["stock", "ours"])
def test_retained_messages_reach_only_their_own_subscribers(data_dir: Path, clients: Any, flavour: str) -> None:
    """Stock amqtt replays, on every CONNECT, the retained messages of *all* subscriptions.

    The "stock" case is the control: it asserts the leak exists, so if amqtt fixes it this test
    says so and the override can go.
    """
    running = (stock if flavour == "stock" else ours)(settings_for(data_dir))
    try:
        owner = device(clients, running.port, "dev-r", pub=["devices/dev-r/#"], sub=["devices/dev-r/#"])
        assert owner.subscribe("devices/dev-r/#", qos=0) == [0]
        owner.publish("devices/dev-r/config", b"wifi-password", retain=True)
        assert owner.next_message().topic == "devices/dev-r/config"  # the broker has stored it by now
        bridge = connected(clients, running.port, "bridge-r", BRIDGE, SECRET)
        bridge.publish("prov/v1/res/hw-r", b"your answer", retain=True)

        newcomer = connected(clients, running.port, "hw-r")  # anonymous, subscribed to nothing yet
        assert newcomer.subscribe("prov/v1/res/hw-r", qos=0) == [0]
        # Whatever is replayed at CONNECT is sent before the retained answer to this SUBSCRIBE.
        topics = [newcomer.next_message().topic]
        while topics[-1] != "prov/v1/res/hw-r":
            topics.append(newcomer.next_message().topic)
        topics += newcomer.received_topics()
        if flavour == "stock":
            leaked = ["devices/dev-r/config", "prov/v1/res/hw-r"]
            assert topics == leaked, "stock amqtt no longer leaks: is the override still needed?"
        else:
            assert topics == ["prov/v1/res/hw-r"]
    finally:
        running.close()


@pytest.mark.parametrize("flavour", ["stock", "ours"])
def test_a_client_id_cannot_be_taken_from_another_principal(data_dir: Path, clients: Any, flavour: str) -> None:
    """Stock amqtt lets any accepted CONNECT take over a client id, whoever holds it."""
    running = (stock if flavour == "stock" else ours)(settings_for(data_dir))
    try:
        bridge = connected(clients, running.port, "bridge-t", BRIDGE, SECRET)
        assert bridge.subscribe("prov/v1/claim/+", qos=0) == [0]
        squatter = clients(running.port, "bridge-t")  # anonymous, the bridge's client id
        if flavour == "stock":
            assert squatter.connack() == 0, "stock amqtt refuses the takeover now: drop the override?"
            return
        assert squatter.connack() == NOT_AUTHORIZED
        connected(clients, running.port, "hw-t").publish("prov/v1/claim/hw-t")
        assert bridge.next_message().topic == "prov/v1/claim/hw-t"  # still subscribed, still connected
        assert not bridge.disconnected.is_set()
    finally:
        running.close()


@pytest.mark.parametrize("flavour", ["stock", "ours"])
def test_a_refused_connect_leaves_the_session_of_its_client_id_alone(
    data_dir: Path, clients: Any, flavour: str
) -> None:
    """Stock amqtt drops the old session of a clean CONNECT before it authenticates it."""
    running = (stock if flavour == "stock" else ours)(settings_for(data_dir))
    try:
        d1 = device(clients, running.port, "dev-s", sub=["devices/dev-s/#"])
        assert d1.subscribe("devices/dev-s/#", qos=0) == [0]
        forged = mint("dev-s", pub=["#"], sub=["#"], key=FOREIGN_KEY)
        assert clients(running.port, "dev-s", "dev-s", forged).connack() == NOT_AUTHORIZED
        subscribers = [s.client_id for s, _ in running.broker.subscriptions.get("devices/dev-s/#", [])]
        if flavour == "stock":
            assert subscribers == [], "stock amqtt keeps the session now: is the override still needed?"
            return
        assert subscribers == ["dev-s"]
        device(clients, running.port, "ops-s", pub=["devices/+/cmd"]).publish("devices/dev-s/cmd")
        assert d1.next_message().topic == "devices/dev-s/cmd"
    finally:
        running.close()


def test_clean_session_takeover_by_the_same_device_closes_the_old_connection(port: int, clients: Any) -> None:
    first = device(clients, port, "dev-t", sub=["devices/dev-t/#"])
    second = device(clients, port, "dev-t", sub=["devices/dev-t/#"])
    assert first.disconnected.wait(TIMEOUT)
    assert second.subscribe("devices/dev-t/#", qos=0) == [0]


# --- revocation ----------------------------------------------------------------------------------


def test_a_revoked_device_is_refused_until_the_check_ends_its_session_and_its_will_is_dropped(
    tmp_path: Path, clients: Any
) -> None:
    """The denylist refuses a live session's packets at once; the revocation check then ends it.

    The periodic check is set far apart here and run by hand, so the refusals in between can be seen
    (tests/test_broker_promises.py shows a revocation ending the session with the default period).
    """
    data = make_data_dir(tmp_path)
    running = ours(settings_for(data, revocation_check_seconds=3600))
    try:
        watcher = observer(clients, running.port)
        token = mint("dev-rv", pub=["devices/dev-rv/#"], sub=["devices/dev-rv/#"])
        revoked = connected(clients, running.port, "dev-rv", "dev-rv", token, will=("devices/dev-rv/status", b"gone"))
        control = device(clients, running.port, "dev-ok", pub=["devices/dev-ok/#"])
        assert revoked.subscribe("devices/dev-rv/a", qos=0) == [0]
        (data / DENYLIST_FILE_NAME).write_bytes(render_denylist(Entries({"dev-rv": int(time.time()) + 3600})))

        assert revoked.subscribe("devices/dev-rv/b", qos=0) == [SUBACK_FAILURE]
        revoked.publish("devices/dev-rv/up", b"after")  # MQTT 3.1.1: acknowledged, then dropped by the ACL
        control.publish("devices/dev-ok/marker")  # queued after "after" would have been
        assert watcher.next_message().topic == "devices/dev-ok/marker"
        assert not revoked.disconnected.is_set()

        ended = asyncio.run_coroutine_threadsafe(running.broker.end_revoked_sessions(time.time()), running.loop)
        assert ended.result(TIMEOUT) == 1 and revoked.disconnected.wait(TIMEOUT)
        # The will would have been queued by now.
        assert wait_for(lambda: disconnected(running, "dev-rv"), TIMEOUT, 0.01), "the broker never saw dev-rv go"
        control.publish("devices/dev-ok/marker")
        assert watcher.next_message().topic == "devices/dev-ok/marker"
        assert watcher.received_topics() == []  # neither "after" nor the revoked device's will
        assert clients(running.port, "dev-rv", "dev-rv", mint("dev-rv", pub=[], sub=[])).connack() == NOT_AUTHORIZED
    finally:
        running.close()


# --- lifecycle and hygiene ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 70000},
        {"prefix": "prov/#"},
        {"bridge_username": "provision"},
        {"tls_cert_file": Path("c.pem")},
        {"revocation_check_seconds": 0},
    ],
)
def test_settings_are_checked_up_front(data_dir: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(BrokerConfigError):
        EmbeddedBrokerSettings(data_dir=data_dir, **bad)


def test_broker_config_has_one_tcp_listener_and_only_our_plugin(data_dir: Path) -> None:
    config = broker_config(EmbeddedBrokerSettings(data_dir=data_dir, host="::1", port=1884))
    assert config["listeners"] == {"default": {"type": "tcp", "bind": "[::1]:1884"}}
    assert list(config["plugins"]) == ["broker.plugin.ProvbridgeAclPlugin"]  # no $SYS, no packet logger


def test_start_fails_cleanly_when_the_port_is_taken(data_dir: Path, port: int) -> None:
    settings = EmbeddedBrokerSettings(data_dir=data_dir, port=port)

    async def start() -> None:
        await start_embedded_broker(settings)

    with pytest.raises(BrokerStartError):
        asyncio.run(start())


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "broker.crt", directory / "broker.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_tls_listener(data_dir: Path, tmp_path: Path, clients: Any) -> None:
    cert_file, key_file = _self_signed_certificate(tmp_path)
    running = ours(settings_for(data_dir, tls_cert_file=cert_file, tls_key_file=key_file))
    try:
        bridge = connected(clients, running.port, "bridge-tls", BRIDGE, SECRET, ca_file=cert_file)
        assert bridge.subscribe("prov/v1/claim/+", qos=0) == [0]
    finally:
        running.close()


def test_tokens_and_passwords_never_reach_the_logs(port: int, clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = mint("dev-l", pub=[], sub=[])
    forged = mint("dev-l", pub=[], sub=[], key=FOREIGN_KEY)
    connected(clients, port, "dev-l", "dev-l", token)
    assert clients(port, "dev-l2", "dev-l", forged).connack() == NOT_AUTHORIZED
    assert clients(port, "bridge-l", BRIDGE, "wrong-password").connack() == NOT_AUTHORIZED
    connected(clients, port, "bridge-l", BRIDGE, SECRET)
    text = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (token, forged, SECRET, "wrong-password"):
        assert secret not in text


def test_run_broker_forever_stops_cleanly_on_sigterm(data_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    script = (
        "import logging, sys; from pathlib import Path;"
        "from broker.embedded import EmbeddedBrokerSettings, run_broker_forever;"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr);"
        f"run_broker_forever(EmbeddedBrokerSettings(data_dir=Path({str(data_dir)!r}), port={port}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "broker.log", "wb") as log:  # kept for the whole-suite secret scan
        process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:

        def listening() -> bool:
            assert process.poll() is None, "the broker process exited"
            return accepts_connections(port)

        # Generous: a cold interpreter imports amqtt first.
        assert wait_for(listening, timeout=TIMEOUT * 2), "the broker never listened"
        probe_client = MqttClient(port, "hw-sig")
        assert probe_client.connack() == 0
        probe_client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        process.kill()
        process.wait()
