"""Issue 5: faults. Real components are killed or broken in the middle of a claim burst, and the
invariants are checked afterwards on the database and on what every device received:

* every device that claimed ends with exactly one row, and a final answer it can open with its own key;
* an answer a device got for a request_id is, byte for byte, the stored answer (replays included);
* nothing is half-written: every device has its API-key hash (the one its sealed answer carries),
  its stored answer and its `device.provisioned` event, and the key counts exactly one use per device.

Everything is real and on loopback: `provbridge serve` subprocesses (embedded amqtt broker, or in
external mode against Mosquitto started from `provbridge mosquitto-config`), SQLite files, the
claim crypto. The devices are a small multiplexed fleet (`Fleet`): `BURST` devices whose claims ride on
a few paho connections, re-sent with the same request_id, as PROTOCOL.md §6 tells devices, when an
answer says `retry_after` or when their connection came back. Only waits on conditions, never on
durations; every process a test starts is gone when it ends.

On Mosquitto the crash tests run with device authentication on: the 2,000-claim bursts with
`broker.mosquitto_auth = "jwt"` (the provbridge_jwt plugin verifies every device token in Mosquitto;
devices then connect with their tokens), and a smaller burst with the dynamic-security mirror
(`broker.mosquitto_auth = "dynsec"`, the opt-in), whose cost grows with the devices mirrored
(docs/BENCHMARKS.md). The
other Mosquitto tests (database faults, duplicates, slow consumers) run with `broker.dynsec = false`:
they are about the delivery path (persistent session, QoS 1, acknowledgement after the answer), which
is the same whoever checks device tokens.

Figures measured here (counts, recovery times) are logged as `FAULTS ...` lines, informational only.
"""

import fcntl
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from bridge.config import Settings, StorageSettings
from bridge.edges.core import BridgeCore, claim_handlers
from bridge.edges.paho import BridgeService
from bridge.mosquitto import conf as mc
from bridge.mosquitto.dynsec import DynsecChannel, admin_channel, check
from bridge.storage import keyfiles
from bridge.storage.store import Store, Transaction
from device_sim.device import DeviceIdentity, build_claim, connect_with_token, open_answer
from provwire import topics
from provwire.models import Credentials, to_json
from tests.helpers.cli import run_cli
from tests.helpers.figures import figure
from tests.helpers.fleet import Fleet, FleetDevice, check_invariants, retry_after_everywhere
from tests.helpers.mosquitto import RunningMosquitto, external_settings, mosquitto_for
from tests.helpers.mqtt import MqttClient
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import ServeProcesses, alive
from tests.helpers.raw_mqtt import connect_packet, mqtt_string, packet
from tests.helpers.waiting import wait_for

BURST = 2000  # devices in a crash or restart burst (the size)
SMALL_BURST = 1000  # the database faults, where the bridge runs inside the test process
LONG = 120.0  # generous: a condition that does not hold by then is a failure, not slowness
ANSWER_TIMEOUT = 15.0  # a device's wait for an answer before it re-sends (the restart tests only)
# Every bridge subprocess: a device told to retry comes back after 1 s (default 2) to keep the file short.
# The fleets here multiplex thousands of devices over a few client ids: no per-client flood limits.
BASE_ENV = {"PROVBRIDGE_CLAIMS__RETRY_AFTER_SECONDS": "1", "PROVBRIDGE_CLAIMS__RATE_LIMITS": "false"}
# External mode: no dynamic-security mirroring (see the module docstring).
EXTERNAL_ENV = {**BASE_ENV, "PROVBRIDGE_BROKER__DYNSEC": "false"}
# External mode, device tokens verified by the provbridge_jwt plugin in Mosquitto (the `jwt_mode` fixture).
JWT_ENV = {**BASE_ENV, "PROVBRIDGE_BROKER__MOSQUITTO_AUTH": "jwt"}
# External mode, every token mirrored into dynamic security (the opt-in for small fleets): ~8 ms of
# Mosquitto per claim once a few hundred devices are mirrored, so a smaller burst.
DYNSEC_ENV = {**BASE_ENV, "PROVBRIDGE_BROKER__MOSQUITTO_AUTH": "dynsec"}
DYNSEC_BURST = 300


def _consistent_snapshot(settings: Settings) -> tuple[int, int, int]:
    """Devices, key uses and device.provisioned events, read in one snapshot: equal when nothing is half-written."""
    db = sqlite3.connect(f"file:{settings.database_file}?mode=ro", uri=True)
    try:
        db.execute("BEGIN")
        devices = db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
        uses = db.execute("SELECT SUM(registrations) FROM provision_keys").fetchone()[0]
        events = db.execute("SELECT COUNT(*) FROM events WHERE event = 'device.provisioned'").fetchone()[0]
        db.execute("COMMIT")
        return int(devices), int(uses), int(events)
    finally:
        db.close()


def _credentials(settings: Settings, device: FleetDevice) -> Credentials:
    """What a fleet device opens from its final answer (its token among them)."""
    assert device.final is not None
    cloud = keyfiles.load_keys(settings.data_dir).cloud[json.loads(device.final)["cloud_key_id"]].public_key()
    return open_answer(device.final, device.identity, cloud, device.request_id).credentials


def connack(port: int, client_id: str, username: str, password: str) -> int:
    """A bare MQTT 3.1.1 CONNECT with a username and password: the broker's CONNACK return code (0 = accepted)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(connect_packet(client_id, username=username, password=password))
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                return -1  # closed without a CONNACK
            reply += chunk
        if reply[3] == 0:
            sock.sendall(packet(0xE0, b""))  # DISCONNECT
    assert reply[0] == 0x20, reply
    return reply[3]


def check_tokens_work(settings: Settings, fleet: Fleet, every: int = 1, sample: int = 10) -> int:
    """Every `every`-th fleet device connects to the broker with the token of its final answer (client id =
    username = device id); `sample` of them, spread over the burst, also publish on their own topic and get
    it back (`connect_with_token`), and a device's token is refused under another device's id. Returns how
    many connected."""
    port = settings.broker.port
    creds = [_credentials(settings, d) for d in fleet.devices[::every]]
    for c in creds:  # (the return code first: an assertion must not print a token)
        code = connack(port, c.mqtt.client_id, c.mqtt.username, c.mqtt.token)
        assert code == 0, f"{c.mqtt.client_id}: CONNACK {code}"
    for c in creds[:: max(1, len(creds) // sample)]:
        connect_with_token("127.0.0.1", port, c, timeout=30)  # publish, subscribe, its own message back
    a, b = creds[0], creds[-1]
    code = connack(port, a.mqtt.client_id, a.mqtt.username, b.mqtt.token)
    assert code != 0, "a token was accepted under another device's id"  # the broker does check tokens
    return len(creds)


def _first_key(initialised: tuple[Settings, str]) -> str:
    return initialised[1]


def _wait_all(fleet: Fleet, what: str) -> float:
    start = time.monotonic()
    assert wait_for(fleet.all_final, timeout=LONG), f"{what}: {len(fleet.devices) - fleet.finals()} unanswered"
    return time.monotonic() - start


# --- 1. the bridge killed mid-burst -----------------------------------------------------------


def test_bridge_killed_mid_burst_on_mosquitto_loses_nothing(initialised: tuple[Settings, str], jwt_mode: None) -> None:
    """kill -9 of `provbridge serve` (external mode, tokens verified in Mosquitto): the claims it held and those
    published while it was down wait in its persistent session and are answered after it returns; no device
    needs to re-send; tokens minted before and after the kill connect."""
    settings = external_settings(initialised[0], mosquitto_auth="jwt")
    with (
        mosquitto_for(settings),
        ServeProcesses(settings, env=JWT_ENV) as serve,
        Fleet(settings.broker.port, settings.topic_prefix, _first_key(initialised)) as fleet,
    ):
        fleet.resend_on_reconnect = False  # the broker stays up: only "retry later" answers are re-sent
        fleet.connect()
        burst = fleet.add(BURST)
        fleet.send(burst)
        assert wait_for(lambda: fleet.finals() >= BURST // 4, timeout=LONG)
        serve.kill()
        answered_at_kill = fleet.finals()
        late = fleet.add(200)  # published while the bridge is down: Mosquitto takes and queues them
        fleet.send(late)
        assert wait_for(lambda: fleet.pubacks >= fleet.sends(), timeout=LONG)
        assert all(d.final is None for d in late)
        start = time.monotonic()
        serve.start()
        _wait_all(fleet, "after the restart")
        recovered = time.monotonic() - start
        assert run_cli(settings, "doctor") == 0  # the installation checks out after the crash
        connected = check_tokens_work(settings, fleet, every=20)
    for d in fleet.devices:  # nothing was lost: every send beyond the first was asked for by "retry later"
        assert d.sends <= 1 + len(d.retryable_answers()), (d.request_id, d.sends, d.answers)
    retry_after_everywhere(fleet)
    check_invariants(settings, [fleet])
    redelivered = sum(len(d.final_answers()) > 1 for d in fleet.devices)
    figure(
        "bridge-kill-mosquitto",
        devices=len(fleet.devices),
        answered_at_kill=answered_at_kill,
        published_while_down=len(late),
        answered_twice_identically=redelivered,
        rate_limited=fleet.count("rate_limited"),
        connected_with_token=connected,
        seconds_restart_to_last_answer=f"{recovered:.1f}",
    )


def test_bridge_killed_mid_burst_embedded_replays_committed_answers(initialised: tuple[Settings, str]) -> None:
    """kill -9 of `provbridge serve` with its embedded broker: devices reconnect when it is back and
    re-send with the same request_id; claims committed before the kill get their stored answer."""
    settings = initialised[0]
    with (
        ServeProcesses(settings, env=BASE_ENV) as serve,
        Fleet(settings.broker.port, settings.topic_prefix, _first_key(initialised)) as fleet,
    ):
        fleet.connect()
        burst = fleet.add(BURST)
        fleet.send(burst)
        assert wait_for(lambda: fleet.finals() >= BURST // 4, timeout=LONG)
        serve.kill()
        answered_at_kill = [d for d in burst if d.final is not None]
        assert wait_for(lambda: fleet.lanes_up() == 0, timeout=LONG)  # the broker died with the process
        # The orphaned claim worker stops at its next answer (the socket to the dead broker is gone).
        assert wait_for(lambda: not any(alive(pid) for pid in serve.reported_pids()), timeout=LONG)
        db = sqlite3.connect(f"file:{settings.database_file}?mode=ro", uri=True)
        try:
            committed = {r[0] for r in db.execute("SELECT request_id FROM answers")}
        finally:
            db.close()
        # Committed before the kill, never delivered: their re-sent claims must get the stored answer.
        undelivered = committed - {d.request_id for d in answered_at_kill}
        start = time.monotonic()
        serve.start()
        _wait_all(fleet, "after the restart")
        recovered = time.monotonic() - start
        # A device that did get its answer and asks again (a lost PUBACK on its side) gets the same bytes.
        sample = answered_at_kill[:100]
        fleet.send(sample)
        assert wait_for(lambda: all(len(d.final_answers()) >= 2 for d in sample), timeout=LONG)
        assert run_cli(settings, "doctor") == 0  # the installation checks out after the crash
    asked_again = {d.request_id for d in sample}
    resent = [d for d in burst if d.sends > 1 + len(d.retryable_answers()) and d.request_id not in asked_again]
    retry_after_everywhere(fleet)
    check_invariants(settings, [fleet])
    figure(
        "bridge-kill-embedded",
        devices=len(fleet.devices),
        answered_at_kill=len(answered_at_kill),
        resent_after_reconnect=len(resent),
        committed_at_kill=len(committed),
        committed_but_undelivered_then_replayed=len(undelivered),
        replayed_on_request=len(sample),
        seconds_restart_to_last_answer=f"{recovered:.1f}",
    )


def _mirrored(channel: DynsecChannel) -> tuple[set[str], set[str]]:
    """The device clients and the devices with a role in Mosquitto's dynamic security, asked over `channel`."""
    clients, roles = channel.call([{"command": "listClients", "verbose": True}, {"command": "listRoles"}])
    check(clients)
    check(roles)
    prefix = mc.device_role_name("")
    names = [r if isinstance(r, str) else r["rolename"] for r in roles["data"]["roles"]]
    return (
        {str(c["username"]) for c in clients["data"]["clients"] if mc.is_device_client(c)},
        {str(r).removeprefix(prefix) for r in names if str(r).startswith(prefix)},
    )


def _device_ids(settings: Settings) -> set[str]:
    db = sqlite3.connect(f"file:{settings.database_file}?mode=ro", uri=True)
    try:
        return {str(r[0]) for r in db.execute("SELECT id FROM devices")}
    finally:
        db.close()


def _orphans(settings: Settings, channel: DynsecChannel) -> set[str]:
    """Device clients Mosquitto holds for devices the database does not have."""
    clients, _ = _mirrored(channel)
    return clients - _device_ids(settings)


def _kill_between_grant_and_commit(
    serve: ServeProcesses, settings: Settings, channel: DynsecChannel, fleet: Fleet
) -> tuple[int, set[str]]:
    """SIGKILL the bridge while a claim's token is in Mosquitto and its transaction not committed.

    Freeze the bridge (SIGSTOP) mid-burst; if Mosquitto then holds (or, applying the batch the bridge sent
    just before, comes to hold) a device client whose device has no row, the kill lands there: SIGKILL the
    frozen process. Else let it go on (SIGCONT) for a few more answers and try again. Returns the attempt
    it landed at and the orphaned device ids."""
    assert serve.process is not None
    pid = serve.process.pid
    for attempt in range(1, 41):
        os.kill(pid, signal.SIGSTOP)  # our own child, by its pid
        landed = False
        try:
            landed = wait_for(lambda: bool(_orphans(settings, channel)), timeout=1.0)
        finally:
            if not landed:
                os.kill(pid, signal.SIGCONT)
        if landed:
            serve.kill()  # SIGKILL: delivered to the stopped process
            return attempt, _orphans(settings, channel)
        more = fleet.finals() + 3
        assert wait_for(lambda more=more: fleet.finals() >= more, timeout=LONG)
    raise AssertionError("no kill landed between a mirrored token and its commit in 40 attempts")


def test_bridge_killed_between_a_mirrored_token_and_its_commit(initialised: tuple[Settings, str]) -> None:
    """The dynamic-security mirror on (Mosquitto's defaults): kill -9 of `provbridge serve` while Mosquitto
    holds a claim's token and the claim's transaction has not committed. After the restart every device is
    answered once (the invariants), every device's token connects to Mosquitto, the orphaned client (a token
    no device was ever sent) is removed by the janitor, and Mosquitto mirrors exactly the devices of the
    database."""
    settings = external_settings(initialised[0], mosquitto_auth="dynsec")
    assert settings.broker.dynsec and settings.broker.mosquitto_auth == "dynsec"
    with (
        mosquitto_for(settings),
        ServeProcesses(settings, env=DYNSEC_ENV) as serve,
        admin_channel(settings) as channel,  # the bridge account under a client id of its own
        Fleet(settings.broker.port, settings.topic_prefix, _first_key(initialised)) as fleet,
    ):
        fleet.resend_on_reconnect = False  # the broker stays up: the claims wait in the bridge's session
        fleet.connect()
        burst = fleet.add(DYNSEC_BURST)
        fleet.send(burst)
        assert wait_for(lambda: fleet.finals() >= DYNSEC_BURST // 5, timeout=LONG)
        attempts, orphans = _kill_between_grant_and_commit(serve, settings, channel, fleet)
        answered_at_kill = fleet.finals()
        late = fleet.add(DYNSEC_BURST // 10)  # published while the bridge is down
        fleet.send(late)
        assert wait_for(lambda: fleet.pubacks >= fleet.sends(), timeout=LONG)
        start = time.monotonic()
        serve.start()
        _wait_all(fleet, "after the restart")
        recovered = time.monotonic() - start
        # The janitor removes the orphans: Mosquitto then mirrors exactly the database's devices.
        mirrored = lambda: _mirrored(channel) == (_device_ids(settings),) * 2  # noqa: E731
        assert wait_for(mirrored, timeout=LONG), (orphans, _orphans(settings, channel))
        cleaned = time.monotonic() - start
        connected = check_tokens_work(settings, fleet)  # every device, with the token it was sent
        assert run_cli(settings, "doctor") == 0
    check_invariants(settings, [fleet])
    # The orphans' tokens were never delivered: no device was told their ids, none is stored in an answer.
    told = {json.loads(a).get("device_id") for d in fleet.devices for a in d.answers}
    assert not orphans & told
    db = sqlite3.connect(f"file:{settings.database_file}?mode=ro", uri=True)
    try:
        stored = {json.loads(bytes(r[0])).get("device_id") for r in db.execute("SELECT answer FROM answers")}
    finally:
        db.close()
    assert not orphans & stored
    figure(
        "bridge-kill-dynsec",
        devices=len(fleet.devices),
        answered_at_kill=answered_at_kill,
        kill_attempts=attempts,
        orphaned_clients=len(orphans),
        connected_with_token=connected,
        seconds_restart_to_last_answer=f"{recovered:.1f}",
        seconds_restart_to_orphans_removed=f"{cleaned:.1f}",
    )


# --- 2. the broker restarted mid-burst --------------------------------------------------------


def _restart(broker: RunningMosquitto, how: str) -> None:
    if how == "sigterm":
        broker.stop()  # SIGTERM: Mosquitto writes its persistence file on the way out
    else:
        assert broker.process is not None
        broker.process.kill()  # kill -9: only what the last autosave wrote survives
        broker.process.wait(30)
        broker.process = None
    broker.start()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_broker_restarted_mid_burst(initialised: tuple[Settings, str], jwt_mode: None, how: str) -> None:
    """Mosquitto (persistence on, tokens verified by its jwt plugin) restarted mid-burst: the bridge and the
    devices reconnect by themselves, every device is answered once with one row, answers to repeated
    deliveries are identical, and tokens connect to the restarted broker.

    After kill -9 the restarted broker may not know the bridge's session (it was saved after the last
    autosave, if at all): a claim re-sent before the bridge has re-subscribed reaches no subscriber and is
    dropped, and the device's time-out (PROTOCOL.md §6, rule 2) is what recovers it. So the devices here
    keep one, shorter than firmware's 30 s to keep the test short."""
    settings = external_settings(initialised[0], mosquitto_auth="jwt")
    conf = settings.data_dir.parent / "mosquitto" / "mosquitto.conf"
    with (
        mosquitto_for(settings) as broker,
        ServeProcesses(settings, env=JWT_ENV) as serve,
        Fleet(settings.broker.port, settings.topic_prefix, _first_key(initialised)) as fleet,
    ):
        assert "persistence true" in conf.read_text().splitlines()
        fleet.answer_timeout = ANSWER_TIMEOUT
        fleet.connect()
        burst = fleet.add(BURST)
        fleet.send(burst)
        assert wait_for(lambda: fleet.finals() >= BURST // 4, timeout=LONG)
        answered_before = fleet.finals()
        start = time.monotonic()
        _restart(broker, how)
        assert wait_for(lambda: serve.log().count("bridge subscriptions confirmed") >= 2, timeout=LONG), serve.log()
        bridge_back = time.monotonic() - start
        _wait_all(fleet, "after the broker restart")
        recovered = time.monotonic() - start
        connected = check_tokens_work(settings, fleet, every=20)
    retry_after_everywhere(fleet)
    check_invariants(settings, [fleet])
    figure(
        f"broker-restart-{how}",
        devices=len(fleet.devices),
        answered_before_restart=answered_before,
        sends=fleet.sends(),
        answered_twice_identically=sum(len(d.final_answers()) > 1 for d in fleet.devices),
        resent_after_timeout=sum(d.timed_out > 0 for d in fleet.devices),
        connected_with_token=connected,
        seconds_to_bridge_resubscribed=f"{bridge_back:.1f}",
        seconds_restart_to_last_answer=f"{recovered:.1f}",
    )


# --- 3. database trouble ----------------------------------------------------------------------


class FaultyStore(Store):
    """A real SQLite store with two faults a test can switch: a busy timeout of `busy_ms` (the bridge's
    own is 10 s, which a test would wait out for every refused claim), and a full disk
    (`PRAGMA max_page_count` pinned at the current size, so a write that needs a new page meets
    SQLite's real `database or disk is full`)."""

    def __init__(self, path: Path, busy_ms: int) -> None:
        self.full = threading.Event()
        self.no_limit: int | None = None
        super().__init__(path, lock_timeout=busy_ms / 1000)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        conn = self.connection()  # this thread's: the one the transaction below runs on
        self.no_limit = self.no_limit or int(conn.execute("PRAGMA max_page_count").fetchone()[0])
        if self.full.is_set():
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            conn.execute(f"PRAGMA max_page_count = {pages}")
        else:
            conn.execute(f"PRAGMA max_page_count = {self.no_limit}")
        with super().transaction() as tx:
            yield tx


@contextmanager
def bridge_in_this_process(settings: Settings, store: Store) -> Iterator[None]:
    """The threaded paho bridge (`BridgeService`, as `serve` builds it beside the dynsec mirror) on `store`,
    in this process."""
    service = BridgeService(BridgeCore(settings), claim_handlers(settings, store))
    service.start()
    try:
        assert service.wait_connected(30), "bridge did not connect to Mosquitto"
        yield
    finally:
        service.stop()
        store.close()


@pytest.mark.parametrize(
    ("edge", "fault"),
    [("threaded", "locked"), ("threaded", "disk_full"), ("default", "locked")],
    ids=["threaded-locked", "threaded-disk_full", "default-locked"],
)
def test_database_trouble_mid_burst_is_retryable_and_heals(
    initialised: tuple[Settings, str], edge: str, fault: str
) -> None:
    """The SQLite file locked by another writer, or full: claims get `internal_error` with `retry_after`,
    nothing is half-written, and once the fault is gone the retried claims are all served. On the threaded
    edge (beside the dynsec mirror) in this process, with a store whose faults the test switches; on the
    default edge (`provbridge serve`: its claim worker's group commits wait out SQLite's busy timeout)
    with another writer holding the file."""
    settings = external_settings(initialised[0], dynsec=False)
    settings = settings.model_copy(update={"claims": settings.claims.model_copy(update={"retry_after_seconds": 1})})
    blocker: sqlite3.Connection | None = None
    store: FaultyStore | None = None
    bridge: AbstractContextManager[object] = ServeProcesses(settings, env=EXTERNAL_ENV)
    if edge == "threaded":
        store = FaultyStore(settings.database_file, busy_ms=200)
        bridge = bridge_in_this_process(settings, store)
    with (
        mosquitto_for(settings),
        bridge,
        Fleet(settings.broker.port, settings.topic_prefix, _first_key(initialised)) as fleet,
    ):
        fleet.connect()
        burst = fleet.add(SMALL_BURST)
        fleet.send(burst)
        assert wait_for(lambda: fleet.finals() >= SMALL_BURST // 5, timeout=LONG)
        if fault == "locked":
            blocker = sqlite3.connect(settings.database_file, timeout=30, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
        else:
            assert store is not None
            store.full.set()
        at_fault = _consistent_snapshot(settings)
        # More claims while the fault lasts: the first burst may be all answered by now (the bridge is fast).
        fleet.send(fleet.add(SMALL_BURST // 5))
        assert wait_for(lambda: fleet.count("internal_error") >= 20, timeout=LONG)
        during = _consistent_snapshot(settings)
        start = time.monotonic()
        if blocker is not None:
            assert during == at_fault  # nothing written while another writer held it
            blocker.rollback()
            blocker.close()
        else:
            assert store is not None
            store.full.clear()
        _wait_all(fleet, f"after the {fault} fault")
        recovered = time.monotonic() - start
    assert len(set(during)) == 1, during  # devices == key uses == provisioned events, mid-fault
    assert fleet.count("internal_error") >= 20
    retry_after_everywhere(fleet)
    check_invariants(settings, [fleet])
    figure(
        f"database-{fault}-{edge}-edge",
        devices=len(fleet.devices),
        rows_when_fault_began=at_fault[0],
        rows_written_during_fault=during[0] - at_fault[0],
        internal_error_answers=fleet.count("internal_error"),
        seconds_fault_cleared_to_last_answer=f"{recovered:.1f}",
    )


@pytest.mark.parametrize("how", ["restart", "kill-9"])
def test_postgresql_restarted_mid_burst_is_retryable_and_loses_nothing(
    initialised: tuple[Settings, str], tmp_path: Path, how: str
) -> None:
    """The bridge on PostgreSQL (`provbridge serve`, embedded broker), its server restarted (a fast shutdown: every
    session ended) or killed with -9 and started again in the middle of a 2,000-claim burst: claims in flight get
    `internal_error` with `retry_after` and succeed when re-sent; nothing is lost or half-written."""
    with PostgresServer(tmp_path / "pg") as server:
        url = server.create_database()
        settings = initialised[0].model_copy(update={"storage": StorageSettings(url=url)})
        assert run_cli(settings, "storage", "copy", "--to", url) == 0  # the initialised data dir's first key with it
        with (
            ServeProcesses(settings, env=BASE_ENV),
            Fleet(settings.broker.port, settings.topic_prefix, _first_key(initialised)) as fleet,
        ):
            fleet.connect()
            burst = fleet.add(BURST)
            fleet.send(burst)
            assert wait_for(lambda: fleet.finals() >= BURST // 4, timeout=LONG)
            answered_before = fleet.finals()
            if how == "restart":
                server.restart()
            else:
                server.kill()
                server.start()
            start = time.monotonic()
            _wait_all(fleet, f"after the PostgreSQL {how}")
            recovered = time.monotonic() - start
        retry_after_everywhere(fleet)
        check_invariants(settings, [fleet])
        figure(
            f"postgresql-{how}-embedded",
            devices=len(fleet.devices),
            answered_before=answered_before,
            internal_error_answers=fleet.count("internal_error"),
            seconds_back_to_last_answer=f"{recovered:.1f}",
        )


# --- 4. duplicate delivery --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["embedded", "mosquitto-2-processes"])
def test_the_same_claim_delivered_twice_makes_one_device(initialised: tuple[Settings, str], layout: str) -> None:
    """Every claim of a burst published twice back to back (on Mosquitto, with two bridge processes
    sharing the claims, so the copies race in two processes): one device each, identical answers."""
    settings = initialised[0]
    broker: AbstractContextManager[object]
    if layout == "embedded":
        serve = ServeProcesses(settings, env=BASE_ENV)
        broker = _nothing()
    else:
        settings = external_settings(settings)
        serve = ServeProcesses(settings, 2, env=EXTERNAL_ENV)
        broker = mosquitto_for(settings)
    count = 400  # 800 messages: under claims.max_in_flight, so copies are rarely told to retry instead
    with broker, serve, Fleet(settings.broker.port, settings.topic_prefix, _first_key(initialised)) as fleet:
        fleet.connect()
        devices = fleet.add(count)
        fleet.send(devices, copies=2)
        assert wait_for(lambda: fleet.all_final() and all(len(d.answers) >= 2 for d in devices), timeout=LONG)
        log_text = serve.log()
    check_invariants(settings, [fleet])  # one row each; every answer to a request_id the same bytes
    twice = sum(len(d.final_answers()) == 2 for d in devices)
    assert twice >= count // 2, twice  # most copies were both answered, and identically
    figure(
        f"duplicate-delivery-{layout}",
        devices=count,
        messages=2 * count,
        both_copies_answered_identically=twice,
        processes_answering=len(set(re.findall(r"provbridge\.service#(\d+)[^:]*: claim on ", log_text))),
    )


@contextmanager
def _nothing() -> Iterator[object]:
    yield None


# --- 5. slow consumers ------------------------------------------------------------------------


def raw_connect(port: int, client_id: str, rcvbuf: int | None = None) -> socket.socket:
    """A bare MQTT 3.1.1 client: CONNECT (clean session, no keepalive), and nothing read back."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a tiny window
    sock.connect(("127.0.0.1", port))
    sock.sendall(connect_packet(client_id, keepalive=0))
    return sock


def raw_subscribe(sock: socket.socket, topic: str) -> None:
    sock.sendall(packet(0x82, struct.pack(">H", 1) + mqtt_string(topic) + bytes([1])))


def raw_publish(sock: socket.socket, topic: str, payload: bytes) -> None:
    sock.sendall(packet(0x30, mqtt_string(topic) + payload))  # QoS 0: no PUBACK to read


@pytest.mark.parametrize("broker_mode", ["embedded", "mosquitto"])
def test_slow_and_vanishing_consumers_do_not_block_other_devices(
    initialised: tuple[Settings, str], broker_mode: str
) -> None:
    """A device that never reads its socket (a tiny receive window and hundreds of answers due), one that
    never acknowledges its QoS 1 answers, and devices that disconnect right after claiming: the rest of a
    burst is answered all the same; the vanished devices get their stored answer when they come back."""
    settings, key = initialised
    broker: AbstractContextManager[object]
    if broker_mode == "embedded":
        serve, broker = ServeProcesses(settings, env=BASE_ENV), _nothing()
    else:
        settings = external_settings(settings)
        serve, broker = ServeProcesses(settings, env=EXTERNAL_ENV), mosquitto_for(settings)
    port, prefix = settings.broker.port, settings.topic_prefix
    stuck_claims = 300
    with broker, serve:
        # Never reads: subscribes, then publishes many claims of one device (distinct request_ids).
        stuck_identity = DeviceIdentity.generate(f"hw-stuck-{uuid.uuid4().hex[:6]}")
        stuck = raw_connect(port, "stuck-device", rcvbuf=1024)
        raw_subscribe(stuck, topics.response_topic(prefix, "stuck-device"))
        # Never acknowledges: paho with manual acknowledgement, never given.
        mute_identity = DeviceIdentity.generate(f"hw-mute-{uuid.uuid4().hex[:6]}")
        mute = MqttClient(port, "mute-device", manual_ack=True)
        mute.connect()
        vanished = Fleet(port, prefix, key, lanes=4)  # their claims go out on bare sockets that close at once
        try:
            assert mute.subscribe(topics.response_topic(prefix, "mute-device"))  # its SUBACK came
            for n in range(stuck_claims):
                claim = build_claim(stuck_identity, key, f"stuck.{n:05d}")
                raw_publish(stuck, topics.claim_topic(prefix, "stuck-device"), to_json(claim))
            for n in range(50):
                claim = build_claim(mute_identity, key, f"mute.{n:05d}")
                mute.client.publish(topics.claim_topic(prefix, "mute-device"), to_json(claim), 1)
            for device in vanished.add(100):
                sock = raw_connect(port, vanished.lane_ids[device.lane])
                sock.settimeout(30)
                assert sock.recv(4)[:1] == b"\x20"  # CONNACK: the broker took the session
                raw_publish(sock, topics.claim_topic(prefix, vanished.lane_ids[device.lane]), device.payload)
                sock.sendall(packet(0xE0, b""))  # DISCONNECT, before any answer could arrive
                sock.close()
                device.sends += 1
            with Fleet(port, prefix, key) as fleet:
                fleet.connect()
                fleet.send(fleet.add(500))
                took = _wait_all(fleet, "beside the slow consumers")
            # The vanished devices come back and ask again with the same request_id.
            vanished.connect()
            vanished.send(vanished.devices)
            _wait_all(vanished, "the returning devices")
            # It is being answered, it just never acks.
            assert wait_for(lambda: mute.messages.qsize() >= 1, timeout=LONG)
            unread = struct.unpack("i", fcntl.ioctl(stuck.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
            stuck_created = wait_for(lambda: _device_exists(settings, stuck_identity.hardware_id), timeout=LONG)
            mute_created = wait_for(lambda: _device_exists(settings, mute_identity.hardware_id), timeout=LONG)
        finally:
            vanished.close()
            mute.close()
            stuck.close()
    assert stuck_created and mute_created
    check_invariants(settings, [fleet, vanished], others=2)
    figure(
        f"slow-consumers-{broker_mode}",
        devices=len(fleet.devices),
        seconds_to_answer_all=f"{took:.1f}",
        stuck_claims=stuck_claims,
        bytes_unread_in_stuck_socket=unread,
        unacked_answers_received=mute.messages.qsize(),
        vanished_replayed=len(vanished.devices),
    )


def _device_exists(settings: Settings, hardware_id: str) -> bool:
    db = sqlite3.connect(f"file:{settings.database_file}?mode=ro", uri=True)
    try:
        return db.execute("SELECT 1 FROM devices WHERE hardware_id = ?", (hardware_id,)).fetchone() is not None
    finally:
        db.close()
