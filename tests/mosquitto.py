"""Test helpers: a real Mosquitto started from `provbridge mosquitto-config` output as is, the bridge
in external mode against it, and a small MQTT 3.1.1 / 5 client that reports PUBACK reason codes.

Mosquitto tests are skipped only when the binary is missing and CI is not set; under CI (where
`make test` installs it) a missing Mosquitto fails them.
"""

import os
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge import cli, keyfiles
from bridge.config import Settings
from bridge.store import Store
from tests.conftest import Bridge, free_port, serving

TIMEOUT = 10.0
SBIN_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((path for path in SBIN_CANDIDATES if os.access(path, os.X_OK)), None)


def require_mosquitto() -> str:
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Mosquitto is not installed but CI is set: `make test` (make mosquitto) installs it")
        pytest.skip("Mosquitto is not installed (`make mosquitto`); under CI this fails instead")
    return binary


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll `condition` until it holds or `timeout` passes. Tests wait on conditions, never on durations."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def external_settings(settings: Settings, **broker: object) -> Settings:
    """`settings` pointed at an external Mosquitto on its free port, with a fast janitor."""
    update: dict[str, object] = {
        "mode": "external",
        "dynsec": True,
        "tls_port": free_port(),
        "tls_listen": "off",
        "dynsec_janitor_seconds": 0.5,
        **broker,
    }
    return settings.model_copy(update={"broker": settings.broker.model_copy(update=update)})


def config_toml(settings: Settings) -> str:
    """The settings `mosquitto-config` must see, as an operator's config file."""
    b = settings.broker
    return "\n".join(
        [
            f'topic_prefix = "{settings.topic_prefix}"',
            f'log_level = "{settings.log_level}"',
            "[broker]",
            f'mode = "{b.mode}"',
            f'host = "{b.host}"',
            f"port = {b.port}",
            f"tls_port = {b.tls_port}",
            f'tls_listen = "{b.tls_listen}"',
            f'username = "{b.username}"',
            f"allow_anonymous_provisioning = {'true' if b.allow_anonymous_provisioning else 'false'}",
            f'protocol = "{b.protocol}"',
            f"dynsec_janitor_seconds = {b.dynsec_janitor_seconds}",
            "[claims]",
            f"rate_limits = {'true' if settings.claims.rate_limits else 'false'}",
            "",
        ]
    )


def run_cli(settings: Settings, *argv: str) -> int:
    """`provbridge --config <settings as TOML> --data-dir <data dir> ARGV...`, in this process."""
    config = settings.data_dir.parent / "provbridge-test.toml"
    config.write_text(config_toml(settings))
    return cli.main(["--config", str(config), "--data-dir", str(settings.data_dir), *argv])


class RunningMosquitto:
    def __init__(self, binary: str, conf_dir: Path, port: int) -> None:
        self.binary = binary
        self.conf_dir = conf_dir
        self.port = port
        self.log_file = conf_dir.parent / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.conf_dir / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
            )
        if not wait_for(self._listening, timeout=15):
            self.stop()
            raise AssertionError(f"Mosquitto did not start:\n{self.log()}")

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"Mosquitto exited with {self.process.returncode}:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()  # this process only, by its own handle
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@contextmanager
def mosquitto_for(settings: Settings) -> Iterator[RunningMosquitto]:
    """`provbridge mosquitto-config` into a temp dir, then Mosquitto started from it as is."""
    binary = require_mosquitto()
    conf_dir = settings.data_dir.parent / "mosquitto"
    assert run_cli(settings, "mosquitto-config", str(conf_dir)) == 0
    broker = RunningMosquitto(binary, conf_dir, settings.broker.port)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class MosquittoBridge(Bridge):
    mosquitto: RunningMosquitto


@contextmanager
def mosquitto_bridge(settings: Settings, first_key: str, **broker: object) -> Iterator[MosquittoBridge]:
    """Mosquitto from the generated config, and the bridge in external mode against it."""
    settings = external_settings(settings, **broker)
    with mosquitto_for(settings) as running, serving(settings):
        store = Store(settings.database_file)
        try:
            yield MosquittoBridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key, running)
        finally:
            store.close()


# --- a client that tells what the broker decided ----------------------------------------------


class Client:
    """One MQTT connection, 3.1.1 or 5, that never reconnects by itself.

    `publish` returns the PUBACK reason code (MQTT 5 says 0x87 when the ACL refused; 3.1.1 cannot tell),
    `subscribe` the SUBACK codes, `connect` whether the broker accepted.
    """

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        v5: bool = False,
        ca_file: Path | None = None,
    ) -> None:
        self.v5 = v5
        self.port = port
        self.messages: queue.Queue[tuple[str, bytes, Any]] = queue.Queue()
        self._connack: queue.Queue[Any] = queue.Queue()
        self._subacks: queue.Queue[list[int]] = queue.Queue()
        self._pubacks: dict[int, queue.Queue[int]] = {}
        self.disconnected = threading.Event()
        session: dict[str, Any] = {"protocol": mqtt.MQTTv5} if v5 else {"clean_session": True}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, reconnect_on_failure=False, **session)
        if username is not None:
            c.username_pw_set(username, password)
        if ca_file is not None:
            c.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)  # verifies name and chain
        c.on_connect = lambda _c, _u, _f, reason, _p: self._connack.put(reason)
        c.on_disconnect = lambda *_a: self.disconnected.set()
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload), m.properties))
        c.on_subscribe = lambda _c, _u, _mid, codes, _p: self._subacks.put([int(x.value) for x in codes])
        c.on_publish = self._on_publish
        self.client = c

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._pubacks.setdefault(mid, queue.Queue()).put(int(reason.value))

    def connect(self) -> bool:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except OSError:
            return False
        self.client.loop_start()
        try:
            reason = self._connack.get(timeout=TIMEOUT)
        except queue.Empty:
            return False
        return not reason.is_failure

    def subscribe(self, topic: str) -> list[int]:
        self.client.subscribe(topic, 1)
        return self._subacks.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None) -> int:
        info = self.client.publish(topic, payload, 1, properties=properties)
        return self._pubacks.setdefault(info.mid, queue.Queue()).get(timeout=TIMEOUT)

    def next_message(self, timeout: float = TIMEOUT) -> tuple[str, bytes, Any]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def request_properties(response_topic: str | None, correlation: bytes | None) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        properties.ResponseTopic = response_topic
    if correlation is not None:
        properties.CorrelationData = correlation
    return properties


def can_connect(port: int, client_id: str, username: str | None, password: str | None, v5: bool = False) -> bool:
    with Client(port, client_id, username, password, v5) as conn:
        return conn.connect()


NOT_AUTHORIZED = 0x87  # MQTT 5 PUBACK / SUBACK reason
ACCEPTED = (0x00, 0x10)  # MQTT 5 PUBACK: success, or success with no matching subscribers
