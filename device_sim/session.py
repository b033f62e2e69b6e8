"""One blocking MQTT 3.1.1 connection, driven from the calling thread.

The simulator runs many devices on a thread pool. Each worker owns its paho client outright and drives
it through paho's external-event-loop API (`socket()`, `want_write()`, `loop_read/write/misc()`)
instead of `loop_start()`'s extra thread per client: no state is shared between threads, so the
callbacks below need no locks, a device costs one thread and one socket, and `selectors` (epoll)
has no 1024-descriptor ceiling the way `client.loop()`'s select() has.
"""

import contextlib
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_sim.errors import BrokerRefused, Cancelled, ConnectError, ConnectionLost

KEEPALIVE_S = 30
PUMP_SLICE_S = 0.05  # longest single select(); bounds how late a deadline is noticed


class Session:
    """A paho client plus what its callbacks saw: CONNACK, SUBACKs, PUBACKs and received messages."""

    def __init__(
        self,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: Path | None = None,
        client_certificate: tuple[Path, Path] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """`client_certificate`: (certificate chain, private key) PEM files to present in the TLS handshake;
        they are read here, so the caller may delete them as soon as the Session exists."""
        self.client_id = client_id
        self.cancel = cancel  # when set, every wait ends at once with Cancelled
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if client_certificate is not None and not tls:
            raise ValueError("a client certificate needs TLS")
        if tls:
            # Verified TLS only: the system trust store, or the deployment's own CA. paho loads the
            # certificate chain and key files right here (SSLContext.load_cert_chain).
            cert_file, key_file = (None, None) if client_certificate is None else client_certificate
            self.client.tls_set(
                ca_certs=None if ca_file is None else str(ca_file),
                certfile=None if cert_file is None else str(cert_file),
                keyfile=None if key_file is None else str(key_file),
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self.client.on_socket_open = self._on_socket_open
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.connack: Any = None  # paho ReasonCode once CONNACK arrived
        self.connected = False
        self.lost_reason: str | None = None
        self.subacks: dict[int, list[Any]] = {}
        self.pubacks: set[int] = set()
        self.messages: deque[tuple[str, bytes]] = deque()

    # --- callbacks (paho runs them inside connect() and loop_read/write(), on the owning thread) ---

    def _on_socket_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        # Claims and answers are single small packets: Nagle would only add delay to every exchange.
        # (An SSLSocket is a socket.socket too; only websocket transports, unused here, are not.)
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, _c: mqtt.Client, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self.connack = reason_code
        self.connected = not reason_code.is_failure

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self.connected = False
        self.lost_reason = str(reason_code)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reason_codes: list[Any], _props: Any) -> None:
        self.subacks[mid] = list(reason_codes)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason_code: Any, _props: Any) -> None:
        self.pubacks.add(mid)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: Any) -> None:
        self.messages.append((str(message.topic), bytes(message.payload)))

    # --- blocking operations ---

    def pump_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Process network traffic until `done()` or the deadline; False on timeout.

        Raises ConnectionLost if the connection drops while waiting, Cancelled once `cancel` is set.
        """
        if done():
            return True
        sock = self.client.socket()
        if sock is None:
            raise ConnectionLost(f"not connected: {self.lost_reason or 'no socket'}")
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while not done():
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled("cancelled")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                rc = self._pump_once(selector, sock, min(remaining, PUMP_SLICE_S))
                if done():
                    return True
                if rc != mqtt.MQTT_ERR_SUCCESS or (self.connack is not None and not self.connected):
                    raise ConnectionLost(f"connection lost: {self.lost_reason or mqtt.error_string(rc)}")
        return True

    def _pump_once(self, selector: selectors.BaseSelector, sock: Any, timeout: float) -> Any:
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.client.want_write() else 0)
        selector.modify(sock, want)
        # TLS may hold already-decrypted bytes that the socket no longer signals as readable.
        pending = sock.pending() if hasattr(sock, "pending") else 0
        events = 0
        for _key, mask in selector.select(0 if pending else timeout):
            events |= mask
        if events & selectors.EVENT_READ or pending:
            rc = self.client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS or self.client.socket() is None:
                return rc or mqtt.MQTT_ERR_CONN_LOST
        if events & selectors.EVENT_WRITE:
            rc = self.client.loop_write()
            if rc != mqtt.MQTT_ERR_SUCCESS or self.client.socket() is None:
                return rc or mqtt.MQTT_ERR_CONN_LOST
        return self.client.loop_misc()  # keepalive PINGREQ, retries of unacknowledged QoS 1

    def connect(self, host: str, port: int, deadline: float) -> None:
        """TCP connect, then wait for CONNACK. A broker that says no (bad token) raises BrokerRefused."""
        # paho's TCP connect blocks up to connect_timeout (5 s by default): keep it within our deadline.
        self.client.connect_timeout = max(0.1, deadline - time.monotonic())
        try:
            self.client.connect(host, port, keepalive=KEEPALIVE_S)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        try:
            arrived = self.pump_until(lambda: self.connack is not None, deadline)
        except ConnectionLost as exc:
            raise ConnectError(f"{host}:{port} closed the connection before CONNACK") from exc
        if not arrived:
            raise ConnectError(f"no CONNACK from {host}:{port} in time")
        if not self.connected:
            raise BrokerRefused(f"broker refused the connection: {self.connack}")

    def subscribe(self, topic: str, deadline: float) -> None:
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionLost(f"subscribe failed: {mqtt.error_string(rc)}")
        if not self.pump_until(lambda: mid in self.subacks, deadline):
            raise ConnectError(f"no SUBACK for {topic} in time")
        if any(code.is_failure for code in self.subacks[mid]):
            raise BrokerRefused(f"broker refused the subscription to {topic}")

    def publish(self, topic: str, payload: bytes) -> int:
        """Queue a QoS 1 publish and return its mid (see `pubacks`)."""
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"publish failed: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def wait_puback(self, mid: int, deadline: float) -> bool:
        return self.pump_until(lambda: mid in self.pubacks, deadline)

    def next_message(self, deadline: float) -> tuple[str, bytes] | None:
        """The next message received, or None when the deadline passes first."""
        if self.pump_until(lambda: bool(self.messages), deadline):
            return self.messages.popleft()
        return None

    def close(self) -> None:
        """Send DISCONNECT if possible (a clean end, not an error in the broker log) and close the socket."""
        self.connected = False
        # Without a loop thread, paho writes DISCONNECT at once and closes its socket after it.
        with contextlib.suppress(Exception):
            self.client.disconnect()
        sock = self.client.socket()
        if sock is not None:  # DISCONNECT could not be written (connection already broken)
            with contextlib.suppress(OSError):
                sock.close()
