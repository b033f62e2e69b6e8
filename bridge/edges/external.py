"""The bridge on an external broker (Mosquitto) when nothing is mirrored into it: one paho connection
driven by this process's event loop, claim work in a claim-worker process.

The split is the embedded mode's (`bridge.edges.inprocess`): this process only moves bytes (paho's
reads and writes run from the event loop's socket callbacks, no network thread), the blocking handlers
(SQLite, crypto) run in the claim worker (`bridge.edges.workerlink`). On threads they would share one
GIL with paho and hand it over at every SQLite call and syscall; measured on the threaded edge
(`bridge.edges.paho`, still used when tokens are mirrored into dynamic security), that hand-off and
the publishing from worker threads cost more CPU than the claim itself.

What a device sees is unchanged: a claim is acknowledged (QoS 1 PUBACK) only after its answer has been
handed to paho, so a claim the bridge accepted is never lost to a crash (the broker redelivers it, the
stored answer is replayed); MQTT 5 Response Topic and Correlation Data are honoured as before; with
several bridge processes (`bridge.edges.sessions.Shard`) each has its own client id and persistent
session on shared subscriptions, and only process 0 publishes the retained status and has it as its will.
"""

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import Settings
from bridge.edges.core import BridgeCore, Publish
from bridge.edges.sessions import Shard, bridge_client
from bridge.edges.workerlink import WorkerLink
from bridge.tls.certificates import bridge_endpoint
from provwire import topics

log = logging.getLogger("provbridge.service")

# MQTT 5: how long the broker keeps the bridge's session (and the claims queued in it) while it is away.
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
RECONNECT_DELAY_SECONDS = (1.0, 10.0)  # first and longest wait between reconnection attempts
MISC_INTERVAL_SECONDS = 1.0  # paho's keepalive and retry bookkeeping (`loop_misc`)
OFFLINE_PUBLISH_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class _Request:
    """A message handed to the claim worker: what its answer needs once it is back."""

    topic: str
    mid: int
    qos: int
    reply_to: str | None = None  # MQTT 5 Response Topic of the request, vetted
    correlation: bytes | None = field(default=None, repr=False)  # MQTT 5 Correlation Data, echoed


class ExternalBridge:
    def __init__(self, settings: Settings, shard: Shard | None = None) -> None:
        self.settings = settings
        self.core = BridgeCore(settings)
        self.shard = shard or Shard()
        self.worker = WorkerLink(settings, self._answered)
        self.endpoint = bridge_endpoint(settings)  # TLS or not, which port, which CA: bridge/tls/certificates.py
        self._requests: dict[int, _Request] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._misc: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._serving = asyncio.Event()
        self._stopping = False

        client = bridge_client(settings, self.shard.client_id(settings), persistent=True, manual_ack=True)
        if self.shard.owns_status:
            offline = self.core.status(online=False)
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
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        self._client = client

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the claim worker, then connect (retried in the background until the broker answers)."""
        self._loop = asyncio.get_running_loop()
        await self.worker.start()
        self._misc = self._loop.create_task(self._misc_loop())
        await self._connect()

    async def wait_serving(self, timeout: float) -> bool:
        """True once the broker confirmed the bridge's subscriptions (claims are taken from then on)."""
        try:
            await asyncio.wait_for(self._serving.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop taking claims, let the worker answer those it has, say offline, disconnect."""
        self._stopping = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        await self.worker.stop()
        if self._serving.is_set() and self.shard.owns_status:
            info = self._publish(self.core.status(online=False))
            deadline = asyncio.get_running_loop().time() + OFFLINE_PUBLISH_TIMEOUT_SECONDS
            while not info.is_published() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        self._client.disconnect()
        if self._misc is not None:
            self._misc.cancel()
            await asyncio.gather(self._misc, return_exceptions=True)

    async def _connect(self) -> None:
        broker = self.settings.broker
        try:
            if broker.protocol == "5":
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
                properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
                self._client.connect(
                    self.endpoint.host, self.endpoint.port, broker.keepalive, clean_start=False, properties=properties
                )
            else:
                self._client.connect(self.endpoint.host, self.endpoint.port, keepalive=broker.keepalive)
        except (OSError, ValueError) as exc:
            log.warning("cannot reach the broker at %s:%s (%s); retrying", self.endpoint.host, self.endpoint.port, exc)
            self._reconnect_later()

    def _reconnect_later(self) -> None:
        if self._stopping or self._loop is None or (self._reconnecting is not None and not self._reconnecting.done()):
            return
        self._reconnecting = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay, longest = RECONNECT_DELAY_SECONDS
        while not self._stopping and not self._client.is_connected():
            await asyncio.sleep(delay)
            delay = min(longest, delay * 2)
            try:
                self._client.reconnect()
                return
            except (OSError, ValueError) as exc:
                log.warning("reconnecting to the broker failed (%s); retrying", exc)

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL_SECONDS)
            if self._client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                self._reconnect_later()

    # --- paho's socket, on the event loop ----------------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            # Without it, small request/answer exchanges stall 40-90 ms on Nagle + delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self._loop is not None
        self._loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    # --- paho callbacks (event loop: no blocking work here) ----------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the bridge: %s", reason)
            return
        filters = [self.shard.subscription(self.settings, f) for f in self.core.filters]
        client.subscribe([(topic_filter, 1) for topic_filter in filters])
        if self.shard.owns_status:
            self._publish(self.core.status(online=True))
        log.info("connected to broker %s:%s", self.endpoint.host, self.endpoint.port)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        # Ready only once the broker confirmed every subscription: a claim sent before that would be lost.
        refused = [code for code in codes if code.is_failure]
        if refused:
            log.error("broker refused the bridge's subscriptions (%s): not taking claims", refused)
            return
        self._serving.set()
        log.info("bridge subscriptions confirmed: taking claims")

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._serving.clear()
        if not self._stopping:
            log.warning("disconnected from broker (%s); reconnecting", reason)
            self._reconnect_later()

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if self._stopping:
            return  # not acknowledged: the broker keeps it for our next session
        properties = getattr(message, "properties", None)
        reply_to = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        topic, payload = message.topic, bytes(message.payload)
        request = _Request(
            topic,
            message.mid,
            message.qos,
            reply_to if self.core.is_reply_topic(reply_to, topic) else None,
            bytes(correlation) if isinstance(correlation, bytes | bytearray) else None,
        )
        refused = self.core.screen(topic, payload)
        if refused is not None:  # an external broker cannot be asked to slow the client down: answer only
            self._answer(request, self.core.publishes(refused.outcome))
            self.worker.record_events(refused.outcome.events)
        elif self.core.admit():
            self._requests[self.worker.submit(topic, payload)] = request
        else:
            self._answer(request, self.core.publishes(self.core.overloaded(topic, payload)))

    # --- answers -----------------------------------------------------------------------------

    def _answered(self, seq: int, publishes: list[Publish]) -> None:
        request = self._requests.pop(seq)
        try:
            self._answer(request, publishes)
        finally:
            self.core.release()

    def _answer(self, request: _Request, publishes: list[Publish]) -> None:
        """Hand the answer and its events to paho, then acknowledge the request."""
        try:
            for publish in _routed(self.core, request, publishes):
                self._publish(publish)
        except Exception:  # a failed hand-over must not take the edge down
            log.exception("answer to %s could not be sent", request.topic)
        finally:
            if request.qos > 0:
                self._client.ack(request.mid, request.qos)

    def _publish(self, publish: Publish) -> mqtt.MQTTMessageInfo:
        properties = None
        if publish.correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = publish.correlation  # echoed, so the device can match the answer
        return self._client.publish(publish.topic, publish.payload, qos=1, retain=publish.retain, properties=properties)


def _routed(core: BridgeCore, request: _Request, publishes: list[Publish]) -> list[Publish]:
    """`publishes` with the answer sent where an MQTT 5 request asked (its vetted Response Topic), with its
    Correlation Data. The worker computed them without knowing either."""
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
