"""The embedded MQTT broker: settings, start, stop, and the blocking `provbridge broker` entry point.

One plain TCP listener, made TLS when a certificate and key are given, or a second TLS listener
beside it when a `tls_port` is given too, and with a `certificate_port` and `device_ca_file` a TLS
listener for devices with a client certificate of that CA (broker/server.py `CERTIFICATE_LISTENER`);
no websockets, no `$SYS`, and `ProvbridgeAclPlugin` as the only plugin. amqtt speaks MQTT 3.1.1 only:
a CONNECT of MQTT 5 (or 3.1) gets the CONNACK `20 02 00 01` ("unacceptable protocol version") and the
connection is closed (broker/server.py).
"""

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.errors import BrokerError, PluginError, PluginLoadError

from broker.acl import check_prefix
from broker.auth import DEFAULT_AUDIENCE, DEFAULT_BRIDGE_USERNAME, DEFAULT_ISSUER, check_bridge_username
from broker.errors import BrokerConfigError, BrokerStartError
from broker.plugin import ProvbridgeAclPlugin
from broker.server import CERTIFICATE_LISTENER, DEFAULT_REVOCATION_CHECK_SECONDS, ProvbridgeBroker
from provwire.topics import DEFAULT_PREFIX

logger = logging.getLogger(__name__)
PLUGIN_PATH = f"{ProvbridgeAclPlugin.__module__}.{ProvbridgeAclPlugin.__qualname__}"


@dataclass(frozen=True, kw_only=True)
class EmbeddedBrokerSettings:
    """Where the broker listens and whom it lets in. `port=0` binds a free port (see `broker.port`)."""

    data_dir: Path  # holds jwks.json and bridge.secret, both written by `provbridge init`
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    audience: str = DEFAULT_AUDIENCE
    issuer: str = DEFAULT_ISSUER
    bridge_username: str = DEFAULT_BRIDGE_USERNAME
    allow_anonymous_provisioning: bool = True
    jwks_file: Path | None = None  # default <data_dir>/jwks.json
    bridge_secret_file: Path | None = None  # default <data_dir>/bridge.secret
    ops_users_file: Path | None = None  # default <data_dir>/ops_users.json
    # A disconnected persistent session (and its queued messages) is dropped after this long.
    session_expiry_seconds: int | None = 24 * 3600
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # With a certificate: None makes the one listener (on `port`) TLS; a port adds a second listener,
    # TLS, there. Python's server context refuses anything older than TLS 1.2.
    tls_port: int | None = None
    # Devices with a client certificate of `device_ca_file` (and only of it): a TLS listener on this port,
    # with the server certificate above, where a CONNECT is authenticated by the certificate alone.
    certificate_port: int | None = None
    device_ca_file: Path | None = None
    # The largest MQTT packet a client may send (else it is disconnected); amqtt itself has no bound.
    max_packet_bytes: int = 20_480
    # How often the broker looks for live sessions of revoked devices (denylist.json) and ends them.
    revocation_check_seconds: float = DEFAULT_REVOCATION_CHECK_SECONDS

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        check_bridge_username(self.bridge_username)
        if not 0 <= self.port <= 65535:
            raise BrokerConfigError(f"port {self.port} is out of range")
        if not self.revocation_check_seconds > 0:
            raise BrokerConfigError(f"revocation_check_seconds must be positive, not {self.revocation_check_seconds}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise BrokerConfigError("TLS needs both a certificate file and a key file")
        if self.tls_port is not None:
            if self.tls_cert_file is None:
                raise BrokerConfigError("a TLS port needs a certificate file and a key file")
            if not 1 <= self.tls_port <= 65535 or self.tls_port == self.port:
                raise BrokerConfigError(f"TLS port {self.tls_port} is out of range or the plain port")
        if (self.certificate_port is None) != (self.device_ca_file is None):
            raise BrokerConfigError("a certificate listener needs both its port and the device CA file")
        if self.certificate_port is not None:
            if self.tls_cert_file is None:
                raise BrokerConfigError("a certificate listener needs the server certificate file and key file")
            if not 1 <= self.certificate_port <= 65535 or self.certificate_port in (self.port, self.tls_port):
                raise BrokerConfigError(
                    f"certificate port {self.certificate_port} is out of range or the plain or TLS port"
                )


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _optional_path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def broker_config(settings: EmbeddedBrokerSettings) -> dict[str, Any]:
    """The amqtt configuration dictionary for these settings."""
    listener: dict[str, Any] = {"type": "tcp", "bind": _bind_address(settings.host, settings.port)}
    listeners = {"default": listener}
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = {"ssl": True, "certfile": str(settings.tls_cert_file), "keyfile": str(settings.tls_key_file)}
        if settings.tls_port is None:
            listener |= tls
        else:
            listeners["tls"] = {"type": "tcp", "bind": _bind_address(settings.host, settings.tls_port)} | tls
        if settings.certificate_port is not None and settings.device_ca_file is not None:
            # `cafile` marks it: ProvbridgeBroker requires a client certificate of that CA there, and only there.
            bind = _bind_address(settings.host, settings.certificate_port)
            listener_ca = {"type": "tcp", "bind": bind, "cafile": str(settings.device_ca_file)}
            listeners[CERTIFICATE_LISTENER] = listener_ca | tls
    plugin = {
        "data_dir": str(settings.data_dir),
        "jwks_file": _optional_path(settings.jwks_file),
        "bridge_secret_file": _optional_path(settings.bridge_secret_file),
        "ops_users_file": _optional_path(settings.ops_users_file),
        "prefix": settings.prefix,
        "audience": settings.audience,
        "issuer": settings.issuer,
        "bridge_username": settings.bridge_username,
        "allow_anonymous_provisioning": settings.allow_anonymous_provisioning,
    }
    return {
        "listeners": listeners,
        "session_expiry_interval": settings.session_expiry_seconds,
        # Replaces amqtt's defaults, which add $SYS topics, anonymous auth and per-packet logging.
        "plugins": {PLUGIN_PATH: plugin},
    }


def quiet_amqtt_logging() -> None:
    """amqtt logs every connection at INFO: keep its warnings only, unless its level was set on purpose."""
    for name in ("amqtt", "transitions"):
        named = logging.getLogger(name)
        if named.level == logging.NOTSET:
            named.setLevel(logging.WARNING)


async def start_embedded_broker(
    settings: EmbeddedBrokerSettings, before_listening: Callable[[ProvbridgeBroker], None] | None = None
) -> ProvbridgeBroker:
    """A started broker. Stop it with `stop_embedded_broker`.

    `before_listening` gets the broker before its first connection, to subscribe in process (the bridge).
    """
    quiet_amqtt_logging()
    try:
        broker = ProvbridgeBroker(
            broker_config(settings),
            max_packet_bytes=settings.max_packet_bytes,
            revocation_check_seconds=settings.revocation_check_seconds,
        )
        if before_listening is not None:
            before_listening(broker)
        await broker.start()
    except (BrokerError, PluginError, PluginLoadError, OSError) as exc:
        raise BrokerStartError(f"cannot start the MQTT broker: {exc}") from exc
    logger.info("MQTT broker listening on %s:%d", settings.host, broker.port)
    if settings.tls_port is not None:
        logger.info("MQTT broker listening with TLS on %s:%d", settings.host, settings.tls_port)
    if settings.certificate_port is not None:
        logger.info("MQTT broker listening for device certificates on %s:%d", settings.host, settings.certificate_port)
    return broker


async def stop_embedded_broker(broker: ProvbridgeBroker) -> None:
    """Disconnect every client and close the listener."""
    await broker.shutdown()
    logger.info("MQTT broker stopped")


async def _serve(settings: EmbeddedBrokerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still ends asyncio.run
                loop.add_signal_handler(signum, stop.set)
    broker = await start_embedded_broker(settings)
    try:
        await stop.wait()
    finally:
        await stop_embedded_broker(broker)


def run_broker_forever(settings: EmbeddedBrokerSettings) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then stop cleanly. For `provbridge broker`."""
    asyncio.run(_serve(settings))
