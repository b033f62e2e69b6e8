"""A fleet of devices claiming over a few multiplexed MQTT connections, and what must hold of their answers and the
database after a fault (tests/test_faults.py, tests/test_rabbitmq_bridge.py)."""

import heapq
import itertools
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from bridge.claims import identifiers
from bridge.config import Settings
from bridge.storage import keyfiles
from bridge.storage.store import Store
from device_sim.device import DeviceIdentity, build_claim, open_answer
from provwire import topics
from provwire.models import to_json
from tests.helpers.waiting import wait_for

LANES = 8  # MQTT connections the fleet's claims are multiplexed over
RETRYABLE = frozenset({"rate_limited", "internal_error"})

# --- the devices ------------------------------------------------------------------------------


@dataclass
class FleetDevice:
    identity: DeviceIdentity
    request_id: str
    payload: bytes = field(repr=False)
    lane: int
    sends: int = 0
    answers: list[bytes] = field(default_factory=list)  # every answer to this request_id, in order
    retry_pending: bool = False
    final: bytes | None = None  # the first answer that is not "retry later"
    last_sent: float = 0.0  # time.monotonic() of its latest publish
    timed_out: int = 0  # re-sends after `Fleet.answer_timeout` without an answer

    def retryable_answers(self) -> list[dict[str, Any]]:
        docs = [json.loads(a) for a in self.answers]
        return [d for d in docs if d.get("status") == "error" and d.get("code") in RETRYABLE]

    def final_answers(self) -> list[bytes]:
        return [a for a in self.answers if not _is_retryable(a)]


def _is_retryable(raw: bytes) -> bool:
    doc = json.loads(raw)
    return bool(doc.get("status") == "error" and doc.get("code") in RETRYABLE)


class Fleet:
    """Devices claiming over `lanes` paho connections that reconnect by themselves.

    A claim is re-sent, with the same request_id and payload, when an answer says retry later
    (after its retry_after plus up to 25 % jitter), if `resend_on_reconnect`, when its lane's
    connection came back without its answer, and, if `answer_timeout` is set, when no answer came
    within that many seconds (PROTOCOL.md §6, rule 2). Nothing else re-sends: without a time-out, a
    claim the broker took and never answered stays unanswered, so a test sees lost claims.
    """

    def __init__(self, port: int, prefix: str, provision_key: str, *, lanes: int = LANES) -> None:
        self.port = port
        self.prefix = prefix
        self.provision_key = provision_key
        self.tag = uuid.uuid4().hex[:6]
        self.resend_on_reconnect = True
        self.answer_timeout: float | None = None
        self.devices: list[FleetDevice] = []
        self.by_request: dict[str, FleetDevice] = {}
        self.stray: list[bytes] = []
        self.refused: list[str] = []  # lanes whose SUBSCRIBE the broker refused
        self.pubacks = 0
        self.lane_ids = [f"fl-{self.tag}-{n}" for n in range(lanes)]
        self.subscriptions = [0] * lanes  # SUBACKs per lane: 1 + its reconnections
        self.connected = [False] * lanes
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._retries: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._closing = False
        self._clients = [self._client(n) for n in range(lanes)]
        self._retrier = threading.Thread(target=self._retry_loop, name="fleet-retry", daemon=True)

    def _client(self, lane: int) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.lane_ids[lane], clean_session=True, userdata=lane)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=2)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        return c

    def add(self, count: int) -> list[FleetDevice]:
        """`count` more devices, spread over the lanes; nothing sent yet."""
        added = []
        for _ in range(count):
            n = len(self.devices)
            identity = DeviceIdentity.generate(f"hw-{self.tag}-{n:05d}")
            request_id = f"{self.tag}.{n:05d}"
            device = FleetDevice(
                identity,
                request_id,
                to_json(build_claim(identity, self.provision_key, request_id)),
                n % len(self._clients),
            )
            self.devices.append(device)
            self.by_request[request_id] = device
            added.append(device)
        return added

    # -- lifecycle --

    def connect(self) -> None:
        self._retrier.start()
        for client in self._clients:
            client.connect_async("127.0.0.1", self.port, keepalive=30)
            client.loop_start()
        assert wait_for(lambda: all(self.subscriptions), timeout=30), f"fleet lanes did not subscribe {self.refused}"

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
        if self._retrier.is_alive():
            self._retrier.join(10)

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- sending --

    def send(self, devices: list[FleetDevice], copies: int = 1) -> None:
        for device in devices:
            for _ in range(copies):
                self._publish(device)

    def _publish(self, device: FleetDevice) -> None:
        with self._lock:
            device.sends += 1
            device.last_sent = time.monotonic()
        self._clients[device.lane].publish(
            topics.claim_topic(self.prefix, self.lane_ids[device.lane]), device.payload, 1
        )

    def _retry_loop(self) -> None:
        """Re-sends what is due: "retry later" answers whose delay passed and, with `answer_timeout`,
        claims that got no answer in time. Wakes at least every second when a time-out is set."""
        while True:
            with self._lock:
                if self._closing:
                    return
                now = time.monotonic()
                due: list[FleetDevice] = []
                while self._retries and self._retries[0][0] <= now:
                    _, _, request_id = heapq.heappop(self._retries)
                    device = self.by_request[request_id]
                    device.retry_pending = False
                    if device.final is None:
                        due.append(device)
                if self.answer_timeout is not None:
                    stale = now - self.answer_timeout
                    for device in self.devices:
                        late = device.last_sent < stale and device not in due
                        if device.sends and device.final is None and not device.retry_pending and late:
                            device.timed_out += 1
                            due.append(device)
                if not due:
                    wait = None if not self._retries else self._retries[0][0] - now
                    if self.answer_timeout is not None:
                        wait = 1.0 if wait is None else min(wait, 1.0)
                    self._changed.wait(wait)
                    continue
            for device in due:
                self._publish(device)

    # -- paho callbacks (each lane's network thread) --

    def _on_connect(self, client: mqtt.Client, lane: int, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(topics.response_topic(self.prefix, self.lane_ids[lane]), 1)

    def _on_subscribe(self, _c: mqtt.Client, lane: int, _mid: int, codes: Any, _p: Any) -> None:
        if any(code.is_failure for code in codes):
            self.refused.append(f"lane {lane}: SUBSCRIBE refused")
            return
        with self._lock:
            self.subscriptions[lane] += 1
            self.connected[lane] = True
            again = [d for d in self.devices if d.lane == lane and d.sends and d.final is None]
        if self.resend_on_reconnect and self.subscriptions[lane] > 1:
            for device in again:  # the connection came back: answers sent meanwhile are gone
                self._publish(device)

    def _on_disconnect(self, _c: mqtt.Client, lane: int, _f: Any, _r: Any, _p: Any) -> None:
        with self._lock:
            self.connected[lane] = False

    def _on_publish(self, _c: mqtt.Client, _lane: int, _mid: int, _r: Any, _p: Any) -> None:
        with self._lock:
            self.pubacks += 1

    def _on_message(self, _c: mqtt.Client, _lane: int, message: mqtt.MQTTMessage) -> None:
        raw = bytes(message.payload)
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        with self._lock:
            device = self.by_request.get(str(doc.get("request_id"))) if isinstance(doc, dict) else None
            if device is None:
                self.stray.append(raw)
                return
            device.answers.append(raw)
            if device.final is not None:
                return
            if doc.get("status") == "error" and doc.get("code") in RETRYABLE:
                if not device.retry_pending:
                    device.retry_pending = True
                    delay = float(doc.get("retry_after") or 1) * (1 + random.random() / 4)
                    heapq.heappush(self._retries, (time.monotonic() + delay, next(self._seq), device.request_id))
                    self._changed.notify_all()
                return
            device.final = raw

    # -- what happened --

    def finals(self) -> int:
        with self._lock:
            return sum(d.final is not None for d in self.devices)

    def all_final(self) -> bool:
        return self.finals() == len(self.devices)

    def sends(self) -> int:
        with self._lock:
            return sum(d.sends for d in self.devices)

    def lanes_up(self) -> int:
        with self._lock:
            return sum(self.connected)

    def count(self, code: str) -> int:
        with self._lock:
            devices = list(self.devices)
        return sum(1 for d in devices for a in d.retryable_answers() if a["code"] == code)


def retry_after_everywhere(fleet: Fleet) -> None:
    for device in fleet.devices:
        for answer in device.retryable_answers():
            assert answer.get("retry_after"), answer


# --- the invariants ---------------------------------------------------------------------------


def check_invariants(settings: Settings, fleets: list[Fleet], others: int = 0) -> None:
    """Every fleet device: one row, its final answer opens with its key and is the stored answer, every
    answer it got is that one; nothing half-written anywhere. `others`: devices made outside the fleets."""
    keys = keyfiles.load_keys(settings.data_dir)
    cloud: dict[str, ec.EllipticCurvePublicKey] = {kid: k.public_key() for kid, k in keys.cloud.items()}
    store = Store(settings.database)  # SQLite or PostgreSQL, as the bridge ran
    db = store.connection()
    try:
        if settings.storage.url is None:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        total = 0
        for fleet in fleets:
            for d in fleet.devices:
                assert d.final is not None, f"{d.request_id}: no final answer (lost)"
                assert d.final_answers() == [d.final] * len(d.final_answers()), f"{d.request_id}: answers differ"
                kid = json.loads(d.final)["cloud_key_id"]
                result = open_answer(d.final, d.identity, cloud[kid], d.request_id)  # raises unless ok and sealed to it
                assert result.created and result.credentials.api_key
                stored = db.execute(
                    "SELECT answer FROM answers WHERE client_id = ? AND request_id = ?",
                    (fleet.lane_ids[d.lane], d.request_id),
                ).fetchall()
                assert [bytes(r[0]) for r in stored] == [d.final], f"{d.request_id}: not the stored answer"
                rows = db.execute(
                    "SELECT id, api_key_hash FROM devices WHERE hardware_id = ?", (d.identity.hardware_id,)
                ).fetchall()
                assert len(rows) == 1, f"{d.identity.hardware_id}: {len(rows)} rows"
                assert rows[0][0] == result.device_id
                assert bytes(rows[0][1]) == identifiers.digest(result.credentials.api_key)
            assert not fleet.stray, fleet.stray[:3]
            total += len(fleet.devices)
        devices = db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
        assert devices == total + others, (devices, total, others)
        uses = db.execute("SELECT SUM(registrations) FROM provision_keys").fetchone()[0]
        assert uses == devices  # every key use spent has its device, and no device without it
        provisioned = db.execute("SELECT COUNT(*) FROM events WHERE event = 'device.provisioned'").fetchone()[0]
        assert provisioned == devices
        orphans = db.execute(
            "SELECT COUNT(*) FROM devices d WHERE length(d.api_key_hash) != 32"
            " OR NOT EXISTS (SELECT 1 FROM provision_keys k WHERE k.id = d.key_id)"
        ).fetchone()[0]
        assert orphans == 0
    finally:
        store.close()
