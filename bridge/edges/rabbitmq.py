"""The bridge on a RabbitMQ cluster (`broker.mode = "rabbitmq"`): claims taken over AMQP from a quorum queue, as
competing consumers, answered through the MQTT plugin's topic exchange.

Devices speak MQTT 3.1.1 to any node; the MQTT plugin publishes a claim to `amq.topic` with its topic written as
a routing key (bridge/rabbitmq_scopes.py), and the queue `rabbitmq.queue`, bound to the claim and token-refresh
topics, holds it, replicated over the cluster's nodes (a quorum queue). Every bridge process on every host
consumes from that one queue; RabbitMQ gives each claim to one of them at a time.

Nothing taken is lost: a claim is acknowledged only once the broker confirmed its answer (publisher confirms), so
a bridge that dies, or loses its connection, leaves its claims unacknowledged and RabbitMQ gives them to another
consumer. Such a claim may have been handled already: the request-id replay (PROTOCOL.md §8) answers it with the
stored answer, so each claim still makes one device and one effective answer. The claim work itself is the one
of the Mosquitto edge (`bridge.edges.pipeline`).

The bridge connects to one node at a time, `rabbitmq.amqp` in turn: when its node goes, it connects to the next.

Revocation: RabbitMQ checks the token alone, never a denylist. Process 0 ends the connections of every revoked or
deleted device every `rabbitmq.revoke_sweep_seconds` while its tokens may be valid (`bridge.rabbitmq.management`),
so a revoked device that reconnects with its token is cut off again within that time (docs/SECURITY.md).
"""

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue

from bridge.config import Settings
from bridge.edges.core import BridgeCore, Publish
from bridge.edges.pipeline import ClaimPipeline
from bridge.edges.sessions import Shard
from bridge.errors import RabbitMQError
from bridge.metrics import counters
from bridge.ops.lifecycle import denylist_entries
from bridge.rabbitmq.management import Management
from bridge.rabbitmq_scopes import binding_key, mqtt_topic, routing_key
from bridge.storage import keyfiles
from bridge.storage.store import Store

log = logging.getLogger("provbridge.service")

RECONNECT_DELAY_SECONDS = (1.0, 10.0)  # the wait once every node refused, first and longest
CONNECT_TIMEOUT_SECONDS = 10.0
MQTT_QOS_HEADER = "x-mqtt-publish-qos"  # the QoS the MQTT plugin delivers a message with (at most the subscription's)


@dataclass(frozen=True)
class Delivery:
    """A claim or refresh taken from the queue: what answering and acknowledging it needs."""

    topic: str
    payload: bytes = field(repr=False)  # a claim carries a provisioning key
    message: AbstractIncomingMessage = field(repr=False)
    connection: int  # its delivery tag means nothing on another connection


class RabbitBridge:
    def __init__(self, settings: Settings, shard: Shard | None = None) -> None:
        self.settings = settings
        self.shard = shard or Shard()
        self.core = BridgeCore(settings)
        self.pipeline: ClaimPipeline[Delivery] = ClaimPipeline(settings, self.core, self._answer)
        self.presence = None  # RabbitMQ has no plugin of ours to report device connections
        self._serving = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connection = 0  # counts connections: an acknowledgement goes on the one that took the message
        self._amqp: aio_pika.abc.AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the claim worker, then connect (retried in the background until a node answers)."""
        await self.pipeline.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run()))
        if self.shard.index == 0:  # one process of the host sweeps; more would only repeat it
            self._tasks.append(loop.create_task(self._sweep_revoked()))

    async def wait_serving(self, timeout: float) -> bool:
        """True once the bridge consumes from the claim queue."""
        try:
            await asyncio.wait_for(self._serving.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop taking claims, answer those taken, then disconnect."""
        self._stopping.set()
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except Exception as exc:  # the connection is gone: what it held is redelivered to others
                log.debug("cancelling the consumer: %s", exc)
        await self.pipeline.stop()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._amqp is not None:
            await self._amqp.close()
        counters.BROKER_CONNECTED.set(0)

    # --- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect to a node and consume until the connection is lost; then the next node. Waits only once a
        whole round of the nodes failed."""
        nodes = self.settings.rabbitmq.amqp
        delay = RECONNECT_DELAY_SECONDS[0]
        failed = 0  # connection attempts failed in a row
        for attempt in itertools.count(1):
            node = nodes[(self.shard.index + attempt - 1) % len(nodes)]  # processes spread over the nodes
            lost = asyncio.Event()
            try:
                await self._consume_from(node, lost)
                failed, delay = 0, RECONNECT_DELAY_SECONDS[0]
                await lost.wait()
                log.warning("lost the connection to RabbitMQ at %s; connecting again", node)
            except Exception as exc:  # whatever a node going away raises, this loop must live on (not cancellation)
                failed += 1
                log.warning("cannot consume claims from RabbitMQ at %s (%s)", node, exc or type(exc).__name__)
            finally:
                self._serving.clear()
                counters.BROKER_CONNECTED.set(0)
                await self._close_quietly()
            if self._stopping.is_set():
                return
            if failed and failed % len(nodes) == 0:
                await asyncio.sleep(delay)
                delay = min(RECONNECT_DELAY_SECONDS[1], delay * 2)

    async def _consume_from(self, node: str, lost: asyncio.Event) -> None:
        rabbit = self.settings.rabbitmq
        host, _, port = node.rpartition(":")
        connection = await aio_pika.connect(
            host=host,
            port=int(port),
            login=self.settings.broker.username,
            password=keyfiles.read_secret(self.settings.bridge_secret_file),
            virtualhost=rabbit.vhost,
            timeout=CONNECT_TIMEOUT_SECONDS,
            client_properties={"connection_name": f"provbridge bridge {self.shard.index}"},
        )
        self._amqp = connection
        self._connection += 1
        connection.close_callbacks.add(lambda *_: lost.set())
        channel = await connection.channel(publisher_confirms=True)
        channel.close_callbacks.add(lambda *_: lost.set())
        # Deliveries unacknowledged at once: the claims this process may hold, as `claims.max_in_flight` says.
        await channel.set_qos(prefetch_count=self.settings.claims.max_in_flight)
        queue = await channel.declare_queue(rabbit.queue, durable=True, arguments={"x-queue-type": "quorum"})
        for topic_filter in self.core.filters:
            await queue.bind(rabbit.exchange, binding_key(topic_filter))
        self._exchange = await channel.get_exchange(rabbit.exchange, ensure=False)
        self._queue = queue
        self._consumer_tag = await queue.consume(self._on_delivery, no_ack=False)
        self._serving.set()
        counters.BROKER_CONNECTED.set(1)
        log.info("consuming claims from RabbitMQ at %s (queue %s)", node, rabbit.queue)

    async def _close_quietly(self) -> None:
        connection, self._amqp, self._exchange, self._queue = self._amqp, None, None, None
        self._consumer_tag = None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception as exc:  # closing what is half gone: nothing to do about it
                log.debug("closing the AMQP connection: %s", exc)

    # --- claims in ---------------------------------------------------------------------------

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        request = Delivery(mqtt_topic(message.routing_key or ""), message.body, message, self._connection)
        if self._stopping.is_set():
            return  # not acknowledged: RabbitMQ gives it to another consumer
        admitted = False
        try:
            refused = self.core.screen(request.topic, request.payload)
            if refused is not None:
                self._answer(request, self.core.publishes(refused.outcome))
                if refused.outcome.events:
                    self.pipeline.record_events(refused.outcome.events)
            elif self.core.admit():
                admitted = True
                self.pipeline.dispatch(request)
            else:
                self._answer(request, self.core.publishes(self.core.overloaded(request.topic, request.payload)))
        except Exception:  # cannot happen; if it does, the claim goes back to the queue rather than stay taken
            log.exception("claim on %s could not be taken; it is given back", request.topic)
            if admitted:
                self.core.release()
            try:
                await message.nack(requeue=True)
            except Exception as exc:
                log.warning("giving %s back failed (%s); it is redelivered with the connection", request.topic, exc)

    # --- answers out -------------------------------------------------------------------------

    def _answer(self, request: Delivery, publishes: list[Publish]) -> None:
        """Send the answer and its events, then acknowledge the request (in a task: confirms take a round trip)."""
        task = asyncio.get_running_loop().create_task(self._send(request, publishes))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, request: Delivery, publishes: list[Publish]) -> None:
        exchange = self._exchange
        sent = exchange is not None and request.connection == self._connection
        try:
            for publish in publishes:
                if publish.retain or exchange is None:
                    continue  # a retained status is the MQTT plugin's own: an AMQP publish cannot be one
                message = aio_pika.Message(
                    publish.payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers={MQTT_QOS_HEADER: 1}
                )
                await exchange.publish(message, routing_key=routing_key(publish.topic))
        except Exception as exc:  # not confirmed: not acknowledged, so RabbitMQ gives the claim out again
            log.warning("answer to %s not confirmed by RabbitMQ (%s); it is redelivered", request.topic, exc)
            sent = False
        if not sent:
            return  # taken on a lost connection: RabbitMQ redelivers it, and the stored answer is replayed
        try:
            await request.message.ack()
        except Exception as exc:
            log.warning("acknowledging %s failed (%s); it is redelivered", request.topic, exc)

    # --- revocation ----------------------------------------------------------------------------

    async def _sweep_revoked(self) -> None:
        """End the connections of every device whose tokens are refused, as long as they may be valid."""
        rabbit = self.settings.rabbitmq
        store: Store | None = None
        try:
            while True:
                try:  # made here, and again after a failure: a database or secret not there yet is no reason to stop
                    store = store or Store(self.settings.database)
                    secret = keyfiles.read_secret(self.settings.bridge_secret_file)
                    management = Management(rabbit.management, self.settings.broker.username, secret)
                    await asyncio.to_thread(sweep_once, store, management)
                except Exception as exc:  # a node or the database away: the next sweep tries again
                    log.warning("the sweep of revoked devices' RabbitMQ connections failed: %s", exc)
                await asyncio.sleep(rabbit.revoke_sweep_seconds)
        finally:
            if store is not None:
                store.close()


def sweep_once(store: Store, management: Management, now: int | None = None) -> None:
    """Close the connections of every revoked or deleted device still listed; one that cannot be reached is tried
    again at the next sweep."""
    entries = denylist_entries(store.refused_credentials(int(time.time()) if now is None else now))
    for device_id in entries.devices:
        try:
            management.close_connections(device_id)
        except RabbitMQError as exc:  # one device's failure does not spare the others
            log.warning("could not end %s's RabbitMQ connections: %s", device_id, exc)
