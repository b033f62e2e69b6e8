"""The bridge on an external broker (Mosquitto) when nothing is mirrored into it, the default: paho driven
by this process's event loop, claim work in a claim-worker process.

The split is the embedded mode's (`bridge.edges.inprocess`): paho's reads and writes run from this
process's event loop (no network thread), the blocking handlers (SQLite) run in the claim worker
(`bridge.edges.workerlink`). On threads they would share one GIL with paho and hand it over at every
SQLite call and syscall; measured on the threaded edge (`bridge.edges.paho`, still used when tokens are
mirrored into dynamic security), that hand-off and the publishing from worker threads cost more CPU than
the claim itself. What a device sees is the same on both: `bridge.edges.pahoedge`.

Unlike the embedded broker's process, this one has CPU to spare: it prepares each claim itself (parse,
flood limits, the ECDH: `ClaimPreparer`, a third of a claim's CPU) and hands the worker a `Prepared`, so
that the worker, one process on one core and what bounds a burst of claims, is left the transaction, the
token and the seal. A claim refused before its transaction (malformed, over a limit) is answered from here
at once; its events go to the worker to store. Token refreshes go to the worker whole.
"""

import asyncio
import logging
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt

from bridge import logs
from bridge.claims.provisioning import ClaimPreparer, Outcome, Prepared, retryable_error
from bridge.claims.ratelimit import FloodLimits
from bridge.config import Settings
from bridge.edges.claimworker import MAX_BATCH
from bridge.edges.coalescing import CoalescingClient, CoalescingSocket
from bridge.edges.core import BridgeCore, Publish, TurnKeys, count_outcome, log_outcome
from bridge.edges.pahoedge import PahoEdge, Request
from bridge.edges.sessions import Shard, set_nodelay
from bridge.edges.workerlink import WorkerLink
from bridge.storage.rotation import LiveKeyRing
from provwire import topics
from provwire.models import Event

log = logging.getLogger("provbridge.service")

RECONNECT_DELAY_SECONDS = (1.0, 10.0)  # first and longest wait between reconnection attempts
MISC_INTERVAL_SECONDS = 1.0  # paho's keepalive and retry bookkeeping (`loop_misc`)
OFFLINE_PUBLISH_TIMEOUT_SECONDS = 2.0
# Claims prepared per turn of the event loop (`_prepare_some`): a few ms of work, the worker's group commit.
PREPARE_CHUNK = MAX_BATCH


class ExternalBridge(PahoEdge):
    # paho's writes wait in the socket for `_writable` to flush them, once per turn of the loop; its reads come
    # from one recv() (bridge/edges/coalescing.py).
    client_class = CoalescingClient

    def __init__(self, settings: Settings, shard: Shard | None = None) -> None:
        super().__init__(BridgeCore(settings), shard)
        self.worker = WorkerLink(settings, self._answered)
        self._requests: dict[int, Request] = {}
        self._claims = topics.claim_subscription(settings.topic_prefix)
        self._keys: TurnKeys | None = None  # the data dir's keys, loaded by `start`
        self._preparer: ClaimPreparer | None = None
        self._unprepared: deque[Request] = deque()  # claims taken, waiting for `_prepare_some`
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
        # Looked at once per chunk of claims prepared (`_prepare_some`): each claim of a chunk arrived before.
        self._keys = TurnKeys(LiveKeyRing(self.settings.data_dir))
        self._preparer = ClaimPreparer(self.settings, self._keys, FloodLimits(self.settings.claims))
        await self.worker.start()
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
        while self._unprepared:  # taken already: handed to the worker, which answers them before it stops
            self._prepare_some()
        await self.worker.stop()
        if self._serving.is_set() and self.shard.owns_status:
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

    # --- the claim work ----------------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        if self._preparer is None or not topics.topic_matches(self._claims, request.topic):
            self._requests[self.worker.submit(request.topic, request.payload)] = request
            return
        self._unprepared.append(request)
        if len(self._unprepared) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._prepare_some)

    def _prepare_some(self) -> None:
        """Prepare up to PREPARE_CHUNK claims, hand them to the worker in one write, and come back on the next
        turn of the event loop for more. In chunks: paho reads hundreds of claims in one call when they come in
        a burst, and preparing them all at once would keep the worker's answers unread (the worker then waits
        on its full socket) and every answer unsent for as long."""
        assert self._loop is not None
        try:
            self._turn_keys()
            chunk = [self._unprepared.popleft() for _ in range(min(PREPARE_CHUNK, len(self._unprepared)))]
            steps = [(request, self._prepare(request)) for request in chunk]
            self._hand_over([(request, step) for request, step in steps if isinstance(step, Prepared)])
            refused = [(request, step) for request, step in steps if isinstance(step, Outcome)]
            # Refused before any write: answered from here, their events stored by the worker (one frame).
            self._record_events([event for _, outcome in refused for event in outcome.events])
            for request, outcome in refused:
                self._settle(request, outcome)
        finally:  # whatever failed, the claims behind are not left waiting
            if self._unprepared:
                self._loop.call_soon(self._prepare_some)

    def _turn_keys(self) -> None:
        assert self._keys is not None
        try:
            self._keys.turn()
        except Exception:  # as the worker's (ClaimHandlers._turn): the previous ring stays, the claims go on
            log.exception("the key ring could not be looked at; keeping the previous one")

    def _hand_over(self, handed: list[tuple[Request, Prepared]]) -> None:
        try:
            seqs = self.worker.submit_prepared([(request.topic, prepared) for request, prepared in handed])
        except Exception:  # cannot happen (a Prepared pickles): answered retry rather than left taken for good
            log.exception("%d prepared claims could not be handed to the claim worker", len(handed))
            for request, prepared in handed:
                retry = retryable_error(self.settings, prepared.request.claim.request_id, "internal error")
                self._settle(request, Outcome(prepared.reply_to, retry, [], "internal_error"))
            return
        for seq, (request, _) in zip(seqs, handed, strict=True):
            self._requests[seq] = request

    def _settle(self, request: Request, outcome: Outcome) -> None:
        """Answer a claim from here and give its in-flight slot back."""
        try:
            self._answer(request, self.core.publishes(outcome))
        except Exception:  # `_answer` contains its own failures; this is for making the messages
            log.exception("answer to %s could not be made", request.topic)
        finally:
            self.core.release()

    def _prepare(self, request: Request) -> Outcome | Prepared:
        assert self._preparer is not None
        with logs.request_scope():  # the claim's request_id tags its lines here, and no later ones
            try:
                step = self._preparer.prepare(request.topic, request.payload)
            except Exception:  # cannot happen (prepare never raises); as the worker would, drop it, live on
                log.exception("claim on %s could not be handled", request.topic)
                step = Outcome(None, None, [], "failed")
            if isinstance(step, Outcome):
                log_outcome(request.topic, step)
                count_outcome(self.settings.topic_prefix, request.topic, step, None)
            return step

    def _record_events(self, events: list[Event]) -> None:
        self.worker.record_events(events)

    def _answered(self, seq: int, publishes: list[Publish]) -> None:
        request = self._requests.pop(seq)
        try:
            self._answer(request, publishes)
        finally:
            self.core.release()
