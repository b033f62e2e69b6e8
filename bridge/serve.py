"""`provbridge serve`: the bridge, with the embedded broker in the same process or an external one."""

import asyncio
import logging
import signal
import threading

from bridge import keyfiles
from bridge.config import Settings
from bridge.provisioning import Provisioner
from bridge.service import BridgeService
from bridge.store import Store
from broker.embedded import EmbeddedBrokerSettings, start_embedded_broker, stop_embedded_broker

log = logging.getLogger("provbridge")

CONNECT_TIMEOUT_SECONDS = 15.0


def embedded_broker_settings(settings: Settings) -> EmbeddedBrokerSettings:
    return EmbeddedBrokerSettings(
        host=settings.broker.host,
        port=settings.broker.port,
        data_dir=settings.data_dir,
        prefix=settings.topic_prefix,
        audience=settings.token.audience,
        issuer=settings.token.issuer,
        bridge_username=settings.broker.username,
        bridge_secret_file=settings.bridge_secret_file,
        allow_anonymous_provisioning=settings.broker.allow_anonymous_provisioning,
    )


def build_service(settings: Settings) -> BridgeService:
    keys = keyfiles.load_keys(settings.data_dir)
    store = Store(settings.database_file)
    password = keyfiles.read_secret(settings.bridge_secret_file)
    return BridgeService(settings, Provisioner(settings, store, keys), password)


async def serve(settings: Settings, stop: asyncio.Event | None = None, ready: threading.Event | None = None) -> None:
    """Run until `stop` is set or SIGINT/SIGTERM arrives; then shut down cleanly.

    `ready` is set once the bridge is connected and taking claims (tests and the demo wait on it).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    service = build_service(settings)
    broker = None
    if settings.broker.mode == "embedded":
        broker = await start_embedded_broker(embedded_broker_settings(settings))
        log.info("embedded broker listening on %s:%s", settings.broker.host, settings.broker.port)
    service.start()
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
        await asyncio.to_thread(service.stop)
        if broker is not None:
            await stop_embedded_broker(broker)
        service.provisioner.store.close()
