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
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import jwt
import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm
from paho.mqtt.enums import CallbackAPIVersion

from broker.denylist import DENYLIST_FILE_NAME, render_denylist
from broker.embedded import (
    EmbeddedBrokerSettings,
    broker_config,
    start_embedded_broker,
    stop_embedded_broker,
)
from broker.errors import BrokerConfigError, BrokerStartError
from broker.server import bound_port

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


class BrokerThread:
    def __init__(
        self,
        start: Callable[[], Coroutine[Any, Any, Any]],
        stop: Callable[[Any], Coroutine[Any, Any, None]],
    ) -> None:
        self._stop = stop
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="broker", daemon=True)
        self.thread.start()
        self.broker = asyncio.run_coroutine_threadsafe(start(), self.loop).result(TIMEOUT)
        self.port = bound_port(self.broker)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(self.broker), self.loop).result(TIMEOUT)
        asyncio.run_coroutine_threadsafe(self._drain(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    @staticmethod
    async def _drain() -> None:
        """End what shutdown leaves running, as asyncio.run would at exit.

        Connection tasks wind down on their own within a few loop turns; only stock amqtt leaves
        one open for good: the orphan of a session it dropped without closing its connection.
        """
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}
        if leftovers:
            _, pending = await asyncio.wait(leftovers, timeout=0.25)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


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


# --- a blocking paho client ----------------------------------------------------------------------


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small packets go out at once


class Client:
    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = True,
        tls_ca: Path | None = None,
    ) -> None:
        self.port = port
        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            reconnect_on_failure=False,  # a kicked client must stay kicked during a test
        )
        if username is not None:
            self.mqtt.username_pw_set(username, password)
        if will is not None:
            self.mqtt.will_set(will[0], will[1])
        if tls_ca is not None:
            self.mqtt.tls_set(ca_certs=str(tls_ca))
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: int | None = None
        self.session_present = False
        self._subacks: dict[int, list[int]] = {}
        self._suback_event = threading.Condition()
        self.mqtt.on_socket_open = _no_delay
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_disconnect = lambda *_args: self.disconnected.set()
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_message = lambda _c, _u, message: self.messages.put(message)

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connack = reason.value
        self.session_present = bool(_flags.session_present)
        self.connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _props: Any) -> None:
        with self._suback_event:
            self._subacks[mid] = [r.value for r in reasons]
            self._suback_event.notify_all()

    def connect(self) -> int:
        """The CONNACK return code. Looped by hand until then, so a refusal leaves no thread behind."""
        self.mqtt.connect("127.0.0.1", self.port, keepalive=30)
        deadline = time.monotonic() + TIMEOUT
        while not self.connected.is_set() and time.monotonic() < deadline:
            self.mqtt.loop(timeout=0.05)
        assert self.connack is not None, "no CONNACK"
        if self.connack == 0:
            self.mqtt.loop_start()
        return self.connack

    def subscribe(self, *filters: str, qos: int = 0) -> list[int]:
        """SUBACK return codes, one per filter: the granted QoS or 0x80."""
        _, mid = self.mqtt.subscribe([(f, qos) for f in filters])
        assert mid is not None
        with self._suback_event:
            assert self._suback_event.wait_for(lambda: mid in self._subacks, TIMEOUT), "no SUBACK"
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False) -> None:
        self.mqtt.publish(topic, payload, qos=1, retain=retain).wait_for_publish(TIMEOUT)

    def expect(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def received_topics(self) -> list[str]:
        topics = []
        while not self.messages.empty():
            topics.append(self.messages.get_nowait().topic)
        return topics

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT, as a crashed device would: the will goes out."""
        sock = self.mqtt.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # also wakes paho's network thread, which then ends
        self.mqtt.loop_stop()

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        made.append(Client(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


def connected(make: Callable[..., Client], *args: Any, **kwargs: Any) -> Client:
    client = make(*args, **kwargs)
    assert client.connect() == 0
    return client


def device(make: Callable[..., Client], port: int, device_id: str, **acl: list[str]) -> Client:
    token = mint(device_id, pub=acl.get("pub", []), sub=acl.get("sub", []))
    return connected(make, port, device_id, device_id, token)


def observer(make: Callable[..., Client], port: int) -> Client:
    """A device allowed to watch everything the tests publish, to catch what must not get through."""
    watcher = device(make, port, "observer", sub=["devices/#", "prov/v1/#"])
    assert watcher.subscribe("devices/#", "prov/v1/#") == [0, 0]
    return watcher


# --- devices -------------------------------------------------------------------------------------


def test_device_publishes_and_subscribes_within_its_token_scope(port: int, clients: Any) -> None:
    d1 = device(clients, port, "dev-a", pub=["devices/dev-a/#"], sub=["devices/dev-a/cmd/#"])
    ops = device(clients, port, "ops-a", pub=["devices/+/cmd/#"], sub=["devices/+/telemetry"])
    assert d1.subscribe("devices/dev-a/cmd/+") == [0]
    assert ops.subscribe("devices/+/telemetry") == [0]

    d1.publish("devices/dev-a/telemetry", b"21.5")
    message = ops.expect()
    assert (message.topic, message.payload) == ("devices/dev-a/telemetry", b"21.5")

    ops.publish("devices/dev-a/cmd/reboot", b"now")
    assert d1.expect().topic == "devices/dev-a/cmd/reboot"


def test_device_publish_outside_its_scope_is_never_delivered(port: int, clients: Any) -> None:
    watcher = observer(clients, port)
    d1 = device(clients, port, "dev-b", pub=["devices/dev-b/#"])
    d1.publish("devices/dev-other/telemetry", b"forged")  # out of scope: dropped silently
    d1.publish("devices/dev-b/telemetry", b"real")  # in scope, and later on the same connection
    assert watcher.expect().topic == "devices/dev-b/telemetry"
    assert watcher.received_topics() == []


def test_device_subscribe_outside_its_scope_gets_suback_failure(port: int, clients: Any) -> None:
    d1 = device(clients, port, "dev-c", sub=["devices/dev-c/cmd/#"])
    codes = d1.subscribe("devices/dev-c/cmd/#", "devices/#", "devices/dev-d/cmd/#", "#", "devices/+/cmd/#")
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
    assert clients(port, client_id, "dev-x", make_token()).connect() == NOT_AUTHORIZED


def test_token_expiring_mid_session_loses_access(shared_broker: BrokerThread, port: int, clients: Any) -> None:
    # SUBACK shows the broker's decision outright. A publish after expiry is dropped by the same
    # check (Grant.permits, unit-tested), but nothing later on that connection could prove it here.
    watcher = observer(clients, port)
    exp = int(time.time()) + 2
    will = ("devices/dev-exp/status", b"gone")
    token = mint("dev-exp", pub=["devices/dev-exp/#"], sub=["devices/dev-exp/#"], exp=exp)
    expiring = connected(clients, port, "dev-exp", "dev-exp", token, will=will)
    control = device(clients, port, "dev-ctl", pub=["devices/dev-ctl/#"])
    assert expiring.subscribe("devices/dev-exp/a") == [0]
    while time.time() < exp + 0.1:  # waits for the clock, not for the broker
        time.sleep(0.1)
    assert expiring.subscribe("devices/dev-exp/b") == [SUBACK_FAILURE]

    # Its will was allowed at CONNECT but is not any more: dropping the connection must not send it.
    expiring.drop()
    wait_until_disconnected(shared_broker, "dev-exp")
    # The will would have been queued for delivery before this, which the broker queues after.
    control.publish("devices/dev-ctl/marker")
    assert watcher.expect().topic == "devices/dev-ctl/marker"
    assert watcher.received_topics() == []


def test_will_of_a_dropped_connection_is_delivered(shared_broker: BrokerThread, port: int, clients: Any) -> None:
    """The control for the test above: a dropped connection does publish an allowed will."""
    watcher = observer(clients, port)
    token = mint("dev-will", pub=["devices/dev-will/#"], sub=[])
    dropped = connected(clients, port, "dev-will", "dev-will", token, will=("devices/dev-will/status", b"gone"))
    dropped.drop()
    message = watcher.expect()
    assert (message.topic, message.payload) == ("devices/dev-will/status", b"gone")


def wait_until_disconnected(running: BrokerThread, client_id: str) -> None:
    """Until amqtt has handled the disconnect, will included (it may already have dropped the session)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        session = running.broker.sessions.get(client_id, (None, None))[0]
        if session is None or session.transitions.state == "disconnected":
            return
        assert time.monotonic() < deadline, f"the broker never saw {client_id} go"
        time.sleep(0.01)


# --- provisioning clients ----------------------------------------------------------------------


def test_provisioning_client_only_uses_its_own_claim_and_response_topics(port: int, clients: Any) -> None:
    bridge = connected(clients, port, "bridge-p", BRIDGE, SECRET)
    assert bridge.subscribe("prov/v1/claim/+") == [0]
    watcher = observer(clients, port)
    hw = connected(clients, port, "hw-1")  # anonymous

    denied = ["prov/v1/res/hw-2", "#", "prov/v1/events/#", "prov/v1/claim/+", "prov/v1/res/+"]
    assert hw.subscribe("prov/v1/res/hw-1", *denied) == [0] + [SUBACK_FAILURE] * len(denied)

    hw.publish("prov/v1/claim/hw-2", b"impersonation")
    hw.publish("prov/v1/events/acme/device_created", b"fake event")
    hw.publish("prov/v1/res/hw-1", b"self-answer")
    hw.publish("prov/v1/claim/hw-1", b"claim")
    assert bridge.expect().topic == "prov/v1/claim/hw-1"
    assert watcher.expect().topic == "prov/v1/claim/hw-1"
    assert bridge.received_topics() == watcher.received_topics() == []

    bridge.publish("prov/v1/res/hw-1", b"answer")
    assert hw.expect().payload == b"answer"


def test_provision_username_is_a_provisioning_client(port: int, clients: Any) -> None:
    hw = connected(clients, port, "hw-2", "provision", "whatever")
    assert hw.subscribe("prov/v1/res/hw-2", "prov/v1/res/hw-1") == [0, SUBACK_FAILURE]


@pytest.mark.parametrize("client_id", ["has space", "x" * 65, "a/b", "plus+"])
def test_provisioning_client_id_must_be_topic_safe(port: int, clients: Any, client_id: str) -> None:
    assert clients(port, client_id).connect() == IDENTIFIER_REJECTED  # [MQTT-3.1.3-9]


def test_will_on_a_topic_the_client_may_not_publish_is_refused(port: int, clients: Any) -> None:
    assert clients(port, "hw-w1", will=("prov/v1/res/hw-other", b"fake")).connect() == NOT_AUTHORIZED
    assert clients(port, "hw-w2", will=("prov/v1/claim/hw-w2", b"bye")).connect() == 0


def test_anonymous_provisioning_can_be_disabled(data_dir: Path, clients: Any) -> None:
    running = ours(settings_for(data_dir, allow_anonymous_provisioning=False))
    try:
        assert clients(running.port, "hw-3").connect() == NOT_AUTHORIZED
        assert clients(running.port, "hw-3", "provision", "").connect() == 0
    finally:
        running.close()


def test_persistent_device_session_resumes_for_that_device_only(port: int, clients: Any) -> None:
    token = mint("dev-p", pub=[], sub=["devices/dev-p/#"])
    first = connected(clients, port, "dev-p", "dev-p", token, clean_session=False)
    assert first.subscribe("devices/dev-p/#") == [0]
    first.close()
    assert clients(port, "dev-p", clean_session=False).connect() == NOT_AUTHORIZED  # anonymous squatter
    again = connected(clients, port, "dev-p", "dev-p", token, clean_session=False)
    assert again.session_present
    device(clients, port, "ops-p", pub=["devices/+/cmd"]).publish("devices/dev-p/cmd")
    assert again.expect().topic == "devices/dev-p/cmd"  # the subscription survived


# --- the bridge ----------------------------------------------------------------------------------


def test_bridge_account_needs_the_secret(port: int, clients: Any) -> None:
    assert clients(port, "bridge-x", BRIDGE, "wrong").connect() == NOT_AUTHORIZED
    assert clients(port, "bridge-x", BRIDGE).connect() == NOT_AUTHORIZED
    bridge = connected(clients, port, "bridge-x", BRIDGE, SECRET)
    codes = bridge.subscribe("prov/v1/claim/+", "$share/bridges/prov/v1/claim/+", "#", "prov/v1/res/+")
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
        assert owner.subscribe("devices/dev-r/#") == [0]
        owner.publish("devices/dev-r/config", b"wifi-password", retain=True)
        assert owner.expect().topic == "devices/dev-r/config"  # the broker has stored it by now
        bridge = connected(clients, running.port, "bridge-r", BRIDGE, SECRET)
        bridge.publish("prov/v1/res/hw-r", b"your answer", retain=True)

        newcomer = connected(clients, running.port, "hw-r")  # anonymous, subscribed to nothing yet
        assert newcomer.subscribe("prov/v1/res/hw-r") == [0]
        # Whatever is replayed at CONNECT is sent before the retained answer to this SUBSCRIBE.
        topics = [newcomer.expect().topic]
        while topics[-1] != "prov/v1/res/hw-r":
            topics.append(newcomer.expect().topic)
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
        assert bridge.subscribe("prov/v1/claim/+") == [0]
        squatter = clients(running.port, "bridge-t")  # anonymous, the bridge's client id
        if flavour == "stock":
            assert squatter.connect() == 0, "stock amqtt refuses the takeover now: drop the override?"
            return
        assert squatter.connect() == NOT_AUTHORIZED
        connected(clients, running.port, "hw-t").publish("prov/v1/claim/hw-t")
        assert bridge.expect().topic == "prov/v1/claim/hw-t"  # still subscribed, still connected
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
        assert d1.subscribe("devices/dev-s/#") == [0]
        forged = mint("dev-s", pub=["#"], sub=["#"], key=FOREIGN_KEY)
        assert clients(running.port, "dev-s", "dev-s", forged).connect() == NOT_AUTHORIZED
        subscribers = [s.client_id for s, _ in running.broker.subscriptions.get("devices/dev-s/#", [])]
        if flavour == "stock":
            assert subscribers == [], "stock amqtt keeps the session now: is the override still needed?"
            return
        assert subscribers == ["dev-s"]
        device(clients, running.port, "ops-s", pub=["devices/+/cmd"]).publish("devices/dev-s/cmd")
        assert d1.expect().topic == "devices/dev-s/cmd"
    finally:
        running.close()


def test_clean_session_takeover_by_the_same_device_closes_the_old_connection(port: int, clients: Any) -> None:
    first = device(clients, port, "dev-t", sub=["devices/dev-t/#"])
    second = device(clients, port, "dev-t", sub=["devices/dev-t/#"])
    assert first.disconnected.wait(TIMEOUT)
    assert second.subscribe("devices/dev-t/#") == [0]


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
        assert revoked.subscribe("devices/dev-rv/a") == [0]
        (data / DENYLIST_FILE_NAME).write_bytes(render_denylist({"dev-rv": int(time.time()) + 3600}))

        assert revoked.subscribe("devices/dev-rv/b") == [SUBACK_FAILURE]
        revoked.publish("devices/dev-rv/up", b"after")  # MQTT 3.1.1: acknowledged, then dropped by the ACL
        control.publish("devices/dev-ok/marker")  # queued after "after" would have been
        assert watcher.expect().topic == "devices/dev-ok/marker"
        assert not revoked.disconnected.is_set()

        ended = asyncio.run_coroutine_threadsafe(running.broker.end_revoked_sessions(time.time()), running.loop)
        assert ended.result(TIMEOUT) == 1 and revoked.disconnected.wait(TIMEOUT)
        wait_until_disconnected(running, "dev-rv")  # the will would have been queued by now
        control.publish("devices/dev-ok/marker")
        assert watcher.expect().topic == "devices/dev-ok/marker"
        assert watcher.received_topics() == []  # neither "after" nor the revoked device's will
        assert clients(running.port, "dev-rv", "dev-rv", mint("dev-rv", pub=[], sub=[])).connect() == NOT_AUTHORIZED
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
        bridge = connected(clients, running.port, "bridge-tls", BRIDGE, SECRET, tls_ca=cert_file)
        assert bridge.subscribe("prov/v1/claim/+") == [0]
    finally:
        running.close()


def test_tokens_and_passwords_never_reach_the_logs(port: int, clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = mint("dev-l", pub=[], sub=[])
    forged = mint("dev-l", pub=[], sub=[], key=FOREIGN_KEY)
    connected(clients, port, "dev-l", "dev-l", token)
    assert clients(port, "dev-l2", "dev-l", forged).connect() == NOT_AUTHORIZED
    assert clients(port, "bridge-l", BRIDGE, "wrong-password").connect() == NOT_AUTHORIZED
    connected(clients, port, "bridge-l", BRIDGE, SECRET)
    text = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (token, forged, SECRET, "wrong-password"):
        assert secret not in text


def test_run_broker_forever_stops_cleanly_on_sigterm(data_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    script = (
        "import logging, sys; from pathlib import Path;"
        "from broker.embedded import EmbeddedBrokerSettings, run_broker_forever;"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr);"
        f"run_broker_forever(EmbeddedBrokerSettings(data_dir=Path({str(data_dir)!r}), port={free_port}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "broker.log", "wb") as log:  # kept for the whole-suite secret scan
        process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT * 2  # a cold interpreter imports amqtt first
        while True:
            assert process.poll() is None, "the broker process exited"
            try:
                socket.create_connection(("127.0.0.1", free_port), timeout=TIMEOUT).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the broker never listened"
                time.sleep(0.05)
        probe_client = Client(free_port, "hw-sig")
        assert probe_client.connect() == 0
        probe_client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        process.kill()
        process.wait()
