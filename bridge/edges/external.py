"""The bridge on an external broker (Mosquitto) when nothing is mirrored into it, the default: paho driven
by this process's event loop, claim work in a claim-worker process.

The split is the embedded mode's (`bridge.edges.inprocess`): paho's reads and writes run from this
process's event loop (no network thread), the blocking handlers (SQLite) run in the claim worker
(`bridge.edges.workerlink`). On threads they would share one GIL with paho and hand it over at every
SQLite call and syscall; measured on the threaded edge (`bridge.edges.paho`, still used when tokens are
mirrored into dynamic security), that hand-off and the publishing from worker threads cost more CPU than
the claim itself. What a device sees is the same on both: `bridge.edges.pahoedge`.

Unlike the embedded broker's process, this one has CPU to spare: it prepares each claim itself and hands the
worker what is left of it (`bridge.edges.pipeline`).
"""

import asyncio
import logging
from typing import Any

import paho.mqtt.client as mqtt

from bridge.config import Settings
from bridge.edges.coalescing import CoalescingClient, CoalescingSocket
from bridge.edges.core import BridgeCore
from bridge.edges.pahoedge import PahoEdge, Request
from bridge.edges.pipeline import ClaimPipeline
from bridge.edges.sessions import Shard, set_nodelay
from provwire.models import Event

log = logging.getLogger("provbridge.service")

RECONNECT_DELAY_SECONDS = (1.0, 10.0)  # first and longest wait between reconnection attempts
MISC_INTERVAL_SECONDS = 1.0  # paho's keepalive and retry bookkeeping (`loop_misc`)
OFFLINE_PUBLISH_TIMEOUT_SECONDS = 2.0


class ExternalBridge(PahoEdge):
    # paho's writes wait in the socket for `_writable` to flush them, once per turn of the loop; its reads come
    # from one recv() (bridge/edges/coalescing.py).
    client_class = CoalescingClient

    def __init__(self, settings: Settings, shard: Shard | None = None) -> None:
        super().__init__(BridgeCore(settings), shard)
        self.pipeline: ClaimPipeline[Request] = ClaimPipeline(settings, self.core, self._answer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._misc: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._reconnect_delay = RECONNECT_DELAY_SECONDS[0]  # grows while the broker refuses; reset on CONNACK
        client = self._client
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the claim worker, then connect (retried in the background until the broker answers)."""
        self._loop = asyncio.get_running_loop()
        await self.pipeline.start()
        self._misc = self._loop.create_task(self._misc_loop())
        self._connect()

    async def wait_serving(self, timeout: float) -> bool:
        """True once the broker confirmed the bridge's subscriptions (claims are taken from then on)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._serving.is_set() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self._serving.is_set()

    async def stop(self) -> None:
        """Stop taking claims, let the worker answer those it has, say offline, disconnect."""
        self._stopping.set()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        await self.pipeline.stop()  # what is taken already is answered before the worker stops
        if self._serving.is_set() and self.shard.owns_status(self.settings):
            info = self._publish(self.core.status(online=False))
            deadline = asyncio.get_running_loop().time() + OFFLINE_PUBLISH_TIMEOUT_SECONDS
            while not info.is_published() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        self._client.disconnect()
        if self._misc is not None:
            self._misc.cancel()
            await asyncio.gather(self._misc, return_exceptions=True)

    def _connect(self) -> None:
        try:
            self._client.connect(**self._connect_arguments())
        except (OSError, ValueError) as exc:
            log.warning("cannot reach the broker at %s:%s (%s); retrying", self.endpoint.host, self.endpoint.port, exc)
            self._reconnect_later()

    def _reconnect_later(self) -> None:
        if self._stopping.is_set() or self._loop is None:
            return
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        # paho closes its socket on a lost connection but may still say it is connected (a DISCONNECT
        # from an MQTT 5 broker): no socket is what means "reconnect".
        while not self._stopping.is_set() and self._client.socket() is None:
            await asyncio.sleep(self._reconnect_delay)
            self._reconnect_delay = min(RECONNECT_DELAY_SECONDS[1], self._reconnect_delay * 2)
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
        set_nodelay(client, None, sock)
        assert self._loop is not None
        self._loop.add_reader(sock, self._readable, client, sock)

    def _readable(self, client: mqtt.Client, sock: CoalescingSocket) -> None:
        try:
            client.loop_read()
            # Bytes read into the socket's buffer (or decrypted by TLS) make the socket no more readable.
            while client.socket() is sock and sock.pending():
                client.loop_read()
        finally:  # a callback raised (paho passes it on): what is read already must not wait for the next packet
            if client.socket() is sock and sock.pending():
                assert self._loop is not None
                self._loop.call_soon(self._readable, client, sock)

    def _on_socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, self._writable, client, sock)

    def _on_socket_unregister_write(self, _c: mqtt.Client, _u: Any, _sock: Any) -> None:
        pass  # paho wrote everything into the socket's buffer: `_writable` stops watching once it is sent

    def _writable(self, client: mqtt.Client, sock: CoalescingSocket) -> None:
        """Every packet paho has queued, in one flush; watched until the socket took all of it."""
        client.loop_write()
        if client.socket() is not sock:
            return  # closed by that write (a DISCONNECT), and unwatched by `_on_socket_close`
        try:
            done = sock.flush()
        except OSError as exc:  # paho notices too, at its next read: the connection is lost, reconnect
            log.warning("writing to the broker failed (%s)", exc)
            done = True
        if done and not client.want_write():
            assert self._loop is not None
            self._loop.remove_writer(sock)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self._reconnect_delay = RECONNECT_DELAY_SECONDS[0]
        super()._on_connect(client, userdata, flags, reason, props)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        super()._on_disconnect(client, userdata, flags, reason, props)
        self._reconnect_later()  # no network thread to do it

    # --- the claim work: bridge.edges.pipeline ------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self.pipeline.dispatch(request)

    def _record_events(self, events: list[Event]) -> None:
        self.pipeline.record_events(events)
