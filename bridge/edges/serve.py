"""`provbridge serve`: the bridge, inside the embedded broker's process or connected to an external one.

Embedded (`broker.mode = "embedded"`): amqtt and the bridge share one process and the bridge needs no
MQTT connection (`bridge.edges.inprocess`). RabbitMQ: an AMQP consumer of the claim queue
(`bridge.edges.rabbitmq`). External (Mosquitto): the bridge is a paho client, one per bridge process
(`bridge.edges.processes` runs N of them, each calling `serve` with its `Shard`): driven by the event
loop with the claim work in a worker process (`bridge.edges.external`), or, when tokens are mirrored
into Mosquitto's dynamic security (the small-fleet opt-in), on threads beside the mirror
(`bridge.edges.paho`: the mirror's commands travel on the bridge's connection, inside the claim's
transaction).
"""

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass, field

from bridge.config import Settings
from bridge.edges.core import BridgeCore, claim_handlers
from bridge.edges.external import ExternalBridge
from bridge.edges.inprocess import InProcessBridge
from bridge.edges.paho import BridgeService
from bridge.edges.presence import PresenceRecorder
from bridge.edges.rabbitmq import RabbitBridge
from bridge.edges.sessions import Shard, check_processes, client_ids, retire_stale_sessions
from bridge.mosquitto.dynsec import DynsecMirror, uses_dynsec
from bridge.mosquitto.janitor import SharedDynsecMirror
from bridge.ops.lifecycle import publish_denylist
from bridge.storage import sharedfiles
from bridge.storage.store import Store
from bridge.tls import certificates as tls
from broker.embedded import EmbeddedBrokerSettings, start_embedded_broker, stop_embedded_broker
from broker.server import ProvbridgeBroker

log = logging.getLogger("provbridge")

CONNECT_TIMEOUT_SECONDS = 15.0


def embedded_broker_settings(settings: Settings) -> EmbeddedBrokerSettings:
    listeners = tls.embedded_listeners(settings)
    return EmbeddedBrokerSettings(
        host=settings.broker.host,
        port=listeners.port,
        tls_port=listeners.tls_port,
        tls_cert_file=listeners.cert_file,
        tls_key_file=listeners.key_file,
        certificate_port=listeners.certificate_port,
        device_ca_file=listeners.device_ca_file,
        data_dir=settings.data_dir,
        prefix=settings.topic_prefix,
        audience=settings.token.audience,
        issuer=settings.token.issuer,
        bridge_username=settings.broker.username,
        bridge_secret_file=settings.bridge_secret_file,
        allow_anonymous_provisioning=settings.broker.allow_anonymous_provisioning,
        max_packet_bytes=settings.broker.max_packet_bytes,
    )


@dataclass
class Running:
    """A started bridge: the embedded broker with the in-process edge, or an external broker's edge."""

    core: BridgeCore
    edge: InProcessBridge | ExternalBridge | RabbitBridge | BridgeService
    broker: ProvbridgeBroker | None = None
    mirror: DynsecMirror | None = None
    store: Store | None = None  # the paho edge's; the in-process edge's is in its claim worker
    presence: PresenceRecorder | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    async def wait_serving(self, timeout: float) -> bool:
        if isinstance(self.edge, InProcessBridge):
            return True
        if isinstance(self.edge, ExternalBridge | RabbitBridge):
            return await self.edge.wait_serving(timeout)
        return await asyncio.to_thread(self.edge.wait_connected, timeout)

    async def stop(self) -> None:
        self.stopping.set()
        if self.mirror is not None:
            await asyncio.to_thread(self.mirror.stop)
        if isinstance(self.edge, InProcessBridge | ExternalBridge | RabbitBridge):
            await self.edge.stop()
        else:
            await asyncio.to_thread(self.edge.stop)
        if self.broker is not None:
            await self.broker.flush()  # the offline status, to whoever watches
            await stop_embedded_broker(self.broker)
        if self.presence is not None:
            await asyncio.to_thread(self.presence.stop)
            self.presence.store.close()
        if self.store is not None:
            self.store.close()


async def start_bridge(settings: Settings, shard: Shard | None = None) -> Running:
    """Start the bridge (and the embedded broker) for already `tls.resolve`d settings."""
    shard = shard or Shard()
    check_processes(settings, shard.count)
    store = Store(settings.database)
    publish_denylist(settings, store)  # repairs a missing or stale denylist.json before devices connect
    if settings.broker.mode == "embedded":
        store.close()  # the claim worker has its own
        edges: list[InProcessBridge] = []
        presence = PresenceRecorder(Store(settings.database))

        def take_claims(broker: ProvbridgeBroker) -> None:  # before the broker listens: no claim may go unheard
            edges.append(InProcessBridge(settings, broker))
            edges[0].take_claims()
            broker.on_presence = presence.record

        broker = await start_embedded_broker(embedded_broker_settings(settings), before_listening=take_claims)
        log.info("embedded broker listening on %s", tls.embedded_listeners(settings).describe(settings.broker.host))
        edge = edges[0]
        try:
            await edge.start()
        except BaseException:
            await stop_embedded_broker(broker)
            presence.stop()
            raise
        return Running(edge.core, edge, broker, presence=presence)
    if settings.broker.mode == "rabbitmq":
        store.close()  # the claim worker has its own
        rabbit = RabbitBridge(settings, shard)
        running = Running(rabbit.core, rabbit)
        try:
            await rabbit.start()
        except BaseException:
            await rabbit.stop()
            raise
        return running
    # With broker.mosquitto_auth = "jwt" (the default) Mosquitto's provbridge_jwt plugin verifies tokens:
    # nothing to mirror. With the "dynsec" opt-in each one is mirrored into its dynamic-security plugin.
    if not (uses_dynsec(settings) and settings.broker.mosquitto_auth == "dynsec"):
        store.close()  # the claim worker has its own
        external = ExternalBridge(settings, shard)
        external.presence = PresenceRecorder(Store(settings.database))  # the provbridge_jwt plugin reports it
        running = Running(external.core, external, presence=external.presence)
        _retire_stale_sessions(settings, shard, running)
        try:
            await external.start()
        except BaseException:
            await external.stop()
            raise
        return running
    mirror = SharedDynsecMirror(settings, store)
    core = BridgeCore(settings)
    service = BridgeService(core, claim_handlers(settings, store, mirror), shard)
    running = Running(core, service, mirror=mirror, store=store)
    _retire_stale_sessions(settings, shard, running)
    mirror.bind(service.client, service.network_routes)
    service.start()
    mirror.start()
    return running


def _retire_stale_sessions(settings: Settings, shard: Shard, running: Running) -> None:
    if shard.index == 0:  # one process speaks for the layout
        current = client_ids(settings, shard.count)
        threading.Thread(
            target=retire_stale_sessions, args=(settings, current, running.stopping), name="retire", daemon=True
        ).start()


def follow_shared_files(settings: Settings, stopping: threading.Event) -> None:
    """Every `storage.key_sync_seconds`, take the key files other hosts changed (a rotation) from the database
    (`LiveKeyRing` loads them at the next claim), and rewrite the denylist from it (a device revoked on another
    host: this host's broker refuses it from then on)."""
    store: Store | None = None
    try:
        while not stopping.wait(settings.storage.key_sync_seconds):
            try:
                store = store or Store(settings.database)  # here: a database away at start is no reason to stop
                sharedfiles.sync(settings, store)
                publish_denylist(settings, store)  # rewritten only when it changed
            except Exception as exc:  # the database away, a bad row: the next turn tries again
                log.warning("the shared state could not be taken from the database: %s", exc)
    finally:
        if store is not None:
            store.close()


async def serve(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: threading.Event | None = None,
    shard: Shard | None = None,
) -> None:
    """Run until `stop` is set or SIGINT/SIGTERM arrives; then shut down cleanly.

    `ready` is set once the bridge is taking claims (tests and the demo wait on it).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    # "auto" TLS pinned once: the listeners and what claims tell devices must not drift apart.
    running = await start_bridge(tls.resolve(settings), shard)
    if sharedfiles.is_shared(settings) and (shard is None or shard.index == 0):  # one per host: they share files
        threading.Thread(
            target=follow_shared_files, args=(settings, running.stopping), name="shared-files", daemon=True
        ).start()
    try:
        if await running.wait_serving(CONNECT_TIMEOUT_SECONDS):
            log.info("bridge serving claims on %s/claim/+", settings.topic_prefix)
            if ready is not None:
                ready.set()
        else:
            log.warning("bridge not connected to the broker yet; it keeps retrying")
        await stop.wait()
        log.info("shutting down")
    finally:
        await running.stop()
