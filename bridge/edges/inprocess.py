"""The in-process edge of the bridge: inside the embedded amqtt broker, without an MQTT client.

A paho client on loopback would cost a second trip through amqtt's protocol code for every claim
and every answer, and amqtt is the most expensive part of the embedded setup. Here the broker hands
claims and token refreshes to the bridge after its PUBLISH ACL check (`ProvbridgeBroker.
subscribe_in_process`), on its event loop; the blocking handlers (SQLite, crypto) run in the
claim-worker process (`bridge.edges.claimworker`, which says why a process); answers, events and the
retained status go back through the broker's broadcast path (`publish_in_process`), where each
receiving session is checked against the RECEIVE ACL as before.

On the wire nothing changes: answers and events reach subscribers as the paho bridge's QoS 1,
non-retained publishes did, the status is retained, `rate_limited` answers the claims beyond
`claims.max_in_flight`. A message handed to the worker stays here until its answer is back; if the
worker dies it is restarted and given them again (a claim's replay then returns its stored answer).

The worker never outlives this process: it dies with it however it ends (`bridge.edges.lifeline`), and
`stop` gives it `STOP_GRACE_SECONDS` to answer its claims and exit, then kills it.
"""

import asyncio
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
from dataclasses import dataclass

from bridge.config import Settings
from bridge.edges.claimworker import (
    ANSWER,
    LOG,
    READY,
    SETTINGS,
    decode_answer,
    emit_record,
    encode_events,
    encode_request,
    frame,
    split_frames,
)
from bridge.edges.core import BridgeCore, Publish
from bridge.errors import WorkerError
from broker.server import ProvbridgeBroker

log = logging.getLogger("provbridge.service")

WORKER_START_TIMEOUT_SECONDS = 60.0
WORKER_RESTART_DELAY_SECONDS = 1.0
# From `stop` to the worker gone: its claims answered, then its exit; a worker still there is killed.
# As long as SQLite's busy timeout (bridge.storage.store), so a claim waiting on a busy database still gets its answer.
STOP_GRACE_SECONDS = 10.0


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    transport: asyncio.Transport
    protocol: "_WorkerProtocol"


class _WorkerProtocol(asyncio.Protocol):
    def __init__(self, edge: "InProcessBridge", ready: asyncio.Future[None]) -> None:
        self.edge = edge
        self.ready = ready
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for kind, body in split_frames(self.buffer):
            if kind == ANSWER:
                self.edge.answered(*decode_answer(body))
            elif kind == LOG:
                emit_record(body)
            elif kind == READY and not self.ready.done():
                self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(WorkerError("the claim worker exited while starting"))
        self.edge.worker_lost(self)


class InProcessBridge:
    def __init__(self, settings: Settings, broker: ProvbridgeBroker) -> None:
        self.core = BridgeCore(settings)
        self.broker = broker
        self._seq = itertools.count(1)
        # Handed to the worker, not answered yet, in order: resent to a restarted worker.
        self._pending: dict[int, tuple[str, bytes]] = {}
        self._worker: _Worker | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._stopping = False
        self._taking = False  # subscribed to the claim topics (take_claims)
        self._stop_deadline: float | None = None  # the end of stop's grace period, on the loop's clock
        self._drained = asyncio.Event()

    @property
    def worker_pid(self) -> int | None:
        """The claim-worker process, while one is running."""
        return None if self._worker is None else self._worker.process.pid

    def take_claims(self) -> None:
        """Take claims from now on: until `start` has a worker for them they wait in `_pending`.

        `serve` calls it before the broker listens: a claim published between the broker's first
        connection and the worker's start would otherwise be acknowledged and reach no subscriber.
        """
        if not self._taking:
            self.broker.subscribe_in_process(self.core.filters, self._on_message)
            self._taking = True

    async def start(self) -> None:
        """Take claims, start the claim worker, hand it those taken so far, say online. On the broker's loop."""
        self.take_claims()
        try:
            worker = await self._spawn()
        except BaseException:
            self._stopping = True  # what was taken is answered by nobody: the broker stops with this start
            raise
        try:
            for seq, (topic, payload) in self._pending.items():
                worker.transport.write(encode_request(seq, topic, payload))
            self._worker = worker
            await self._retain(self.core.status(online=True))
        except BaseException:  # no worker may outlive a start that did not finish
            self._stopping = True
            self._worker = None  # first: its end must not look like a crash to restart from
            await self._end(worker)
            raise

    async def stop(self) -> None:
        """Stop taking claims, let the worker answer those it has, stop it, say offline.

        The worker is gone within `STOP_GRACE_SECONDS`: one still busy then is killed and reaped.
        """
        self._stopping = True
        self._stop_deadline = asyncio.get_running_loop().time() + STOP_GRACE_SECONDS
        self.broker.unsubscribe_in_process()
        if self._restarting is not None:  # no worker now: what it would answer stays unanswered
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
        if self._pending and self._worker is not None:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), self._grace())
            except TimeoutError:
                log.warning("stopping with %d claims unanswered", len(self._pending))
        if self._worker is not None:
            await self._end(self._worker)
            self._worker = None
        await self._retain(self.core.status(online=False))

    # --- the worker process ----------------------------------------------------------------

    async def _spawn(self) -> _Worker:
        """A started claim worker that said it is ready."""
        ours, theirs = socket.socketpair()
        # Started on the broker's event loop, restarts too (tasks on it, never an executor thread): in
        # `provbridge serve` the main thread, which lasts as long as the process. The worker's parent-death
        # signal fires when the thread that started it ends (bridge.edges.lifeline).
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "bridge.edges.claimworker", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                # Ctrl-C reaches the broker's process, which stops the worker, and not the worker still
                # starting, before it ignores SIGINT. Its life is tied to ours by its parent-death signal.
                start_new_session=True,
            )
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        transport, protocol = await loop.create_unix_connection(lambda: _WorkerProtocol(self, ready), sock=ours)
        transport.write(frame(SETTINGS, pickle.dumps(self.core.settings)))
        worker = _Worker(process, transport, protocol)
        try:
            await asyncio.wait_for(ready, WORKER_START_TIMEOUT_SECONDS)
        except BaseException as exc:  # cancelled too: no worker may outlive a start that did not finish
            await self._end(worker)
            if isinstance(exc, TimeoutError | WorkerError):
                raise WorkerError(f"the claim worker did not start (exit status {process.returncode})") from exc
            raise
        log.info("claim worker running (pid %d)", process.pid)
        return worker

    def _grace(self) -> float:
        """How long a worker may take to stop: `STOP_GRACE_SECONDS`, or what is left of them once stopping."""
        if self._stop_deadline is None:
            return STOP_GRACE_SECONDS
        return max(0.0, self._stop_deadline - asyncio.get_running_loop().time())

    async def _end(self, worker: _Worker) -> None:
        """Ask the worker to stop, give it its grace period, then kill it; reaped either way."""
        worker.transport.close()  # the worker reads the end of its input and exits
        try:
            await asyncio.to_thread(worker.process.wait, self._grace())
        except subprocess.TimeoutExpired:
            log.warning("the claim worker (pid %d) did not stop in time; killing it", worker.process.pid)
        finally:
            if worker.process.poll() is None:  # not stopped in time, or this wait was cancelled (stop)
                worker.process.kill()
                await asyncio.to_thread(worker.process.wait)
            log.info("the claim worker (pid %d) ended with status %s", worker.process.pid, worker.process.returncode)

    def worker_lost(self, protocol: _WorkerProtocol) -> None:
        if self._worker is None or self._worker.protocol is not protocol:
            return  # one that never became the worker (it failed to start), or one already replaced
        lost, self._worker = self._worker, None
        if self._stopping:
            return
        log.error("the claim worker exited; restarting it (%d claims in it are handed over again)", len(self._pending))
        self._restarting = asyncio.get_running_loop().create_task(self._restart(lost))

    async def _restart(self, lost: _Worker) -> None:
        await self._end(lost)  # reaped (killed, should it hang on its way out)
        while self._worker is None:
            await asyncio.sleep(WORKER_RESTART_DELAY_SECONDS)
            try:
                worker = await self._spawn()
            except (WorkerError, OSError) as exc:
                log.error("%s; retrying", exc)
                continue
            for seq, (topic, payload) in self._pending.items():
                worker.transport.write(encode_request(seq, topic, payload))
            self._worker = worker
        self._restarting = None

    # --- event loop: must not block --------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> float:
        """Take one message; return how long the broker should wait before reading more from its sender."""
        if self._stopping:
            return 0.0
        refused = self.core.screen(topic, payload)
        if refused is not None:  # answered here: a flood from one client id never reaches the worker's queue
            self._send(self.core.publishes(refused.outcome))
            if refused.outcome.events and self._worker is not None:  # else lost with a restarting worker: one event
                self._worker.transport.write(encode_events(refused.outcome.events))
            # Its sender is read again when its budget has a token, or after `rate_client_pause_seconds`: a
            # pause of seconds would hold up its PINGREQs and PUBACKs too.
            return min(refused.wait, self.core.settings.claims.rate_client_pause_seconds)
        if not self.core.admit():
            self._send(self.core.publishes(self.core.overloaded(topic, payload)))
            return 0.0
        seq = next(self._seq)
        self._pending[seq] = (topic, payload)
        if self._worker is not None:  # else it goes with the others once the worker is back
            self._worker.transport.write(encode_request(seq, topic, payload))
        return 0.0

    def answered(self, seq: int, publishes: list[Publish]) -> None:
        if self._pending.pop(seq, None) is None:
            return  # answered before the worker it was resent to died
        try:
            self._send(publishes)
        finally:
            self.core.release()
        if not self._pending:
            self._drained.set()

    def _send(self, publishes: list[Publish]) -> None:
        for publish in publishes:
            self.broker.publish_in_process(publish.topic, publish.payload)

    async def _retain(self, publish: Publish) -> None:
        await self.broker.retain_in_process(publish.topic, publish.payload)
