"""The bridge's event flow, live, for the dashboard: what the bridge publishes as ops events and what the broker
says of device connections (PROTOCOL.md §12), read from the broker, not by polling the database.

One MQTT connection per API process (the bridge account, a clean session, a client id of its own) subscribes to
`{prefix}/events/#` and `{prefix}/presence/+` once the first stream opens, and stays; each open stream gets its
own bounded queue. A stream that cannot keep up loses what does not fit (it is told so, `lagged`) rather than
holding memory or the others back. QoS 0: while the API is not connected nothing is kept for it; the dashboard
reads lists from the database, the stream only keeps them fresh.
"""

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from bridge.config import Settings
from bridge.edges.sessions import bridge_client
from bridge.tls.certificates import bridge_endpoint
from provwire import topics

log = logging.getLogger("provbridge.api")

QUEUE_SIZE = 1000  # per stream


@dataclass(frozen=True)
class LiveItem:
    """One thing to tell the dashboard: an ops event (`kind` "event") or a device's presence ("presence")."""

    kind: str
    tenant: str | None  # the event's tenant; None for presence (the device's tenant is looked up per stream)
    data: dict[str, Any]


@dataclass(eq=False)  # each stream is itself (a member of a set), however alike two are
class Stream:
    """What one open stream has not sent yet."""

    loop: asyncio.AbstractEventLoop
    items: "asyncio.Queue[LiveItem]" = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    lagged: bool = False

    def offer(self, item: LiveItem) -> None:
        """On the stream's event loop."""
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
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._streams: set[Stream] = set()
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self.subscribed = threading.Event()  # the broker granted the subscriptions: from now on nothing is missed

    def open(self) -> Stream:
        """A new stream, fed from now on; `close` it when its client goes."""
        stream = Stream(asyncio.get_running_loop())
        with self._lock:
            self._streams.add(stream)
            if self._client is None:
                self._client = self._connect()
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

    def _connect(self) -> mqtt.Client:
        prefix = self.settings.topic_prefix
        client_id = f"{self.settings.broker.client_id}-api-{os.getpid()}"
        client = bridge_client(self.settings, client_id, persistent=False)
        client.reconnect_delay_set(min_delay=1, max_delay=10)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.warning("live events: the broker refused the API's connection: %s", reason)
                return
            c.subscribe([(f"{prefix}/events/#", 0), (topics.presence_subscription(prefix), 0)])

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            item = parse(prefix, message.topic, bytes(message.payload))
            if item is None:
                return
            with self._lock:
                streams = list(self._streams)
            for stream in streams:
                try:
                    stream.loop.call_soon_threadsafe(stream.offer, item)
                except RuntimeError:  # its loop closed
                    self.close(stream)

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
            if any(reason.is_failure for reason in reasons):
                log.warning("live events: the broker refused the API's subscriptions: %s", reasons)
                return
            self.subscribed.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        endpoint = bridge_endpoint(self.settings)
        client.connect_async(endpoint.host, endpoint.port, keepalive=self.settings.broker.keepalive)
        client.loop_start()
        return client
