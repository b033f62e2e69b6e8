"""The MQTT edge of the bridge: receives claims, hands them to workers, publishes answers.

paho runs its callbacks on one network thread, so `on_message` only queues; workers do the
crypto and the database. Claims are acknowledged (QoS 1 PUBACK) only after their answer has been
handed to the client, so a claim the bridge accepted is never lost to a crash: the broker
redelivers it and the stored answer is replayed.
"""

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import Settings
from bridge.provisioning import Outcome, Provisioner, readable_request_id
from bridge.refresh import Refresher
from bridge.tls import bridge_endpoint
from provwire import topics
from provwire.errors import ErrorCode
from provwire.models import BridgeStatus, ClaimError, to_json

log = logging.getLogger("provbridge.service")

PURGE_INTERVAL_SECONDS = 600.0
# MQTT 5: how long the broker keeps the bridge's session (and the claims queued in it) while it is away.
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class _Work:
    topic: str
    payload: bytes
    mid: int
    qos: int
    reply_to: str | None = None  # MQTT 5 Response Topic of the request
    correlation: bytes | None = None  # MQTT 5 Correlation Data, echoed in the answer


def set_nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # Without it, small request/answer exchanges stall 40-90 ms on Nagle + delayed ACK.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BridgeService:
    def __init__(self, settings: Settings, provisioner: Provisioner, password: str) -> None:
        self.settings = settings
        self.provisioner = provisioner
        self.prefix = settings.topic_prefix
        self._queue: queue.Queue[_Work | None] = queue.Queue(maxsize=settings.claims.max_in_flight)
        self._workers: list[threading.Thread] = []
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self.answered = 0
        # Topic filter -> handler, run on a worker thread. Refreshes share the claims' keys and mirror.
        self.refresher = Refresher(settings, provisioner.store, provisioner.keys, provisioner.mirror)
        self.routes: dict[str, Callable[[str, bytes], Outcome]] = {
            topics.claim_subscription(self.prefix): provisioner.handle,
            topics.token_subscription(self.prefix): self.refresher.handle,
        }
        # Exact topic -> handler run on the network thread (must not block): dynamic-security answers.
        self.network_routes: dict[str, Callable[[bytes], None]] = {}

        broker = settings.broker
        # Claims published while we are away wait for us: clean_session False (3.1.1), or clean_start
        # False with a session expiry at connect (5).
        session: dict[str, Any] = (
            {"protocol": mqtt.MQTTv5} if broker.protocol == "5" else {"protocol": mqtt.MQTTv311, "clean_session": False}
        )
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=broker.client_id, manual_ack=True, **session)
        client.username_pw_set(broker.username, password)
        client.will_set(topics.status_topic(self.prefix), to_json(BridgeStatus(status="offline")), 1, retain=True)
        self.endpoint = bridge_endpoint(settings)  # TLS or not, which port, which CA: see bridge/tls.py
        if self.endpoint.tls:
            ca_file = self.endpoint.ca_file
            client.tls_set(ca_certs=str(ca_file) if ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.max_inflight_messages_set(256)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_socket_open = set_nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.settings.claims.workers):
            worker = threading.Thread(target=self._work, name=f"claim-worker-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        threading.Thread(target=self._purge_loop, name="answer-purge", daemon=True).start()
        broker = self.settings.broker
        if broker.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
            properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
            self._client.connect_async(
                self.endpoint.host, self.endpoint.port, broker.keepalive, clean_start=False, properties=properties
            )
        else:
            self._client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=broker.keepalive)
        self._client.loop_start()

    @property
    def client(self) -> mqtt.Client:
        """The bridge's connection, for what must travel on it (the dynamic-security mirror)."""
        return self._client

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking claims, finish those queued, say offline, disconnect."""
        self._stopping.set()
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._connected.is_set():
            info = self._client.publish(
                topics.status_topic(self.prefix), to_json(BridgeStatus(status="offline")), 1, retain=True
            )
            info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()

    # --- paho callbacks (network thread: no blocking work here) ----------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the bridge: %s", reason)
            return
        client.subscribe([(topic_filter, 1) for topic_filter in [*self.routes, *self.network_routes]])
        client.publish(topics.status_topic(self.prefix), to_json(BridgeStatus(status="online")), 1, retain=True)
        self._connected.set()
        log.info("connected to broker %s:%s", self.endpoint.host, self.endpoint.port)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        direct = self.network_routes.get(message.topic)
        if direct is not None:
            direct(bytes(message.payload))
            if message.qos > 0:
                client.ack(message.mid, message.qos)
            return
        if self._stopping.is_set():
            return  # not acknowledged: the broker keeps it for our next session
        properties = getattr(message, "properties", None)
        reply_to = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        work = _Work(
            message.topic,
            bytes(message.payload),
            message.mid,
            message.qos,
            reply_to if self._is_reply_topic(reply_to) else None,
            bytes(correlation) if isinstance(correlation, bytes | bytearray) else None,
        )
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            self._publish(self._overloaded(work.topic, work.payload), work)
            self._ack(work)

    def _is_reply_topic(self, topic: object) -> bool:
        """An MQTT 5 Response Topic is honoured only when it is a response topic, `{prefix}/res/<id>`.

        The bridge account may also write events and status: a claim must not make it publish there.
        """
        head = topics.response_topic(self.prefix, "")
        return isinstance(topic, str) and topic.startswith(head) and topics.is_valid_client_id(topic[len(head) :])

    # --- workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                outcome = self._route(work.topic)(work.topic, work.payload)
                self._publish(outcome, work)
                log.info("claim on %s: %s", work.topic, outcome.summary)
            except Exception:  # the bridge must survive anything a claim can do
                log.exception("claim on %s could not be handled", work.topic)
            finally:
                self._ack(work)

    def _route(self, topic: str) -> Callable[[str, bytes], Outcome]:
        for topic_filter, handler in self.routes.items():
            if topics.topic_matches(topic_filter, topic):
                return handler
        return self.provisioner.handle  # cannot happen: we subscribe to the routes only

    def _publish(self, outcome: Outcome, work: _Work | None = None) -> None:
        if outcome.response_topic is not None and outcome.answer is not None:
            topic, properties = outcome.response_topic, None
            if work is not None and work.reply_to is not None:
                topic = work.reply_to  # MQTT 5 request/response: answer where the request asks
            if work is not None and work.correlation is not None:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.CorrelationData = work.correlation  # echoed, so the device can match the answer
            self._client.publish(topic, outcome.answer, qos=1, retain=False, properties=properties)
            self.answered += 1
        for event in outcome.events:
            topic = topics.event_topic(self.prefix, event.tenant, event.event)
            self._client.publish(topic, to_json(event), qos=1, retain=False)

    def _ack(self, work: _Work) -> None:
        if work.qos > 0:
            self._client.ack(work.mid, work.qos)

    def _overloaded(self, topic: str, payload: bytes) -> Outcome:
        client_id = topics.client_id_of_claim_topic(self.prefix, topic) or topics.client_id_of_token_topic(
            self.prefix, topic
        )
        if client_id is None or not topics.is_valid_client_id(client_id):
            return Outcome(None, None, [], "dropped while overloaded")
        answer = ClaimError(
            request_id=readable_request_id(payload),
            code=ErrorCode.RATE_LIMITED,
            message="bridge is busy, retry later",
            retry_after=self.settings.claims.retry_after_seconds,
        )
        return Outcome(topics.response_topic(self.prefix, client_id), to_json(answer), [], "rate_limited")

    def _purge_loop(self) -> None:
        retention = self.settings.claims.response_retention_seconds
        while not self._stopping.wait(PURGE_INTERVAL_SECONDS):
            try:
                purged = self.provisioner.store.purge_answers(int(time.time()) - retention)
                if purged:
                    log.info("purged %d answers older than the retention window", purged)
            except Exception as exc:
                log.warning("answer purge failed: %s", exc)
