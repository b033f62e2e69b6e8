"""`provbridge serve`: the bridge, with the embedded broker in the same process or an external one."""

import asyncio
import logging
import signal
import threading

from bridge import keyfiles, tls
from bridge.config import Settings
from bridge.dynsec import DynsecMirror, uses_dynsec
from bridge.mirror import TokenMirror
from bridge.provisioning import Provisioner
from bridge.revocation import publish_denylist
from bridge.rotation import LiveKeyRing
from bridge.service import BridgeService
from bridge.store import Store
from broker.embedded import EmbeddedBrokerSettings, start_embedded_broker, stop_embedded_broker

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
        data_dir=settings.data_dir,
        prefix=settings.topic_prefix,
        audience=settings.token.audience,
        issuer=settings.token.issuer,
        bridge_username=settings.broker.username,
        bridge_secret_file=settings.bridge_secret_file,
        allow_anonymous_provisioning=settings.broker.allow_anonymous_provisioning,
    )


def build_service(settings: Settings, mirror: TokenMirror | None = None) -> BridgeService:
    keys = LiveKeyRing(settings.data_dir)  # `provbridge keys rotate` applies without a restart
    store = Store(settings.database_file)
    password = keyfiles.read_secret(settings.bridge_secret_file)
    publish_denylist(settings, store)  # repairs a missing or stale denylist.json before devices connect
    return BridgeService(settings, Provisioner(settings, store, keys, mirror=mirror), password)


async def serve(settings: Settings, stop: asyncio.Event | None = None, ready: threading.Event | None = None) -> None:
    """Run until `stop` is set or SIGINT/SIGTERM arrives; then shut down cleanly.

    `ready` is set once the bridge is connected and taking claims (tests and the demo wait on it).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    # "auto" TLS pinned once: the listeners and what claims tell devices must not drift apart.
    settings = tls.resolve(settings)
    # Mosquitto cannot verify tokens: each one is mirrored into its dynamic-security plugin.
    mirror = DynsecMirror(settings) if uses_dynsec(settings) else None
    service = build_service(settings, mirror)
    if mirror is not None:
        mirror.bind(service.client, service.network_routes)
    broker = None
    if settings.broker.mode == "embedded":
        broker = await start_embedded_broker(embedded_broker_settings(settings))
        log.info("embedded broker listening on %s", tls.embedded_listeners(settings).describe(settings.broker.host))
    service.start()
    if mirror is not None:
        mirror.start()
    try:
        connected = await asyncio.to_thread(service.wait_connected, CONNECT_TIMEOUT_SECONDS)
        if connected:
            log.info("bridge serving claims on %s/claim/+", settings.topic_prefix)
            if ready is not None:
                ready.set()
        else:
            log.warning("bridge not connected to the broker yet; it keeps retrying")
        await stop.wait()
        log.info("shutting down")
    finally:
        if mirror is not None:
            await asyncio.to_thread(mirror.stop)
        await asyncio.to_thread(service.stop)
        if broker is not None:
            await stop_embedded_broker(broker)
        service.provisioner.store.close()
