"""Issue 12: device presence, from the brokers' own connection events (firmware changes nothing), written in
batches: online while a device session is up, offline with its last-seen time after; shown by `device show`/`list`
and the admin API; ops may watch {prefix}/presence/+. The same test on the embedded broker and on Mosquitto with
the provbridge_jwt plugin; a storm of connections is written in a few transactions."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bridge.config import Settings
from bridge.edges.presence import BATCH, INTERVAL_SECONDS, PresenceRecorder
from bridge.mosquitto.conf import JwtPlugin
from bridge.storage import keyfiles
from bridge.storage.store import Store
from bridge.tokens import mint_token
from broker.errors import BrokerConfigError
from provwire import topics
from tests.helpers.bridge import Bridge
from tests.helpers.cli import cli_json, cli_run
from tests.helpers.mosquitto import MosquittoBridge, external_settings, mosquitto_for
from tests.helpers.mqtt import MqttClient, token_session
from tests.helpers.processes import ServeProcesses
from tests.helpers.refresh import provisioned
from tests.helpers.waiting import wait_for

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


def presence(bridge: Bridge, device_id: str) -> tuple[bool | None, int | None]:
    device = bridge.store.device(device_id)
    return device.online, device.last_seen


def test_a_device_is_online_while_connected_and_offline_after(
    verifying_broker: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge = verifying_broker
    device, creds = provisioned(bridge)
    assert presence(bridge, device.device_id) == (None, None)  # never connected with its token
    before = int(time.time())
    with token_session(bridge.port, creds.mqtt):
        assert wait_for(lambda: presence(bridge, device.device_id)[0] is True, timeout=15)
        shown = cli_json(capsys, bridge.settings, "device", "show", device.device_id)
        assert shown["online"] is True and shown["last_seen"] >= before
    assert wait_for(lambda: presence(bridge, device.device_id)[0] is False, timeout=15)
    listed = cli_json(capsys, bridge.settings, "device", "list", "--hardware-id", device.hardware_id)
    assert listed["devices"][0]["online"] is False and listed["devices"][0]["last_seen"] >= before


@contextmanager
def ops_watching(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> Iterator[MqttClient]:
    """An ops user (`ops-user create`, which adds it to a running Mosquitto too) subscribed to presence."""
    password = cli_json(capsys, bridge.settings, "ops-user", "create", "watch")["password"]
    with MqttClient(bridge.port, "ops-watch", "watch", password) as ops:
        assert ops.connect()
        assert ops.subscribe(topics.presence_subscription(bridge.prefix)) == [1]
        yield ops


def test_presence_is_published_for_ops_to_watch(verifying_broker: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge = verifying_broker
    device, creds = provisioned(bridge)
    watched = topics.presence_topic(bridge.prefix, device.device_id)
    with ops_watching(bridge, capsys) as ops:
        with token_session(bridge.port, creds.mqtt):
            assert ops.next_message() == (watched, b"online")
        assert ops.next_message() == (watched, b"offline")
        # Only the broker says it: neither ops nor a provisioning client may publish there (dropped, not delivered).
        ops.publish(watched, b"online")
        with MqttClient(bridge.port, "presence-forger") as forger:
            assert forger.connect()
            forger.publish(watched, b"online")
        time.sleep(1)
        assert ops.received_topics() == []


def test_a_session_taken_over_leaves_the_device_online(
    verifying_broker: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second CONNECT with a device's client id ends its first session: the device stays online. (Mosquitto
    accepts the new session before it ends the old one; the plugin lets that end say nothing.)"""
    bridge = verifying_broker
    device, creds = provisioned(bridge)
    watched = topics.presence_topic(bridge.prefix, device.device_id)
    with ops_watching(bridge, capsys) as ops, token_session(bridge.port, creds.mqtt) as first:
        assert ops.next_message() == (watched, b"online")
        with token_session(bridge.port, creds.mqtt):
            assert first.disconnected.wait(15)
            said = [ops.next_message()]
            time.sleep(1)
            said += [ops.next_message() for _ in range(ops.messages.qsize())]
            assert said[-1] == (watched, b"online") and set(said) <= {(watched, b"online"), (watched, b"offline")}
            time.sleep(3 * INTERVAL_SECONDS)  # the recorder's batch with the last word in it
            assert presence(bridge, device.device_id)[0] is True
        assert ops.next_message() == (watched, b"offline")
    assert wait_for(lambda: presence(bridge, device.device_id)[0] is False, timeout=15)


def test_a_revoked_device_kicked_by_its_broker_is_offline_once(
    verifying_broker: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    """The session revocation ends (on Mosquitto the plugin's tick kicks it: a DISCONNECT like any) says offline
    once."""
    bridge = verifying_broker
    device, creds = provisioned(bridge)
    watched = topics.presence_topic(bridge.prefix, device.device_id)
    with ops_watching(bridge, capsys) as ops, token_session(bridge.port, creds.mqtt) as live:
        assert ops.next_message() == (watched, b"online")
        assert cli_run(capsys, bridge.settings, "device", "revoke", device.device_id)[0] == 0
        assert live.disconnected.wait(30)
        assert ops.next_message() == (watched, b"offline")
        time.sleep(2)
        assert ops.received_topics() == []
    assert wait_for(lambda: presence(bridge, device.device_id)[0] is False, timeout=15)


def test_bridge_processes_share_the_presence_on_mosquitto(initialised: tuple[Settings, str]) -> None:
    """`serve --processes 2`: the processes take {prefix}/presence/+ as a shared subscription, as their claims
    (the bridge's Mosquitto role allows the `$share/<group>/` form), and record what the plugin publishes."""
    settings, key = initialised
    settings = external_settings(settings)  # jwt: the provbridge_jwt plugin publishes presence
    with mosquitto_for(settings) as mosquitto, ServeProcesses(settings, 2):
        store = Store(settings.database)
        try:
            bridge = MosquittoBridge(settings, store, keyfiles.load_keys(settings.data_dir), key, mosquitto)
            device, creds = provisioned(bridge)
            with token_session(bridge.port, creds.mqtt):
                assert wait_for(lambda: presence(bridge, device.device_id)[0] is True, timeout=15)
            assert wait_for(lambda: presence(bridge, device.device_id)[0] is False, timeout=15)
        finally:
            store.close()


def test_a_storm_of_connections_is_written_in_a_few_transactions(bridge: Bridge) -> None:
    """2,500 changes of 2,500 devices within the recorder's interval: ceil(2500 / BATCH) transactions."""
    devices = [provisioned(bridge)[0].device_id for _ in range(3)]
    store = Store(bridge.settings.database)
    writes: list[int] = []
    original = store.record_presence

    def counting(changes: list[tuple[str, bool, int]]) -> None:
        writes.append(len(changes))
        original(changes)

    store.record_presence = counting  # type: ignore[method-assign]
    recorder = PresenceRecorder(store)
    try:
        for n in range(2500):
            recorder.record(devices[n % 3] if n < 3 else f"dev_unknown{n:022d}", True)
    finally:
        recorder.stop()
        store.close()
    assert sum(writes) == 2500 and len(writes) == -(-2500 // BATCH)
    assert all(bridge.store.device(d).online for d in devices)  # unknown ids are skipped


def test_the_jwt_plugin_is_told_the_topic_prefix() -> None:
    """`plugin_opt_topic_prefix`: where the plugin publishes presence; a config without it publishes none."""
    base = {"plugin": "/p.so", "jwks_file": "/j", "denylist_file": "/d", "audience": "a", "issuer": "i"}
    lines = JwtPlugin(**base, topic_prefix="acme/provisioning/v2").lines()
    assert "plugin_opt_topic_prefix acme/provisioning/v2" in lines
    assert not any(line.startswith("plugin_opt_topic_prefix") for line in JwtPlugin(**base).lines())
    for invalid in ("$SYS/x", "a//b", "a/+/b", "a/#"):
        with pytest.raises(BrokerConfigError):
            JwtPlugin(**base, topic_prefix=invalid).lines()


def test_a_device_whose_scope_covers_presence_neither_reads_nor_says_it(
    verifying_broker: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever a device's token allows, presence is the bridge's and ops' to read and the broker's to say."""
    bridge = verifying_broker
    wide, _ = provisioned(bridge)
    other, other_creds = provisioned(bridge)
    keys, token = bridge.keys, bridge.settings.token
    everything = [f"{bridge.prefix}/#"]
    grant = mint_token(
        key=keys.token_key,
        kid=keys.active_token,
        issuer=token.issuer,
        audience=token.audience,
        device_id=wide.device_id,
        tenant="default",
        publish=everything,
        subscribe=everything,
        now=int(time.time()),
        ttl_seconds=600,
    )
    with ops_watching(bridge, capsys) as ops:
        with MqttClient(bridge.port, wide.device_id, wide.device_id, grant.token) as snoop:
            assert snoop.connect()
            assert ops.next_message() == (topics.presence_topic(bridge.prefix, wide.device_id), b"online")
            snoop.subscribe(f"{bridge.prefix}/#")
            with token_session(bridge.port, other_creds.mqtt):
                assert ops.next_message() == (topics.presence_topic(bridge.prefix, other.device_id), b"online")
            assert ops.next_message() == (topics.presence_topic(bridge.prefix, other.device_id), b"offline")
            snoop.publish(topics.presence_topic(bridge.prefix, other.device_id), b"online")  # a forgery
            time.sleep(1)
            assert not any("/presence/" in topic for topic in snoop.received_topics())
        assert ops.next_message() == (topics.presence_topic(bridge.prefix, wide.device_id), b"offline")
        time.sleep(1)
        assert ops.received_topics() == []  # the forgery went nowhere
