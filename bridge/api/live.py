"""The bridge's event flow, live, for the dashboard: what the bridge publishes as ops events and what the broker
says of device connections (PROTOCOL.md §12), read from the broker, not by polling the database.

One MQTT connection per API process (the bridge account, a clean session, a client id of its own that only the
holder of the bridge secret can compute) subscribes to `{prefix}/events/#` and `{prefix}/presence/+` once the first
stream opens, and stays. Each open stream gets its own bounded queue: a stream that cannot keep up loses what does
not fit and is told so (`lagged`), rather than holding memory or the others back. QoS 0: while the API is not
connected nothing is kept for it, so a lost connection is a `lagged` for every stream and a new `ready` once
subscribed again; the dashboard reads lists from the database and the stream only keeps them fresh.

A presence message names a device only; its tenant (for streams of a tenant's token) is looked up here, on the
MQTT thread, with a cache, never on the API's event loop.
"""

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from bridge.config import Settings
from bridge.edges.sessions import bridge_client, bridge_client_id
from bridge.errors import NotFound, TooManyStreams
from bridge.storage.store import Store
from bridge.tls.certificates import bridge_endpoint
from provwire import topics

log = logging.getLogger("provbridge.api")

QUEUE_SIZE = 1000  # per stream
# Per admin token (a dashboard tab holds one): each stream is a queue of up to QUEUE_SIZE items and a connection.
MAX_STREAMS_PER_TOKEN = 8
TENANT_CACHE_SIZE = 100_000  # device id -> tenant name, for presence


@dataclass(frozen=True)
class LiveItem:
    """One thing to tell the dashboard: an ops event (`kind` "event") or a device's presence ("presence")."""

    kind: str  # "event", "presence", or "lagged" (some were lost: re-read the lists)
    tenant: str | None  # the event's tenant, the device's for presence (None: unknown, shown to all-tenant tokens)
    data: dict[str, Any]


LAGGED = LiveItem("lagged", None, {})


@dataclass(eq=False)  # each stream is itself (a member of a set), however alike two are
class Stream:
    """What one open stream has not sent yet."""

    loop: asyncio.AbstractEventLoop
    owner: str  # the admin token's id
    items: "asyncio.Queue[LiveItem]" = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    lagged: bool = False

    def offer(self, item: LiveItem) -> None:
        """On the stream's event loop."""
        if item is LAGGED:
            self.lagged = True
            return
        try:
            self.items.put_nowait(item)
        except asyncio.QueueFull:
            self.lagged = True


def parse(prefix: str, topic: str, payload: bytes) -> LiveItem | None:
    """What a message on the subscribed topics says, or None for anything else (nothing is trusted blindly)."""
    device_id = topics.device_id_of_presence_topic(prefix, topic)
    if device_id is not None:
        if payload not in (topics.PRESENCE_ONLINE, topics.PRESENCE_OFFLINE):
            return None
        data = {"device_id": device_id, "online": payload == topics.PRESENCE_ONLINE, "time": int(time.time())}
        return LiveItem("presence", None, data)
    levels = topic.split("/")
    head = prefix.split("/")
    if levels[: len(head)] != head or len(levels) != len(head) + 3 or levels[len(head)] != "events":
        return None
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    return LiveItem("event", levels[len(head) + 1], event)


class LiveEvents:
    def __init__(self, settings: Settings, store: Callable[[], Store]) -> None:
        self.settings = settings
        self._store = store
        self._streams: set[Stream] = set()
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._tenants: dict[str, str] = {}
        # Raised each time the broker grants the subscriptions: a stream says `ready` when it sees a new one (from
        # then on nothing is missed, until the connection is lost).
        self.subscriptions = 0

    def open(self, loop: asyncio.AbstractEventLoop, owner: str) -> Stream:
        """A new stream for an event loop, fed from now on; `close` it when its client goes. The first one
        connects to the broker (OSError or ConfigError when the bridge secret cannot be read). TooManyStreams
        when `owner` (an admin token's id) holds MAX_STREAMS_PER_TOKEN open streams already."""
        stream = Stream(loop, owner)
        with self._lock:
            if sum(1 for held in self._streams if held.owner == owner) >= MAX_STREAMS_PER_TOKEN:
                raise TooManyStreams(MAX_STREAMS_PER_TOKEN)
            if self._client is None:
                self._client = self._connect()  # may raise: then no stream was added
            self._streams.add(stream)
        return stream

    def close(self, stream: Stream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def stop(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _tell(self, item: LiveItem) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            try:
                stream.loop.call_soon_threadsafe(stream.offer, item)
            except RuntimeError:  # its loop closed
                self.close(stream)

    def _tenant_of(self, device_id: str) -> str | None:
        tenant = self._tenants.get(device_id)
        if tenant is None:
            try:
                tenant = self._store().device(device_id).tenant_name
            except NotFound:
                return None
            if len(self._tenants) >= TENANT_CACHE_SIZE:
                self._tenants.clear()  # a device's tenant never changes; re-reading is only slower
            self._tenants[device_id] = tenant
        return tenant

    def _connect(self) -> mqtt.Client:
        prefix = self.settings.topic_prefix
        client_id = f"{bridge_client_id(self.settings)}-api-{secrets.token_hex(4)}"
        client = bridge_client(self.settings, client_id, persistent=False)
        client.reconnect_delay_set(min_delay=1, max_delay=10)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.warning("live events: the broker refused the API's connection: %s", reason)
                return
            c.subscribe([(f"{prefix}/events/#", 0), (topics.presence_subscription(prefix), 0)])

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
            if any(reason.is_failure for reason in reasons):
                log.warning("live events: the broker refused the API's subscriptions: %s", reasons)
                return
            self.subscriptions += 1

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
            self._tell(LAGGED)  # what is published until we are back is lost to the streams

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            item = parse(prefix, message.topic, bytes(message.payload))
            if item is None:
                return
            if item.kind == "presence":
                item = LiveItem(item.kind, self._tenant_of(str(item.data["device_id"])), item.data)
            self._tell(item)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        endpoint = bridge_endpoint(self.settings)
        client.connect_async(endpoint.host, endpoint.port, keepalive=self.settings.broker.keepalive)
        client.loop_start()
        return client
