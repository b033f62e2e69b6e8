"""Floods (issue 5): the rate limits through the embedded broker on loopback, real SQLite, real crypto.

Each limit is tested with a refill so slow (0.01 token/s) that no token comes back during a test: the
assertions depend on counts, never on how fast the machine is. The flood tests print what they measure
(latency, RSS) for docs/RELIABILITY.md section 6; they assert only on outcomes and structural bounds.
"""

import asyncio
import contextlib
import json
import os
import socket
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from amqtt.adapters import StreamReaderAdapter

from bridge.claims.provisioning import Provisioner
from bridge.config import Settings
from bridge.edges.core import BridgeCore
from bridge.ops import admin
from bridge.storage import keyfiles
from bridge.storage.filelock import locked
from bridge.storage.store import Store
from broker.framing import PacketReader
from device_sim.device import build_token_refresh
from provwire import topics
from provwire.errors import ErrorCode
from provwire.models import MAX_CLAIM_BYTES, ClaimError, ClaimOk, to_json
from tests.helpers.bridge import Bridge, make_settings
from tests.helpers.brokers import DYNSEC, EMBEDDED, JWT, bridge_on
from tests.helpers.devices import Device
from tests.helpers.raw_mqtt import connect_packet, mqtt_string, packet, remaining_length
from tests.helpers.waiting import wait_for

SLOW = 0.01  # tokens per second: none comes back within a test


@pytest.fixture
def initialised(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Settings, str]:
    """The conftest fixture, with `claims` overrides given by `limits(...)` (an indirect parametrisation)."""
    overrides: dict[str, Any] = {"rate_limits": True, **getattr(request, "param", {})}
    base = make_settings(tmp_path / "data")
    s = base.model_copy(update={"claims": base.claims.model_copy(update=overrides)})
    result = admin.init_data_dir(s)
    assert result.created and result.provision_key
    return s, result.provision_key


def limits(**overrides: float) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("initialised", [overrides], indirect=True)


def rate_limited(answer: ClaimOk | ClaimError) -> ClaimError:
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.RATE_LIMITED, answer
    assert answer.retry_after is not None and answer.retry_after >= 1
    return answer


def limited_events(bridge: Bridge, name: str = "claim.rate_limited") -> list[dict[str, Any]]:
    return bridge.store.events(event=name, limit=1000)


def guessed_key() -> str:
    return "pk_" + uuid.uuid4().hex


@pytest.fixture(params=[EMBEDDED, JWT], ids=["embedded", "mosquitto-jwt"])
def limited_bridge(
    initialised: tuple[Settings, str], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bridge]:
    """The limits applied before a claim's transaction: in the claim worker (embedded broker) or in the edge's
    own process, which prepares claims on an external broker (Mosquitto, jwt: the default)."""
    with bridge_on(request.param, initialised, monkeypatch) as running:
        yield running


def reasons_stored(bridge: Bridge, count: int) -> list[str]:
    """The reasons of the `claim.rate_limited` events, once `count` are stored: the edge answers a refusal at
    once and its event is stored by the claim worker after."""
    assert wait_for(lambda: len(limited_events(bridge)) >= count)
    return sorted(e["reason"] for e in limited_events(bridge))


@limits(rate_client_per_second=SLOW, rate_client_burst=10)
def test_claims_beyond_the_client_id_limit_are_rate_limited_and_reported_once(bridge: Bridge) -> None:
    with Device(bridge) as attacker:
        for _ in range(10):  # a fresh hardware id and key each time: only the client id limit applies
            attacker.hardware_id = f"hw-{uuid.uuid4().hex[:12]}"
            answer = attacker.claim(guessed_key())
            assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED
        payload = attacker.claim_payload(guessed_key())
        refused = ClaimError.model_validate_json(attacker.send(payload))
        assert 90 <= (rate_limited(refused).retry_after or 0) <= 100  # a token at 0.01/s, less what refilled
        assert refused.request_id == json.loads(payload)["request_id"]  # matched without a full parse
        for _ in range(5):
            rate_limited(attacker.claim(guessed_key()))
    with Device(bridge) as other:
        assert isinstance(other.claim(bridge.provision_key), ClaimOk)  # other client ids are not limited
    events = limited_events(bridge)
    assert len(events) == 1 and events[0]["reason"] == "client_id"  # one event per key per minute, not six
    assert bridge.store.count("devices") == 1


@limits(rate_device_per_second=SLOW, rate_device_burst=3)
def test_claims_beyond_the_device_limit_are_rate_limited(limited_bridge: Bridge) -> None:
    bridge = limited_bridge
    with Device(bridge) as device:
        for _ in range(3):  # the creation, then re-claims: same hardware id, same key
            assert isinstance(device.claim(bridge.provision_key), ClaimOk)
        rate_limited(device.claim(bridge.provision_key))
        # Keyed by (hardware_id, key): someone without this key cannot use up the device's budget.
        assert device.claim(guessed_key()).code is ErrorCode.PERMISSION_DENIED  # type: ignore[union-attr]
    assert bridge.store.count("devices") == 1
    assert reasons_stored(bridge, 1) == ["device"]


@limits(rate_key_per_second=SLOW, rate_key_burst=4)
def test_claims_beyond_the_provisioning_key_limit_are_rate_limited_and_spend_nothing(limited_bridge: Bridge) -> None:
    bridge = limited_bridge
    key = bridge.create_key(max_registrations=10)
    for _ in range(4):
        with Device(bridge) as device:
            assert isinstance(device.claim(key), ClaimOk)
    with Device(bridge) as late:
        rate_limited(late.claim(key))
    assert bridge.store.count("devices") == 4
    stored = bridge.store.keys()
    (row,) = [k for k in stored if k.max_registrations == 10]
    assert row.registrations == 4  # the refusal spent no use
    assert reasons_stored(bridge, 1) == ["provision_key"]


@limits(rate_all_codes_per_second=SLOW, rate_all_codes_burst=5)
def test_human_codes_are_limited_per_code_and_all_together(limited_bridge: Bridge) -> None:
    bridge = limited_bridge
    with Device(bridge) as guesser:
        for _ in range(3):  # one wrong code, tried again: the per-code limit (0.1/s, burst 3) by default
            assert guesser.claim("PROV-AAAA-AAAA").code is ErrorCode.PERMISSION_DENIED  # type: ignore[union-attr]
        assert 5 <= (rate_limited(guesser.claim("PROV-AAAA-AAAA")).retry_after or 0) <= 10  # a token at 0.1/s
    with Device(bridge) as other:
        for code in ("PROV-BBBB-BBBB", "PROV-CCCC-CCCC"):  # new codes: the budget of all codes (5) runs out
            assert other.claim(code).code is ErrorCode.PERMISSION_DENIED  # type: ignore[union-attr]
        rate_limited(other.claim("PROV-DDDD-DDDD"))
    assert bridge.store.count("devices") == 0
    assert reasons_stored(bridge, 2) == ["all_human_codes", "human_code"]


@limits(rate_client_per_second=SLOW, rate_client_burst=4, rate_device_per_second=SLOW, rate_device_burst=2)
def test_token_refreshes_are_limited_per_device_id_and_per_client_id(bridge: Bridge) -> None:
    def refresh(device: Device, device_id: str) -> ClaimError:
        request = build_token_refresh(device_id, b"\0" * 32, f"r-{uuid.uuid4().hex}", int(time.time()))
        device.conn.publish(topics.token_topic(bridge.prefix, device.client_id), to_json(request))
        return ClaimError.model_validate_json(device.conn.next_message()[1])

    with Device(bridge) as forger:
        victim = "dev_" + "a" * 26
        assert [refresh(forger, victim).code for _ in range(2)] == [ErrorCode.PERMISSION_DENIED] * 2
        rate_limited(refresh(forger, victim))  # the device id's budget: 2
        assert refresh(forger, "dev_" + "b" * 26).code is ErrorCode.PERMISSION_DENIED
        rate_limited(refresh(forger, "dev_" + "c" * 26))  # the client id's budget: 4, refusals included
    # The client-id refusal's event is stored by the worker after the edge answered: wait for it.
    assert wait_for(lambda: len(limited_events(bridge, "token.refresh_rate_limited")) >= 2)
    reasons = sorted(e["reason"] for e in limited_events(bridge, "token.refresh_rate_limited"))
    assert reasons == ["client_id", "device"]


@pytest.fixture(params=[EMBEDDED, DYNSEC], ids=["embedded", "mosquitto"])
def either_bridge(
    initialised: tuple[Settings, str], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bridge]:
    """The embedded broker with the in-process edge, or Mosquitto with the paho edge."""
    with bridge_on(request.param, initialised, monkeypatch) as running:
        yield running


@limits(rate_client_per_second=SLOW, rate_client_burst=3)
def test_a_client_beyond_its_limit_is_answered_at_the_edge_while_the_claim_worker_is_stuck(
    either_bridge: Bridge,
) -> None:
    """The client-id limit is applied before a message is queued for the claim worker (`BridgeCore.screen`)."""
    bridge = either_bridge
    writer_lock = bridge.settings.database_file.with_name(bridge.settings.database_file.name + "-writer.lock")
    with Device(bridge) as stuck, Device(bridge) as attacker:
        with locked(writer_lock):  # another writer holds the database: the worker's first write waits for it
            stuck.conn.publish(
                topics.claim_topic(bridge.prefix, stuck.client_id), stuck.claim_payload(bridge.provision_key)
            )
            attack = topics.claim_topic(bridge.prefix, attacker.client_id)
            for _ in range(6):  # 3 within the budget (they queue behind the stuck claim), 3 beyond it
                attacker.conn.publish(attack, attacker.claim_payload(guessed_key()))
            beyond = [ClaimError.model_validate_json(attacker.conn.next_message()[1]) for _ in range(3)]
            assert [rate_limited(a).code for a in beyond] == [ErrorCode.RATE_LIMITED] * 3
            assert stuck.conn.messages.empty()  # answered while the worker is still stuck: not queued behind it
        assert isinstance(ClaimOk.model_validate_json(stuck.conn.next_message()[1]), ClaimOk)
        within = [json.loads(attacker.conn.next_message()[1])["code"] for _ in range(3)]
        assert within == ["permission_denied"] * 3
    assert bridge.store.count("devices") == 1
    # The edge's refusal event, stored by the worker once it is free (queued behind the claims it had).
    assert wait_for(lambda: len(limited_events(bridge)) > 0)
    (event,) = limited_events(bridge)
    assert event["reason"] == "client_id" and event["client_id"] == attacker.client_id


def test_the_edge_tracks_at_most_its_cap_of_client_ids_whatever_the_flood(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    claims = settings.claims.model_copy(update={"rate_limits": True, "rate_max_keys": 100, "rate_client_burst": 1})
    core = BridgeCore(settings.model_copy(update={"claims": claims}))
    for i in range(20_000):  # 20,000 fresh client ids, each beyond its budget of one, all in the same second
        topic = topics.claim_topic(settings.topic_prefix, f"fresh-{i}")
        assert core.screen(topic, b"{}", now=1_000.0) is None
        assert core.screen(topic, b"{}", now=1_000.0) is not None
        assert len(core.client_limit) <= 100


# --- floods ------------------------------------------------------------------------------


def _claim_latency(bridge: Bridge, n: int) -> list[float]:
    """Seconds from publish to answer of `n` legitimate claims, each from its own client id."""
    latencies = []
    for _ in range(n):
        with Device(bridge) as device:
            payload = device.claim_payload(bridge.provision_key)
            start = time.perf_counter()
            answer = json.loads(device.send(payload))
            while answer.get("code") == "rate_limited":  # the in-flight bound, not a rate limit: retry as told
                answer = json.loads(device.send(payload))
            latencies.append(time.perf_counter() - start)
            assert answer["status"] == "ok", answer
    return latencies


def _summary(latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"n={len(ms)} p50={statistics.median(ms):.1f} ms p99={p99:.1f} ms max={ms[-1]:.1f} ms"


def test_ten_thousand_guessed_keys_from_one_client_id_get_nowhere(bridge: Bridge) -> None:
    idle = _claim_latency(bridge, 30)
    guesses = 10_000
    with Device(bridge) as attacker:
        topic = topics.claim_topic(bridge.prefix, attacker.client_id)
        payloads = [attacker.claim_payload(guessed_key()) for _ in range(guesses)]
        flood_start = time.perf_counter()
        # All handed to paho at once: it sends them as fast as the broker reads them.
        infos = [attacker.conn.client.publish(topic, p, 1) for p in payloads]
        during = _claim_latency(bridge, 30)
        codes = Counter(json.loads(attacker.conn.next_message()[1])["code"] for _ in range(100))
        while not attacker.conn.messages.empty():
            codes[json.loads(attacker.conn.messages.get()[1])["code"]] += 1
        flood_seconds = time.perf_counter() - flood_start
    # The connection ends with most of the flood still in the attacker's own buffers: after its first
    # refusal, the broker read it no faster than its budget refills (`rate_client_pause_seconds`).
    read = sum(info.is_published() for info in infos)
    assert sum(codes.values()) < guesses and read < guesses
    # Denied guesses: the burst (10) plus 5/s while the flood lasts; the rest never reach the key lookup.
    assert set(codes) <= {"permission_denied", "rate_limited"} and codes["rate_limited"] > 0, codes
    assert bridge.store.count("devices") == 60  # the legitimate ones only
    assert 1 <= len(limited_events(bridge)) <= 2 + flood_seconds / 60  # one a minute, not one a refusal
    print(f"\nflood: {guesses} guesses queued; in {flood_seconds:.1f} s the broker took {read}: {dict(codes)}")
    print(f"legitimate claim latency idle:         {_summary(idle)}")
    print(f"legitimate claim latency during flood: {_summary(during)}")


@limits(rate_client_per_second=SLOW, rate_client_burst=2, rate_client_pause_seconds=5.0)
def test_the_embedded_broker_stops_reading_a_client_beyond_its_limit(bridge: Bridge) -> None:
    """Backpressure: after a refusal the flooder's next message waits in its own buffers, not in front of others."""
    with Device(bridge) as attacker, Device(bridge) as device:
        for expected in ("permission_denied", "permission_denied", "rate_limited"):
            assert json.loads(attacker.send(attacker.claim_payload(guessed_key())))["code"] == expected
        # Not waited for: the broker will not read it (nor acknowledge it) for up to 5 s.
        attacker.conn.client.publish(topics.claim_topic(bridge.prefix, attacker.client_id), b"{}", 1)
        assert isinstance(device.claim(bridge.provision_key), ClaimOk)  # published after it, answered first
        assert attacker.conn.messages.empty()
        assert json.loads(attacker.conn.next_message()[1])["code"] == "rate_limited"  # read once the pause is over


def _rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # a child that ended meanwhile holds no memory
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _bridge_rss_kib() -> int:
    """This process (the embedded broker and edge) plus its children (the claim worker)."""
    me = os.getpid()
    children = []
    for task in Path(f"/proc/{me}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended between the listing and the read
            children += [int(pid) for pid in (task / "children").read_text().split()]
    return _rss_kib(me) + sum(_rss_kib(pid) for pid in children)


def _flood_from_fresh_client(port: int, topic_of: Any, per_client: int, payload: bytes) -> None:
    """A bare MQTT client that connects with a fresh id, publishes QoS 0 and leaves without reading answers."""
    client_id = f"flood-{uuid.uuid4().hex[:16]}"
    connect = connect_packet(client_id, keepalive=60)
    publish = packet(0x30, mqtt_string(topic_of(client_id).encode()) + payload)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(connect)
        assert s.recv(4)[:1] == b"\x20"  # CONNACK
        s.sendall(publish * per_client + packet(0xE0, b""))


@limits(rate_max_keys=100)
def test_invalid_claims_from_many_fresh_client_ids_keep_memory_and_events_bounded(bridge: Bridge) -> None:
    clients, per_client = 2_000, 10
    before = _bridge_rss_kib()
    events_before = bridge.store.count("events")

    def topic_of(client_id: str) -> str:
        return topics.claim_topic(bridge.prefix, client_id)

    for _ in range(clients):
        _flood_from_fresh_client(bridge.port, topic_of, per_client, b'{"request_id":"junk-junk","x":1}')
    with Device(bridge) as last:  # answered after the flood: the worker has taken every claim before it
        assert isinstance(last.claim(bridge.provision_key), ClaimOk)
    after = _bridge_rss_kib()
    rows = bridge.store.count("events") - events_before
    print(
        f"\n{clients * per_client} invalid claims from {clients} fresh client ids: bridge RSS {before} -> {after} KiB"
    )
    print(f"event rows added: {rows} (the claims' validation errors are sampled by claims.rate_events_*)")
    assert rows < clients  # not one per claim, nor one per client id


def test_the_limiter_tracks_at_most_its_cap_of_keys_whatever_the_flood(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    claims = settings.claims.model_copy(update={"rate_limits": True, "rate_max_keys": 100})
    settings = settings.model_copy(update={"claims": claims})
    admin.init_data_dir(settings)
    store = Store(settings.database)
    try:
        provisioner = Provisioner(settings, store, keyfiles.load_keys(settings.data_dir))
        events_before = store.count("events")
        for i in range(20_000):  # 20,000 fresh client ids, one junk claim each, all in the same second
            topic = topics.claim_topic(settings.topic_prefix, f"fresh-{i}")
            provisioner.handle(topic, b'{"request_id":"junk-junk"}', now=1_000.0)
            assert provisioner.limits.tracked() <= 5 * 100 + 1
        assert store.count("events") <= events_before + settings.claims.rate_events_burst
    finally:
        store.close()


def _oversized(kind: str) -> bytes:
    """Packets over the default bound (20,480 bytes) that stock amqtt reads whole."""
    if kind == "publish announcing 100 MB":  # read into memory in one piece, before the ACL check
        return b"\x30" + remaining_length(100 * 1024 * 1024) + mqtt_string(b"x/y") + b"x" * 4096
    if kind == "publish of 38 kB in two reads":  # a topic and a payload, each under the bound
        return packet(0x30, mqtt_string(b"a/" + b"b" * 19_000) + b"x" * 19_000)
    # 50,000 filters of 4 bytes, read as many small reads; its SUBACK costs amqtt quadratic time
    return packet(0x82, (1).to_bytes(2, "big") + (mqtt_string(b"a") + b"\x00") * 50_000)


def _until_closed(s: socket.socket) -> bytes:
    """What the broker sends before it closes the connection (aborted with data unread: a reset)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize("kind", ["publish announcing 100 MB", "publish of 38 kB in two reads", "subscribe of 200 kB"])
def test_the_embedded_broker_closes_a_connection_announcing_a_packet_over_its_bound(bridge: Bridge, kind: str) -> None:
    """Nothing of the packet is acted on, nor anything sent after it on that connection."""
    with Device(bridge) as device:
        smuggled = packet(
            0x30,
            mqtt_string(topics.claim_topic(bridge.prefix, device.client_id).encode())
            + device.claim_payload(bridge.provision_key),
        )
        client_id = device.client_id
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=30) as s:
        # An anonymous provisioning client, accepted, then the oversized packet, a claim and a PINGREQ.
        s.sendall(connect_packet(client_id, keepalive=60))
        assert s.recv(4)[:1] == b"\x20"
        s.sendall(_oversized(kind) + smuggled + packet(0xC0, b""))
        assert _until_closed(s) == b""  # closed by the broker: no SUBACK, no PINGRESP
    with Device(bridge) as device:  # the largest claim the bridge takes still passes the broker
        answer = json.loads(device.send(b'{"pad":"' + b"x" * (MAX_CLAIM_BYTES - 11) + b'"}'))
        assert answer["code"] == "validation_error"
        assert isinstance(device.claim(bridge.provision_key), ClaimOk)
    assert bridge.store.count("devices") == 1  # the claim sent after the oversized packet was never read


def test_a_shorter_pause_never_cuts_an_earlier_longer_one() -> None:
    async def resume_times() -> tuple[float, float]:
        reader = PacketReader(StreamReaderAdapter(asyncio.StreamReader()), None, None)  # type: ignore[arg-type]
        reader.pause(10.0)
        first = reader.resume_at
        reader.pause(0.1)  # a later refusal whose client has a token sooner
        return first, reader.resume_at

    first, after = asyncio.run(resume_times())
    assert after == first
