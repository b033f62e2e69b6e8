"""What both edges on an external broker share: the bridge's paho client, its callbacks, and how an
answer goes out.

`bridge.edges.external` drives it from the event loop with the claim work in a worker process (the
default); `bridge.edges.paho` from paho's network thread with worker threads beside the
dynamic-security mirror (the small-fleet opt-in). They differ in where a taken message goes
(`_dispatch`) and where the events made here are stored (`_record_events`).

A claim is acknowledged (QoS 1 PUBACK) only after its answer has been handed to paho, so a claim the
bridge accepted is never lost to a crash: the broker redelivers it and the stored answer is replayed.
With several bridge processes (`bridge.edges.sessions.Shard`) each has its own client id and persistent
session on shared subscriptions; only process 0 publishes the retained status and has it as its will.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import Settings
from bridge.edges.core import BridgeCore, Publish
from bridge.edges.presence import PresenceRecorder
from bridge.edges.sessions import Shard, bridge_client
from bridge.metrics import counters
from bridge.tls.certificates import bridge_endpoint
from provwire import topics
from provwire.models import Event

log = logging.getLogger("provbridge.service")

# MQTT 5: how long the broker keeps the bridge's session (and the claims queued in it) while it is away.
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Request:
    """A message taken from the broker: what acknowledging and answering it needs."""

    topic: str
    payload: bytes = field(repr=False)  # a claim carries a provisioning key
    mid: int
    qos: int
    reply_to: str | None = None  # MQTT 5 Response Topic of the request, vetted
    correlation: bytes | None = field(default=None, repr=False)  # MQTT 5 Correlation Data, echoed
    connection: int = 0  # which of the edge's connections it came on: its `mid` means nothing on another


class PahoEdge:
    client_class: type[mqtt.Client] = mqtt.Client  # the event-loop edge's writes are coalesced

    def __init__(self, core: BridgeCore, shard: Shard | None = None) -> None:
        self.core = core
        self.settings: Settings = core.settings
        self.shard = shard or Shard()
        self.endpoint = bridge_endpoint(self.settings)  # TLS or not, which port, which CA: bridge/tls/certificates.py
        self._serving = threading.Event()  # the broker confirmed every subscription
        self._connection = 0  # counts the broker's CONNACKs: a message id is only valid on its own connection
        self._stopping = threading.Event()
        # Exact topic -> handler run where paho's callbacks run (must not block): dynamic-security answers.
        self.network_routes: dict[str, Callable[[bytes], None]] = {}
        # Device connections, as the provbridge_jwt plugin publishes them (None: not taken, as in dynsec mode).
        self.presence: PresenceRecorder | None = None

        client_id = self.shard.client_id(self.settings)
        client = bridge_client(
            self.settings, client_id, persistent=True, client_class=self.client_class, manual_ack=True
        )
        if self.shard.owns_status(self.settings):
            offline = core.status(online=False)
            client.will_set(offline.topic, offline.payload, 1, retain=True)
        # No paho limit on our own publishes in flight: with one, paho walks every unacknowledged message
        # at each PUBACK (measured: 190-250 µs of CPU per claim at 256, 100-140 µs without). The core's
        # `claims.max_in_flight` bounds what is taken, so the answers in flight are bounded too.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    @property
    def client(self) -> mqtt.Client:
        """The bridge's connection, for what must travel on it (the dynamic-security mirror)."""
        return self._client

    def _connect_arguments(self) -> dict[str, Any]:
        """`connect` / `connect_async` keywords: the broker, and with MQTT 5 a session that outlives us."""
        broker = self.settings.broker
        options: dict[str, Any] = {
            "host": self.endpoint.host,
            "port": self.endpoint.port,
            "keepalive": broker.keepalive,
        }
        if broker.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
            properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
            options |= {"clean_start": False, "properties": properties}
        return options

    # --- what differs between the edges ---------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        """Hand an admitted message to the claim work; `_answer` it (and `core.release`) once done."""
        raise NotImplementedError

    def _record_events(self, events: list[Event]) -> None:
        """Store events made here (a refusal by the client-id limit), away from the network side."""
        raise NotImplementedError

    # --- paho callbacks (no blocking work here) --------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the bridge: %s", reason)
            return
        self._connection += 1
        taken = list(self.core.filters)
        if self.presence is not None:
            taken.append(topics.presence_subscription(self.settings.topic_prefix))
        filters = [self.shard.subscription(self.settings, f) for f in taken] + list(self.network_routes)
        # What an earlier layout may have left in this persistent session (plain subscriptions before they were
        # shared, or shared ones before they were plain) would deliver every claim a second time: it goes.
        shared = [f"{topics.SHARED_PREFIX}/{self.settings.broker.share_group}/{f}" for f in taken]
        stale = [f for f in [*taken, *shared] if f not in filters]
        client.unsubscribe(stale)
        client.subscribe([(topic_filter, 1) for topic_filter in filters])
        if self.shard.owns_status(self.settings):
            self._publish(self.core.status(online=True))
        log.info("connected to broker %s:%s", self.endpoint.host, self.endpoint.port)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        # Ready only once the broker confirmed every subscription: a claim sent before that would be lost.
        refused = [code for code in codes if code.is_failure]
        if refused:
            log.error("broker refused the bridge's subscriptions (%s): not taking claims", refused)
            return
        self._serving.set()
        # Connected, as /readyz and the gauge mean it, once claims are taken: a broker that refused the
        # subscriptions accepts the connection and yet no claim would be answered.
        counters.BROKER_CONNECTED.set(1)
        log.info("bridge subscriptions confirmed: taking claims")

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._serving.clear()
        counters.BROKER_CONNECTED.set(0)
        if not self._stopping.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if self.presence is not None and self._presence(message):
            if message.qos > 0:
                client.ack(message.mid, message.qos)
            return
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
        request = Request(
            message.topic,
            bytes(message.payload),
            message.mid,
            message.qos,
            reply_to if self.core.is_reply_topic(reply_to, message.topic) else None,
            bytes(correlation) if isinstance(correlation, bytes | bytearray) else None,
            self._connection,
        )
        refused = self.core.screen(request.topic, request.payload)
        if refused is not None:  # an external broker cannot be asked to slow the client down: answer only
            self._answer(request, self.core.publishes(refused.outcome))
            if refused.outcome.events:
                self._record_events(refused.outcome.events)
        elif self.core.admit():
            self._dispatch(request)
        else:
            self._answer(request, self.core.publishes(self.core.overloaded(request.topic, request.payload)))

    def _presence(self, message: mqtt.MQTTMessage) -> bool:
        """Whether `message` is a device's presence (then recorded); only the broker's plugin publishes there."""
        assert self.presence is not None
        device_id = topics.device_id_of_presence_topic(self.settings.topic_prefix, message.topic)
        if device_id is None:
            return False
        if message.payload in (topics.PRESENCE_ONLINE, topics.PRESENCE_OFFLINE):
            self.presence.record(device_id, message.payload == topics.PRESENCE_ONLINE)
        return True

    # --- answers ---------------------------------------------------------------------------------

    def _answer(self, request: Request, publishes: list[Publish]) -> None:
        """Hand the answer and its events to paho, then acknowledge the request."""
        try:
            for publish in routed(self.core, request, publishes):
                self._publish(publish)
        except Exception:  # a failed hand-over must not take the edge down
            log.exception("answer to %s could not be sent", request.topic)
        finally:
            # A message taken on an earlier connection is not acknowledged on this one, where its id may
            # already name another message: the broker redelivers it, and its stored answer is replayed.
            if request.qos > 0 and request.connection == self._connection:
                self._client.ack(request.mid, request.qos)

    def _publish(self, publish: Publish) -> mqtt.MQTTMessageInfo:
        properties = None
        if publish.correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = publish.correlation  # echoed, so the device can match the answer
        return self._client.publish(publish.topic, publish.payload, qos=1, retain=publish.retain, properties=properties)


def routed(core: BridgeCore, request: Request, publishes: list[Publish]) -> list[Publish]:
    """`publishes` with the answer sent where an MQTT 5 request asked (its vetted Response Topic), with its
    Correlation Data. The claim work computes them without knowing either."""
    if request.reply_to is None and request.correlation is None:
        return publishes
    client_id = topics.client_id_of_claim_topic(core.prefix, request.topic) or topics.client_id_of_token_topic(
        core.prefix, request.topic
    )
    if client_id is None:
        return publishes
    default = topics.response_topic(core.prefix, client_id)
    return [
        Publish(request.reply_to or p.topic, p.payload, p.retain, request.correlation) if p.topic == default else p
        for p in publishes
    ]
