"""Issue 4: `provbridge serve --processes 2` against a real Mosquitto (started from `provbridge
mosquitto-config` output), the bridge as real subprocesses sharing the claims through `$share`
subscriptions. The core concurrency guarantees must hold across processes as they do across threads.
"""

import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest

from bridge.cli import main as cli
from bridge.config import Settings
from bridge.edges.sessions import Shard, bridge_client, client_ids, retire_stale_sessions
from bridge.mosquitto.dynsec import admin_channel
from bridge.mosquitto.janitor import SharedDynsecMirror
from bridge.storage import keyfiles
from bridge.storage.statefiles import recorded_sessions
from bridge.storage.store import Store
from bridge.tokens import TokenGrant
from provwire import topics
from provwire.models import ClaimOk
from tests.helpers.devices import Device, answer_of, race_one_time_key
from tests.helpers.mosquitto import MosquittoBridge, external_settings, mosquitto_for
from tests.helpers.mqtt import can_connect
from tests.helpers.processes import ServeProcesses
from tests.helpers.waiting import wait_for

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends

PROCESSES = 2


@dataclass
class MultiBridge(MosquittoBridge):
    serve: ServeProcesses


@pytest.fixture(params=["jwt", "dynsec"], ids=["mosquitto-jwt", "mosquitto-dynsec"])
def bridge(initialised: tuple[Settings, str], request: pytest.FixtureRequest) -> Iterator[MultiBridge]:
    """Two bridge processes on Mosquitto: in its default configuration (jwt) and with the dynsec opt-in."""
    settings, first_key = initialised
    settings = external_settings(settings, mosquitto_auth=request.param)
    with mosquitto_for(settings) as mosquitto, ServeProcesses(settings, PROCESSES) as serve:
        store = Store(settings.database)
        try:
            yield MultiBridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key, mosquitto, serve)
        finally:
            store.close()


# --- the core concurrency guarantees, across two processes ------------------------------------


def test_one_time_key_under_50_concurrent_claims_creates_exactly_one_device(bridge: MultiBridge) -> None:
    statuses = race_one_time_key(bridge)
    assert len(bridge.store.events(event="key.exhausted", limit=10)) == 1
    winner = next(ClaimOk.model_validate(s) for s in statuses if s["status"] == "ok")
    state = json.loads((bridge.mosquitto.conf_dir / "dynamic-security.json").read_text())
    mirrored = [c["username"] for c in state["clients"] if c["username"].startswith("dev_")]
    # The dynsec opt-in mirrors the one winner; in jwt mode Mosquitto verifies tokens itself, nothing is mirrored.
    assert mirrored == ([winner.device_id] if bridge.settings.broker.mosquitto_auth == "dynsec" else [])
    assert bridge.serve.answered_by() == set(range(PROCESSES))  # both processes took part


def test_reclaim_with_same_public_key_is_idempotent(bridge: MultiBridge) -> None:
    with Device(bridge) as device:
        answers = [device.claim(bridge.provision_key) for _ in range(2 * PROCESSES)]  # round robin: all processes
    first, *again = answers
    assert isinstance(first, ClaimOk) and first.created
    for answer in again:
        assert isinstance(answer, ClaimOk) and answer.device_id == first.device_id and not answer.created
        assert device.open(answer).api_key == ""
    assert bridge.store.count("devices") == 1
    assert len(bridge.store.events(event="device.provisioned", limit=10)) == 1
    assert len(bridge.store.events(event="device.reclaimed", limit=10)) == 2 * PROCESSES - 1
    last = device.open(answers[-1]).mqtt  # Mosquitto knows the newest token
    assert can_connect(bridge.port, last.client_id, last.username, last.token)


def test_same_request_id_gets_the_byte_identicalanswer_of(bridge: MultiBridge) -> None:
    with Device(bridge) as device:
        payload = device.claim_payload(bridge.provision_key)
        # All at once: copies are handled by both processes concurrently, racing for the same request_id.
        for _ in range(4 * PROCESSES):
            device.conn.client.publish(topics.claim_topic(bridge.prefix, device.client_id), payload, 1)
        answers = [device.conn.next_message()[1] for _ in range(4 * PROCESSES)]
        answers.append(device.send(payload))  # and once more, later
    assert len(set(answers)) == 1
    answer = answer_of(answers[0])
    assert isinstance(answer, ClaimOk) and answer.created and device.open(answer).api_key
    assert bridge.store.count("devices") == 1
    row = bridge.store.connection().execute("SELECT COUNT(*) FROM answers WHERE client_id = ?", (device.client_id,))
    assert row.fetchone()[0] == 1


# --- supervision ----------------------------------------------------------------------------


def test_a_killed_process_is_restarted_and_answers_what_waited_for_it(bridge: MultiBridge) -> None:
    victim = bridge.serve.children()[1]
    devices = [Device(bridge) for _ in range(2 * PROCESSES)]
    for d in devices:
        d.__enter__()
    os.kill(victim, signal.SIGKILL)  # a pid the supervisor reported starting, ours
    # Published while it is down: Mosquitto queues its share of them in its session, for its restart.
    for d in devices:
        d.conn.client.publish(topics.claim_topic(bridge.prefix, d.client_id), d.claim_payload(bridge.provision_key), 1)
    assert wait_for(lambda: bridge.serve.children()[1] != victim, timeout=30), bridge.serve.log()
    answers = [answer_of(d.conn.next_message(timeout=30)[1]) for d in devices]
    for d in devices:
        d.__exit__()
    assert all(isinstance(a, ClaimOk) for a in answers), answers
    assert bridge.store.count("devices") == 2 * PROCESSES


def test_processes_need_an_external_broker(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _ = initialised  # embedded: amqtt would hand every claim to every process
    assert cli.main(["--data-dir", str(settings.data_dir), "serve", "--processes", "2"]) == 1
    assert "external broker" in capsys.readouterr().err


# --- what several processes share: old sessions and the janitor ------------------------------


def _session_present(settings: Settings, client_id: str) -> bool:
    """Whether the broker still holds a persistent session for `client_id` (then ends the look)."""
    flags: list[bool] = []
    done = threading.Event()
    client = bridge_client(settings, client_id, persistent=True, reconnect_on_failure=False)

    def on_connect(_c: mqtt.Client, _u: object, connect_flags: mqtt.ConnectFlags, _r: object, _p: object) -> None:
        flags.append(connect_flags.session_present)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", settings.broker.port)
    client.loop_start()
    try:
        assert done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return flags[0]


def test_sessions_of_a_previous_layout_are_retired(initialised: tuple[Settings, str]) -> None:
    settings = external_settings(initialised[0])
    with mosquitto_for(settings):
        assert recorded_sessions(settings.data_dir) == []
        old = client_ids(settings, 3)
        retire_stale_sessions(settings, old, threading.Event())  # a bridge ran with 3 processes
        for client_id in old:
            assert not _session_present(settings, client_id)  # creates each session (persistent)
            assert _session_present(settings, client_id)
        retire_stale_sessions(settings, client_ids(settings, 2), threading.Event())  # now 2
        assert _session_present(settings, old[0]) and _session_present(settings, old[1])
        assert not _session_present(settings, old[2])  # gone: it would have swallowed its share of claims
        assert recorded_sessions(settings.data_dir) == client_ids(settings, 2)


def test_janitors_of_two_processes_never_delete_a_token_the_other_renewed(initialised: tuple[Settings, str]) -> None:
    settings, _ = initialised
    settings = external_settings(settings, mosquitto_auth="dynsec")
    store = Store(settings.database)
    device_id = f"dev_{uuid.uuid4().hex[:26]}"
    now = int(time.time())

    def grant(expires_at: int) -> TokenGrant:
        return TokenGrant(f"token-{uuid.uuid4().hex}", uuid.uuid4().hex, expires_at, [f"devices/{device_id}/#"], [])

    early, late = grant(now + 60), grant(now + 3600)
    try:
        with mosquitto_for(settings), admin_channel(settings) as a_channel, admin_channel(settings) as b_channel:
            a, b = SharedDynsecMirror(settings, store), SharedDynsecMirror(settings, store)
            a.use(a_channel)
            b.use(b_channel)
            for janitor in (a, b):
                janitor.load()
            with store.transaction():  # as a claim mirrors: inside its transaction
                a.grant(device_id, early)
            with store.transaction():  # a re-claim handled by the other process
                b.grant(device_id, late)
            assert a.mirrored()[device_id] == early.expires_at  # a's memory is stale ...
            assert a.sweep(now=early.expires_at) == 0  # ... so it asks Mosquitto before deleting
            assert a.mirrored()[device_id] == late.expires_at
            assert can_connect(settings.broker.port, device_id, device_id, late.token)
            assert b.sweep(now=late.expires_at) == 1  # really expired: removed
            assert not can_connect(settings.broker.port, device_id, device_id, late.token)
            assert a.sweep(now=late.expires_at) == 0 and device_id not in a.mirrored()
    finally:
        store.close()


def test_flood_limits_hold_for_the_fleet_not_per_process(initialised: tuple[Settings, str]) -> None:
    """Two processes share a client's claims ($share round robin): each enforces half of the client-id limit, so the
    client gets its burst once, not once per process (docs/RELIABILITY.md §6)."""
    settings = external_settings(initialised[0], mosquitto_auth="jwt")
    limits = {
        "PROVBRIDGE_CLAIMS__RATE_LIMITS": "true",
        "PROVBRIDGE_CLAIMS__RATE_CLIENT_PER_SECOND": "0.01",  # no refill worth counting during the test
        "PROVBRIDGE_CLAIMS__RATE_CLIENT_BURST": "10",
    }
    with mosquitto_for(settings) as mosquitto, ServeProcesses(settings, PROCESSES, env=limits) as serve:
        bridge = MosquittoBridge(
            settings, Store(settings.database), keyfiles.load_keys(settings.data_dir), "", mosquitto
        )
        with Device(bridge) as flooder:
            codes = []
            for _ in range(40):
                flooder.hardware_id = f"hw-{uuid.uuid4().hex[:12]}"
                answer = json.loads(flooder.send(flooder.claim_payload("pk_" + uuid.uuid4().hex)))
                codes.append(answer.get("code"))
        bridge.store.close()
        assert serve.answered_by() == set(range(PROCESSES))  # both processes took part
    assert codes.count("rate_limited") == 30  # 10 of 40 got through: the fleet's burst, 5 a process
    assert codes.count("permission_denied") == 10  # the guessed keys that got through are refused as such


def test_bridges_on_two_hosts_share_the_claims_on_one_mosquitto(initialised: tuple[Settings, str]) -> None:
    """Two hosts' bridges (one process each) on one Mosquitto: the second has a `broker.host_id`, both count the
    fleet's processes (`claims.fleet_processes = 2`). Each claim is taken by one of them ($share) and both take some;
    their sessions are apart (the second's client id carries its host id), and only the first owns the status."""
    settings, first_key = initialised
    settings = external_settings(settings, mosquitto_auth="jwt")
    fleet = {"PROVBRIDGE_CLAIMS__FLEET_PROCESSES": "2"}
    second_host = {**fleet, "PROVBRIDGE_BROKER__HOST_ID": "h2", "PROVBRIDGE_API__ENABLED": "false"}
    b = ServeProcesses(settings, env=second_host)
    b.log_file, b.config_file = settings.data_dir.parent / "serve-h2.log", settings.data_dir.parent / "serve-h2.toml"
    claims = 30
    with mosquitto_for(settings) as mosquitto, ServeProcesses(settings, env=fleet) as a, b:
        bridge = MosquittoBridge(
            settings, Store(settings.database), keyfiles.load_keys(settings.data_dir), first_key, mosquitto
        )
        try:
            for _ in range(claims):
                with Device(bridge) as device:
                    assert isinstance(device.claim(first_key), ClaimOk)
            assert bridge.store.count("devices") == claims
        finally:
            bridge.store.close()
    handled = [len(re.findall(r"claim on \S+: ", serve.log())) for serve in (a, b)]
    assert sum(handled) == claims and all(handled)  # each claim by one host (plain subscriptions: by both)
    # Neither retired the other's session as one of its own old ones (their records are apart, here in one data dir).
    assert "disconnected from broker" not in a.log() + b.log()
    h2 = settings.model_copy(update={"broker": settings.broker.model_copy(update={"host_id": "h2"})})
    shard = Shard()
    assert shard.client_id(h2) == shard.client_id(settings) + "-h2"
    assert shard.owns_status(settings) and not shard.owns_status(h2)
