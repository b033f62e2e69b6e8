"""Issue 4: in embedded mode the bridge runs inside the amqtt broker's process, with no MQTT client of its
own. Real broker on loopback, real SQLite, real crypto; the bridge started as `serve` starts it."""

import asyncio
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bridge.config import Settings
from bridge.edges.inprocess import InProcessBridge
from bridge.edges.serve import Running, embedded_broker_settings, start_bridge
from bridge.ops import admin
from bridge.storage import keyfiles
from bridge.storage.store import Store
from bridge.tls import certificates as tls
from broker.embedded import start_embedded_broker, stop_embedded_broker
from broker.server import ProvbridgeBroker
from provwire import topics
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device
from tests.helpers.mqtt import MqttClient
from tests.helpers.waiting import wait_for


@dataclass
class Started(Bridge):
    running: Running


@contextmanager
def started(settings: Settings, first_key: str) -> Iterator[Started]:
    """`start_bridge` (what `serve` runs) on an event loop of its own thread; stopped at the end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="inprocess-test-loop", daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_bridge(tls.resolve(settings)), loop).result(30)
    store = Store(settings.database)
    try:
        yield Started(settings, store, keyfiles.load_keys(settings.data_dir), first_key, running)
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        store.close()


def test_claims_are_answered_without_a_bridge_mqtt_connection(initialised: tuple[Settings, str]) -> None:
    with started(*initialised) as bridge, Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
        assert isinstance(answer, ClaimOk) and answer.created
        assert isinstance(bridge.running.edge, InProcessBridge)
        assert bridge.running.broker is not None
        sessions = [session for session, _handler in bridge.running.broker.sessions.values()]
        # The device is the broker's only client: no session under the bridge's client id or account.
        assert [s.client_id for s in sessions] == [device.client_id]
        assert bridge.settings.broker.client_id not in bridge.running.broker.sessions
        assert all(s.username != bridge.settings.broker.username for s in sessions)


def test_status_is_retained_online_and_offline_at_stop(initialised: tuple[Settings, str]) -> None:
    settings, first_key = initialised
    password = admin.create_ops_user(settings, "watcher")
    status = topics.status_topic(settings.topic_prefix)
    with MqttClient(settings.broker.port, "ops-watch", "watcher", password) as ops:
        with started(settings, first_key):
            assert ops.connect()
            assert ops.subscribe(f"{settings.topic_prefix}/status/#") == [1]
            assert ops.next_message() == (status, b'{"status":"online"}')  # retained, sent on SUBSCRIBE
            with MqttClient(settings.broker.port, "ops-late", "watcher", password) as late:
                assert late.connect()
                assert late.subscribe(status) == [1]
                assert late.next_message() == (status, b'{"status":"online"}')
        assert ops.next_message() == (status, b'{"status":"offline"}')  # said before the broker closed


def test_claims_beyond_max_in_flight_are_answered_rate_limited(initialised: tuple[Settings, str]) -> None:
    settings, first_key = initialised
    claims = settings.claims.model_copy(update={"max_in_flight": 1, "workers": 1})
    settings = settings.model_copy(update={"claims": claims})
    with started(settings, first_key) as bridge, Device(bridge) as first, Device(bridge) as second:
        blocker = sqlite3.connect(settings.database_file, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")  # the first claim's worker waits for the database ...
        try:
            first.conn.publish(topics.claim_topic(bridge.prefix, first.client_id), first.claim_payload(first_key))
            assert wait_for(lambda: bridge.running.core.in_flight == 1)  # ... holding the only slot
            payload = second.claim_payload(first_key)
            refused = ClaimError.model_validate_json(second.send(payload))
        finally:
            blocker.rollback()
            blocker.close()
        assert refused.code is ErrorCode.RATE_LIMITED and refused.retry_after == settings.claims.retry_after_seconds
        assert refused.request_id == json.loads(payload)["request_id"]
        topic, answer = first.conn.next_message()
        assert topic == topics.response_topic(bridge.prefix, first.client_id)
        assert json.loads(answer)["status"] == "ok"
        assert wait_for(lambda: bridge.running.core.in_flight == 0)
        assert isinstance(second.claim(first_key), ClaimOk)  # the slot came back: the retry succeeds
    assert bridge.store.count("devices") == 2


def test_a_claim_in_a_worker_that_dies_is_answered_by_its_successor(initialised: tuple[Settings, str]) -> None:
    with started(*initialised) as bridge, Device(bridge) as device:
        edge = bridge.running.edge
        assert isinstance(edge, InProcessBridge)
        first_worker = edge.worker_pid
        assert first_worker is not None
        blocker = sqlite3.connect(bridge.settings.database_file, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")  # the claim stops inside the worker, before its transaction
        try:
            payload = device.claim_payload(bridge.provision_key)
            device.conn.publish(topics.claim_topic(bridge.prefix, device.client_id), payload)
            assert wait_for(lambda: bridge.running.core.in_flight == 1)
            os.kill(first_worker, signal.SIGKILL)  # the worker's pid, from the edge that started it
            assert wait_for(lambda: edge.worker_pid not in (None, first_worker))
        finally:
            blocker.rollback()
            blocker.close()
        topic, answer = device.conn.next_message()
    assert topic == topics.response_topic(bridge.prefix, device.client_id)
    assert json.loads(answer)["status"] == "ok"
    assert bridge.store.count("devices") == 1


def test_a_claim_sent_before_the_claim_worker_is_up_waits_for_it_and_is_answered(
    initialised: tuple[Settings, str],
) -> None:
    """`serve` takes claims before its broker listens: one that arrives while the claim worker still starts
    (about half a second) waits for it, instead of being acknowledged and reaching no subscriber."""
    settings, first_key = initialised
    settings = tls.resolve(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="inprocess-test-loop", daemon=True)
    thread.start()
    edges: list[InProcessBridge] = []

    def take_claims(broker: ProvbridgeBroker) -> None:
        edges.append(InProcessBridge(settings, broker))
        edges[0].take_claims()

    start = start_embedded_broker(embedded_broker_settings(settings), before_listening=take_claims)
    broker = asyncio.run_coroutine_threadsafe(start, loop).result(30)
    store = Store(settings.database)
    try:
        bridge = Bridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key)
        with Device(bridge) as device:
            device.conn.publish(
                topics.claim_topic(settings.topic_prefix, device.client_id), device.claim_payload(first_key)
            )
            assert wait_for(lambda: edges[0].core.in_flight == 1)  # taken, with no worker yet
            asyncio.run_coroutine_threadsafe(edges[0].start(), loop).result(30)
            _, answer = device.conn.next_message()
        assert ClaimOk.model_validate_json(answer).created
    finally:
        asyncio.run_coroutine_threadsafe(edges[0].stop(), loop).result(30)
        asyncio.run_coroutine_threadsafe(stop_embedded_broker(broker), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        store.close()
