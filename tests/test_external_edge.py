"""The default edge for an external broker (`bridge.edges.external`): where Mosquitto 2.0.11 cannot be made
to behave as other brokers do (a broker that sends an MQTT 5 DISCONNECT), a raw TCP listener on 127.0.0.1
plays that broker, packet by packet; the claims this edge prepares itself are tested through Mosquitto here,
everything else about the edge in the Mosquitto suites."""

import asyncio
import contextlib
import os
import queue
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from bridge.claims.decision import ClaimRequest, Fresh
from bridge.claims.provisioning import Prepared
from bridge.config import Settings
from bridge.edges.claimworker import PREPARED, decode_prepared, encode_prepared, split_frames
from bridge.edges.external import ExternalBridge
from bridge.storage import keyfiles
from bridge.storage.store import Store
from bridge.tls import certificates as tls
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import Claim, ClaimError, ClaimOk, Hardware
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device, answer_of
from tests.helpers.mosquitto import external_settings, mosquitto_for
from tests.helpers.raw_mqtt import packet, read_packet
from tests.helpers.waiting import wait_for

CONNACK_V5 = packet(0x20, bytes([0, 0, 0]))  # no session present, success, no properties
DISCONNECT_SESSION_TAKEN_OVER = packet(0xE0, bytes([0x8E, 0]))


class OneShotBroker:
    """Accepts connections on a free loopback port; to each: CONNACK, SUBACK, then a DISCONNECT (session
    taken over). Counts the CONNECTs it got."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connects = 0
        self.reconnected = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):  # the edge hung up: wait for the next connection
                    self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        kind, _ = read_packet(conn)
        assert kind >> 4 == 1  # CONNECT
        self.connects += 1
        if self.connects > 1:
            self.reconnected.set()
        conn.sendall(CONNACK_V5)
        kind, body = read_packet(conn)
        while kind >> 4 != 8:  # the retained "online" status comes first: no PUBACK needed for this test
            kind, body = read_packet(conn)
        conn.sendall(packet(0x90, body[:2] + bytes([0, 1, 1])))  # SUBACK: its id, no properties, QoS 1 twice
        conn.sendall(DISCONNECT_SESSION_TAKEN_OVER)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def broker() -> Iterator[OneShotBroker]:
    running = OneShotBroker()
    yield running
    running.close()


def test_an_mqtt5_disconnect_from_the_broker_is_followed_by_a_reconnection(
    initialised: tuple[Settings, str], broker: OneShotBroker
) -> None:
    """paho closes its socket on a DISCONNECT yet keeps saying it is connected: the edge must look at the
    socket, not at that, or it never comes back."""
    settings = initialised[0]
    update = {"mode": "external", "port": broker.port, "protocol": "5", "tls_listen": "off", "dynsec": False}
    settings = settings.model_copy(update={"broker": settings.broker.model_copy(update=update)})

    async def run() -> bool:
        edge = ExternalBridge(settings)
        await edge.start()
        try:
            return await asyncio.to_thread(broker.reconnected.wait, 15)
        finally:
            await edge.stop()

    assert asyncio.run(run()), f"the edge did not reconnect ({broker.connects} CONNECT)"


# --- claims prepared at the edge, through Mosquitto ------------------------------------------------------
#
# On an external broker the edge's process prepares each claim (parse, flood limits, the ECDH) and hands the
# claim worker a `Prepared`; the worker is left the transaction. Real Mosquitto (jwt, the default), real
# SQLite held by a second connection to stop the worker inside a transaction, a real worker process.


@dataclass
class EdgeOnMosquitto(Bridge):
    edge: ExternalBridge
    loop: asyncio.AbstractEventLoop


@contextmanager
def edge_on_mosquitto(settings: Settings, first_key: str) -> Iterator[EdgeOnMosquitto]:
    """Mosquitto from the generated config, and an `ExternalBridge` (what `serve` runs) on a loop of its own."""
    settings = tls.resolve(external_settings(settings, mosquitto_auth="jwt"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="external-edge-test-loop", daemon=True)
    thread.start()
    with mosquitto_for(settings):
        edge = ExternalBridge(settings)
        asyncio.run_coroutine_threadsafe(edge.start(), loop).result(60)
        store = Store(settings.database)
        try:
            assert asyncio.run_coroutine_threadsafe(edge.wait_serving(30), loop).result(40)
            yield EdgeOnMosquitto(settings, store, keyfiles.load_keys(settings.data_dir), first_key, edge, loop)
        finally:
            store.close()
            asyncio.run_coroutine_threadsafe(edge.stop(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


@contextmanager
def database_held(settings: Settings) -> Iterator[None]:
    """Another connection holds SQLite's write lock: the claim worker waits in its next transaction."""
    blocker = sqlite3.connect(settings.database_file, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        blocker.rollback()
        blocker.close()


def prepared_in(data: bytes) -> Prepared:
    """The claim in a `P` frame the edge handed to its worker."""
    kind, body = next(split_frames(bytearray(data)))
    assert kind == PREPARED
    return decode_prepared(body)[2]


def test_a_malformed_claim_is_answered_by_the_edge_while_the_worker_waits_for_the_database(
    initialised: tuple[Settings, str], jwt_mode: None
) -> None:
    """Refusals that need no write (here a claim that is not valid) are answered from the edge's process:
    they do not queue behind claims waiting for the database. Their events are stored once it is free."""
    with edge_on_mosquitto(*initialised) as bridge, Device(bridge) as waiting, Device(bridge) as malformed:
        with database_held(bridge.settings):
            waiting.conn.publish(
                topics.claim_topic(bridge.prefix, waiting.client_id), waiting.claim_payload(bridge.provision_key)
            )
            assert wait_for(lambda: len(bridge.edge.pipeline.worker.pending) == 1)  # in the worker, which waits
            refused = answer_of(malformed.send(b'{"request_id": "r-malformed-1", "provision_key": 7}'))
            assert isinstance(refused, ClaimError) and refused.code is ErrorCode.VALIDATION_ERROR
            assert refused.request_id == "r-malformed-1"
            assert len(bridge.edge.pipeline.worker.pending) == 1  # the first claim still waits
        topic, answer = waiting.conn.next_message()
        assert topic == topics.response_topic(bridge.prefix, waiting.client_id)
        assert isinstance(answer_of(answer), ClaimOk)

        def stored_rejections() -> list[dict[str, object]]:
            return [e for e in bridge.store.events(event="claim.rejected") if e.get("request_id") == "r-malformed-1"]

        assert wait_for(lambda: len(stored_rejections()) == 1)
        assert stored_rejections()[0]["reason"] == "validation_error"
    assert bridge.store.count("devices") == 1


def test_claims_prepared_by_the_edge_are_answered_by_the_successor_of_a_worker_that_died(
    initialised: tuple[Settings, str], jwt_mode: None
) -> None:
    """A worker killed with prepared claims in it: the edge hands them to the next worker as they were (the
    same device ids and API keys drawn), and each is answered once."""
    with edge_on_mosquitto(*initialised) as bridge:
        devices = [Device(bridge) for _ in range(3)]
        for device in devices:
            device.__enter__()
        try:
            first_worker = bridge.edge.pipeline.worker.worker_pid
            assert first_worker is not None
            with database_held(bridge.settings):
                for device in devices:
                    payload = device.claim_payload(bridge.provision_key)
                    device.conn.publish(topics.claim_topic(bridge.prefix, device.client_id), payload)
                assert wait_for(lambda: len(bridge.edge.pipeline.worker.pending) == 3)
                drawn = {prepared_in(data).fresh.device_id for _, data in bridge.edge.pipeline.worker.pending.values()}
                os.kill(first_worker, signal.SIGKILL)
                assert wait_for(lambda: bridge.edge.pipeline.worker.worker_pid not in (None, first_worker))
            answers = [answer_of(device.conn.next_message()[1]) for device in devices]
            assert all(isinstance(answer, ClaimOk) for answer in answers), answers
            assert {answer.device_id for answer in answers if isinstance(answer, ClaimOk)} == drawn
            for device in devices:
                with pytest.raises(queue.Empty):  # answered once
                    device.conn.next_message(timeout=0.5)
        finally:
            for device in devices:
                device.__exit__(None, None, None)
    assert bridge.store.count("devices") == 3


def test_a_prepared_claim_crosses_to_the_worker_whole() -> None:
    """The frame that carries a `Prepared` (bridge.edges.claimworker) gives the worker the same claim,
    certificate request included (a parsed CSR cannot be pickled: it is read again on arrival)."""
    device = crypto.generate_private_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    der = csr.sign(device, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    public_key = crypto.b64encode(crypto.sec1(device.public_key()))
    claim = Claim(
        request_id="r-prepared-1",
        provision_key="pk_x",
        hardware_id="hw-1",
        public_key=public_key,
        csr=crypto.b64encode(der),
        hardware=Hardware(board_model="b", cpu_cores=2),
    )
    request = ClaimRequest("hw-1", claim, b"d" * 32, b"k" * 32, "0123456789abcdef", 1234.5)
    prepared = Prepared("prov/v1/res/hw-1", request, b"s" * 32, Fresh("dev_abc", "dk_secret"))
    kind, body = next(split_frames(bytearray(encode_prepared(7, "prov/v1/claim/hw-1", prepared))))
    assert kind == PREPARED
    seq, topic, received = decode_prepared(body)
    assert (seq, topic) == (7, "prov/v1/claim/hw-1")
    assert received == prepared
    assert received.request.claim.parsed_csr is not None
    assert received.request.claim.csr_public_key_sec1 == crypto.sec1(device.public_key())
    assert received.request.claim.public_key_sec1 == claim.public_key_sec1
