"""provbridge on a RabbitMQ cluster (`broker.mode = "rabbitmq"`, issue 13): three nodes on loopback configured by
`provbridge rabbitmq-config`, bridges as `provbridge serve` subprocesses consuming claims from the quorum queue,
PostgreSQL shared by them (tests/helpers/rabbitmq.py, tests/helpers/postgres.py).

- Claims from devices on any node make devices whose tokens RabbitMQ accepts, with the topics of their scope only.
- kill -9 of one of two bridges mid-burst of 2,000 claims: every device ends with exactly one row and one readable
  answer (its unacknowledged claims go to the other bridge, and the request-id replay answers what was done).
- One node of three stopped mid-burst and started again: no claim lost, none handled twice; devices on the
  surviving nodes go on, and the bridge whose node stopped carries on through another.
- A revoked device's connection is ended at once, and again when it reconnects with its still-valid token.

In `make test-full`: a cluster takes half a minute to start here.
"""

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import BrokerSettings, RabbitMQSettings, Settings, StorageSettings
from bridge.ops import admin
from bridge.storage import keyfiles
from bridge.storage.store import Store
from device_sim.device import connect_with_token, open_answer, refresh_over_mqtt
from provwire.models import Credentials
from tests.helpers.bridge import make_settings
from tests.helpers.cli import run_cli
from tests.helpers.figures import figure
from tests.helpers.fleet import Fleet, FleetDevice, check_invariants, retry_after_everywhere
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import ServeProcesses
from tests.helpers.rabbitmq import RabbitCluster, require_rabbitmq
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.xdist_group("rabbitmq")  # one cluster at a time (Makefile: --dist loadgroup)

BURST = 2000
LONG = 180.0
ENV = {"PROVBRIDGE_CLAIMS__RETRY_AFTER_SECONDS": "1", "PROVBRIDGE_CLAIMS__RATE_LIMITS": "false"}


@dataclass
class Site:
    """One cluster, one data dir and one PostgreSQL database for the module's tests."""

    cluster: RabbitCluster
    settings: Settings
    key: str  # the first provisioning key, unlimited
    root: Path

    def devices(self) -> int:
        store = Store(self.settings.database)
        try:
            return int(store.connection().execute("SELECT COUNT(*) FROM devices").fetchone()[0])
        finally:
            store.close()

    def bridge(self, name: str, first_node: int = 0, processes: int = 1) -> ServeProcesses:
        """A `provbridge serve [--processes N]` of its own (as on a host of its own): its first node `first_node`
        (process i of it: the i-th after), its own log, and the admin API on bridge "a" only (one port)."""
        amqp = self.settings.rabbitmq.amqp
        order = amqp[first_node:] + amqp[:first_node]
        settings = self.settings.model_copy(
            update={
                "rabbitmq": self.settings.rabbitmq.model_copy(update={"amqp": order}),
                "api": self.settings.api.model_copy(update={"enabled": name == "a"}),
            }
        )
        serve = ServeProcesses(settings, processes, env=ENV)
        serve.log_file = self.root / f"serve-{name}.log"
        serve.config_file = self.root / f"serve-{name}.toml"
        return serve


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer) -> Iterator[Site]:
    require_rabbitmq()
    root = tmp_path_factory.mktemp("rabbit-bridge")
    cluster = RabbitCluster(root / "cluster", 3, management=True)
    settings = make_settings(
        root / "data",
        storage=StorageSettings(url=postgres_server.create_database()),
        broker=BrokerSettings(mode="rabbitmq", port=cluster.mqtt_ports[0], tls_listen="off"),
        rabbitmq=RabbitMQSettings(
            amqp=[f"127.0.0.1:{port}" for port in cluster.amqp_ports],
            management=[f"http://127.0.0.1:{port}" for port in cluster.management_ports],
            revoke_sweep_seconds=0.5,
        ),
    )
    result = admin.init_data_dir(settings)
    assert result.provision_key
    assert run_cli(settings, "rabbitmq-config", str(root / "rabbitmq")) == 0
    cluster.provbridge_conf = (root / "rabbitmq" / "rabbitmq.conf").read_text()
    cluster.enabled_plugins = (root / "rabbitmq" / "enabled_plugins").read_text()  # with the management plugin
    with cluster:
        yield Site(cluster, settings, result.provision_key, root)


def fleet_on(site: Site, node: int) -> Fleet:
    return Fleet(site.cluster.mqtt_ports[node], site.settings.topic_prefix, site.key)


def credentials(site: Site, device: FleetDevice) -> Credentials:
    assert device.final is not None
    cloud = keyfiles.load_keys(site.settings.data_dir).cloud[json.loads(device.final)["cloud_key_id"]].public_key()
    return open_answer(device.final, device.identity, cloud, device.request_id).credentials


class TokenClient:
    """A device connected with its token (MQTT 3.1.1): its CONNACK, what it received, whether it is up."""

    def __init__(
        self, port: int, creds: Credentials | None, *, client_id: str | None = None, persistent: bool = False
    ) -> None:
        """`creds` None: an anonymous (provisioning) client, of `client_id`."""
        self.connack: mqtt.ReasonCode | None = None
        self.received: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.answered = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or (creds.mqtt.client_id if creds else ""),
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
        )
        if creds is not None:
            client.username_pw_set(creds.mqtt.username, creds.mqtt.token)
        client.on_connect = self._connected
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
        client.on_disconnect = lambda *_: self.answered.set()
        client.reconnect_delay_set(60, 60)  # reconnecting is the test's to decide
        self.client = client
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        assert self.answered.wait(15), "no CONNACK"

    def _connected(self, _c: object, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        self.connack = rc
        self.answered.set()

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_claims_on_any_node_make_devices_whose_tokens_hold_their_scope(site: Site) -> None:
    before = site.devices()
    with site.bridge("a") as serve, fleet_on(site, 1) as fleet:
        fleet.connect()
        fleet.send(fleet.add(40))
        assert wait_for(fleet.all_final, timeout=LONG), serve.log()[-2000:]
    check_invariants(site.settings, [fleet], others=before)
    mine, other = credentials(site, fleet.devices[0]), credentials(site, fleet.devices[1])
    # The scope RabbitMQ reads, beside the acl every other broker reads.
    token = json.loads(base64.urlsafe_b64decode(mine.mqtt.token.split(".")[1] + "=="))
    assert (
        f"{site.settings.token.audience}.write:provbridge/amq.topic/devices.{mine.mqtt.client_id}.*" in token["scope"]
    )
    assert token["acl"] == {"pub": mine.mqtt.publish, "sub": mine.mqtt.subscribe}
    # Its own topic, through node 2: subscribe, publish, its message back (device_sim's check).
    connect_with_token("127.0.0.1", site.cluster.mqtt_ports[2], mine, timeout=30)
    # A fresh token, asked for as a provisioning client (through node 1), connects too.
    first = fleet.devices[0]
    cloud = keyfiles.load_keys(site.settings.data_dir).cloud[json.loads(first.final or b"{}")["cloud_key_id"]]
    with site.bridge("a"):
        fresh = refresh_over_mqtt(
            "127.0.0.1",
            site.cluster.mqtt_ports[1],
            first.identity,
            mine.mqtt.client_id,
            cloud.public_key(),
            site.settings.topic_prefix,
            timeout=30,
        )
    assert fresh.credentials.mqtt.token and fresh.credentials.mqtt.token != mine.mqtt.token
    connect_with_token("127.0.0.1", site.cluster.mqtt_ports[0], fresh.credentials, timeout=30)
    # Another device's topic: RabbitMQ ends the connection.
    device = TokenClient(site.cluster.mqtt_ports[0], mine)
    try:
        assert device.accepted
        device.answered.clear()
        device.client.publish(f"devices/{other.mqtt.client_id}/telemetry", b"not mine", qos=1)
        assert device.answered.wait(15) and not device.client.is_connected()
    finally:
        device.close()
    # What waits in its persistent session stays its own: a provisioning client with its client id cannot resume it.
    kept = TokenClient(site.cluster.mqtt_ports[0], mine, persistent=True)
    kept.client.subscribe(f"devices/{mine.mqtt.client_id}/#", qos=1)
    assert kept.subscribed.wait(15)
    kept.close()
    sender = TokenClient(site.cluster.mqtt_ports[1], mine, client_id=f"{mine.mqtt.client_id}-sender")
    sender.client.publish(f"devices/{mine.mqtt.client_id}/waiting", b"for the device only", qos=1).wait_for_publish(15)
    sender.close()
    thief = TokenClient(site.cluster.mqtt_ports[2], None, client_id=mine.mqtt.client_id, persistent=True)
    assert wait_for(lambda: not thief.client.is_connected(), timeout=15) and not thief.received
    thief.close()
    back = TokenClient(site.cluster.mqtt_ports[0], mine, persistent=True)
    try:
        assert wait_for(lambda: back.received == [(f"devices/{mine.mqtt.client_id}/waiting", b"for the device only")])
    finally:
        back.close()


def test_a_bridge_killed_mid_burst_loses_nothing_the_other_takes_over(site: Site) -> None:
    """kill -9 of one of two bridges mid-burst of 2,000 claims: its unacknowledged claims go to the other."""
    before = site.devices()
    with (
        site.bridge("a", first_node=0) as a,
        site.bridge("b", first_node=1) as b,
        fleet_on(site, 0) as fleet0,
        fleet_on(site, 2) as fleet2,
    ):
        logs = len(a.log()), len(b.log())
        for fleet in (fleet0, fleet2):
            fleet.connect()
            fleet.send(fleet.add(BURST // 2))
        assert wait_for(lambda: fleet0.finals() + fleet2.finals() >= BURST // 4, timeout=LONG)
        a.kill()
        answered_by_a = _answered(a, logs[0])  # what it logged (its claim worker may commit a few more, unlogged)
        assert wait_for(lambda: fleet0.all_final() and fleet2.all_final(), timeout=LONG), b.log()[-2000:]
        answered_by_b = _answered(b, logs[1])
    assert answered_by_a and answered_by_b  # both consumed: competing consumers of one queue
    check_invariants(site.settings, [fleet0, fleet2], others=before)
    for fleet in (fleet0, fleet2):
        retry_after_everywhere(fleet)
        for d in fleet.devices:  # nothing was lost: a device re-sent only when told to retry
            assert d.sends <= 1 + len(d.retryable_answers()), (d.request_id, d.sends, d.answers)
    figure(
        "bridge-kill-rabbitmq",
        devices=BURST,
        answered_before_the_kill_by_the_killed_bridge=answered_by_a,
        answered_by_the_other=answered_by_b,
        answered_twice_identically=sum(len(d.final_answers()) > 1 for f in (fleet0, fleet2) for d in f.devices),
    )


def test_a_node_stopped_mid_burst_and_restarted_loses_nothing(site: Site) -> None:
    """Node 1 stops mid-burst. Bridge b and the second process of bridge a (`serve --processes 2`) consume through
    it: they carry on through another node; devices on nodes 0 and 2 go on. The node comes back and serves again."""
    before = site.devices()
    with (
        site.bridge("a", first_node=0, processes=2) as a,
        site.bridge("b", first_node=1) as b,
        fleet_on(site, 0) as fleet0,
        fleet_on(site, 2) as fleet2,
    ):
        for fleet in (fleet0, fleet2):
            fleet.connect()
            fleet.send(fleet.add(BURST // 2))
        assert wait_for(lambda: fleet0.finals() + fleet2.finals() >= BURST // 4, timeout=LONG)
        site.cluster.stop_node(1)
        lanes_kept = fleet0.lanes_up() + fleet2.lanes_up()
        assert wait_for(lambda: fleet0.all_final() and fleet2.all_final(), timeout=LONG), b.log()[-3000:]
        assert wait_for(
            lambda: f"consuming claims from RabbitMQ at 127.0.0.1:{site.cluster.amqp_ports[2]}" in b.log(),
            timeout=LONG,
        ), b.log()[-3000:]
        site.cluster.start_node(1)
        assert site.cluster.cluster_members(0)[1] == set(site.cluster.names)
        late = fleet_on(site, 1)  # the node serves claims again
        with late:
            late.connect()
            late.send(late.add(20))
            assert wait_for(late.all_final, timeout=LONG), a.log()[-2000:]
    assert lanes_kept == 2 * len(fleet0.lane_ids)  # the devices on the surviving nodes were never cut off
    check_invariants(site.settings, [fleet0, fleet2, late], others=before)
    members = site.cluster.ctl(0, "list_queues", "-p", "provbridge", "name", "members", "--formatter", "json").stdout
    figure(
        "rabbitmq-node-stop",
        devices=BURST,
        answered_twice_identically=sum(len(d.final_answers()) > 1 for f in (fleet0, fleet2) for d in f.devices),
        queue_members=re.findall(r"rabbit-\d@localhost", members),
    )


def test_a_revoked_device_is_cut_off_and_cut_off_again_when_it_reconnects(site: Site) -> None:
    with site.bridge("a") as serve, fleet_on(site, 0) as fleet:
        fleet.connect()
        fleet.send(fleet.add(2))
        assert wait_for(fleet.all_final, timeout=LONG), serve.log()[-2000:]
        creds = credentials(site, fleet.devices[0])
        device = TokenClient(site.cluster.mqtt_ports[2], creds)
        assert device.accepted
        device.answered.clear()
        assert run_cli(site.settings, "device", "revoke", creds.mqtt.client_id) == 0
        assert device.answered.wait(15) and not device.client.is_connected()  # ended at once
        device.close()
        again = TokenClient(site.cluster.mqtt_ports[1], creds)  # its token is still valid: RabbitMQ lets it in
        try:
            again.answered.clear()
            assert wait_for(lambda: not again.client.is_connected(), timeout=30)  # and the bridge's sweep ends it
        finally:
            again.close()
        other = TokenClient(site.cluster.mqtt_ports[1], credentials(site, fleet.devices[1]))
        try:
            assert other.accepted
            time.sleep(2 * site.settings.rabbitmq.revoke_sweep_seconds)  # several sweeps pass it by
            assert other.client.is_connected()
        finally:
            other.close()


def _answered(serve: ServeProcesses, since: int) -> int:
    """Devices `serve` provisioned since its log was `since` characters long (the module's tests share its log)."""
    return len(re.findall(r"claim on \S+: device\.provisioned", serve.log()[since:]))
