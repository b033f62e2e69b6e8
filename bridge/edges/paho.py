"""The paho edge of the bridge, for an external broker: receives claims, hands them to workers, publishes answers.

paho runs its callbacks on one network thread, so `on_message` only queues; workers do the
crypto and the database (`ClaimHandlers.handle`). Claims are acknowledged (QoS 1 PUBACK) only after
their answer has been handed to the client, so a claim the bridge accepted is never lost to a
crash: the broker redelivers it and the stored answer is replayed.

With several bridge processes (`bridge.edges.sessions.Shard`) each has its own client id and persistent
session on shared subscriptions; only process 0 publishes the retained status and has it as its will.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.claims.provisioning import Outcome
from bridge.edges.core import BridgeCore, ClaimHandlers, Publish
from bridge.edges.sessions import Shard, bridge_client
from bridge.tls.certificates import bridge_endpoint
from provwire.models import Event

log = logging.getLogger("provbridge.service")

# MQTT 5: how long the broker keeps the bridge's session (and the claims queued in it) while it is away.
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class _Work:
    topic: str
    payload: bytes = field(repr=False)  # a claim carries a provisioning key
    mid: int
    qos: int
    reply_to: str | None = None  # MQTT 5 Response Topic of the request, vetted
    correlation: bytes | None = None  # MQTT 5 Correlation Data, echoed in the answer


class BridgeService:
    def __init__(self, core: BridgeCore, handlers: ClaimHandlers, shard: Shard | None = None) -> None:
        self.core = core
        self.handlers = handlers
        self.settings = settings = core.settings
        self.shard = shard or Shard()
        # Unbounded: the core's in-flight bound decides what is refused, before anything is queued.
        self._queue: queue.Queue[_Work | list[Event] | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._connected = threading.Event()
        self._stopping = threading.Event()
        # Exact topic -> handler run on the network thread (must not block): dynamic-security answers.
        self.network_routes: dict[str, Callable[[bytes], None]] = {}

        client = bridge_client(settings, self.shard.client_id(settings), persistent=True, manual_ack=True)
        if self.shard.owns_status:
            offline = core.status(online=False)
            client.will_set(offline.topic, offline.payload, 1, retain=True)
        self.endpoint = bridge_endpoint(settings)  # TLS or not, which port, which CA: see bridge/tls/certificates.py
        client.max_inflight_messages_set(0)  # unbounded here, bounded by the core: see bridge/edges/external.py
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.settings.claims.workers):
            worker = threading.Thread(target=self._work, name=f"claim-worker-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.handlers.start_purge(self._stopping)
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
        if self._connected.is_set() and self.shard.owns_status:
            info = self._send(self.core.status(online=False))
            info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()

    # --- paho callbacks (network thread: no blocking work here) ----------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the bridge: %s", reason)
            return
        filters = [self.shard.subscription(self.settings, f) for f in self.core.filters] + list(self.network_routes)
        client.subscribe([(topic_filter, 1) for topic_filter in filters])
        if self.shard.owns_status:
            self._send(self.core.status(online=True))
        log.info("connected to broker %s:%s", self.endpoint.host, self.endpoint.port)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        # Ready only once the broker confirmed every subscription: a claim sent before that would be lost.
        refused = [code for code in codes if code.is_failure]
        if refused:
            log.error("broker refused the bridge's subscriptions (%s): not taking claims", refused)
            return
        self._connected.set()
        log.info("bridge subscriptions confirmed: taking claims")

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
            reply_to if self.core.is_reply_topic(reply_to, message.topic) else None,
            bytes(correlation) if isinstance(correlation, bytes | bytearray) else None,
        )
        refused = self.core.screen(work.topic, work.payload)
        if refused is not None:  # an external broker cannot be asked to slow the client down: answer only
            self._answer(work, refused.outcome, admitted=False)
            if refused.outcome.events:
                self._queue.put(refused.outcome.events)  # stored by a worker: no SQLite on the network thread
        elif self.core.admit():
            self._queue.put(work)
        else:
            self._answer(work, self.core.overloaded(work.topic, work.payload), admitted=False)

    # --- workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, list):
                self.handlers.record_events(item)
            else:
                self._answer(item, self.handlers.handle(item.topic, item.payload), admitted=True)

    def _answer(self, work: _Work, outcome: Outcome, admitted: bool) -> None:
        try:
            for publish in self.core.publishes(outcome, work.reply_to, work.correlation):
                self._send(publish)
        except Exception:  # a failed hand-over must not take the worker down
            log.exception("answer to %s could not be sent", work.topic)
        finally:
            if work.qos > 0:
                self._client.ack(work.mid, work.qos)
            if admitted:
                self.core.release()

    def _send(self, publish: Publish) -> mqtt.MQTTMessageInfo:
        properties = None
        if publish.correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = publish.correlation  # echoed, so the device can match the answer
        return self._client.publish(publish.topic, publish.payload, qos=1, retain=publish.retain, properties=properties)
