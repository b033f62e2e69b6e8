"""The claim-worker process, seen from the process that moves the bytes: start it, hand it messages,
take its answers, restart it when it dies, stop it within a grace period.

Both edges that keep claim work out of their own process use it: the embedded broker's
(`bridge.edges.inprocess`) and the external broker's (`bridge.edges.external`). Why a process, and the
frames on the socket pair: `bridge.edges.claimworker`.

A message handed to the worker stays in `pending` until its answer is back; if the worker dies it is
restarted and given them again, in order (a claim's replay then returns its stored answer). The worker
never outlives this process: it dies with it however it ends (`bridge.edges.lifeline`), and `stop`
gives it `STOP_GRACE_SECONDS` to answer what it has and exit, then kills it. Everything here runs on
one event loop and must not block.
"""

import asyncio
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bridge.claims.provisioning import Prepared
from bridge.config import Settings
from bridge.edges.claimworker import (
    ANSWER,
    LOG,
    READY,
    SETTINGS,
    Line,
    decode_answer,
    emit_record,
    encode_events,
    encode_prepared,
    encode_request,
    frame,
    split_frames,
)
from bridge.edges.core import Publish
from bridge.errors import WorkerError
from provwire.models import Event

log = logging.getLogger("provbridge.service")

WORKER_START_TIMEOUT_SECONDS = 60.0
WORKER_RESTART_DELAY_SECONDS = 1.0
# From `stop` to the worker gone: its claims answered, then its exit; a worker still there is killed.
# As long as SQLite's busy timeout (bridge.storage.store), so a claim waiting on a busy database still gets its answer.
STOP_GRACE_SECONDS = 10.0
# Bytes written to the worker and not yet read by it past which the edge's refusal events are dropped: a flood
# of refused claims is answered at the edge at once and must not queue without bound behind a busy worker.
# Above what the claims themselves may fill (`claims.max_in_flight`, 10,000, prepared: ~1.2 kB each).
MAX_EVENTS_BACKLOG_BYTES = 16 << 20

# Called with a message's sequence number and the publishes of its answer, on the event loop.
AnswerHandler = Callable[[int, list[Publish]], None]


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    transport: asyncio.Transport
    protocol: "_WorkerProtocol"


class _WorkerProtocol(asyncio.Protocol):
    def __init__(self, link: "WorkerLink", ready: asyncio.Future[None]) -> None:
        self.link = link
        self.ready = ready
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for kind, body in split_frames(self.buffer):
            if kind == ANSWER:
                self.link.answered(*decode_answer(body))
            elif kind == LOG:
                emit_record(body)
            elif kind == READY and not self.ready.done():
                self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(WorkerError("the claim worker exited while starting"))
        self.link.worker_lost(self)


class WorkerLink:
    """One claim-worker process and the messages handed to it; `on_answer` gets each answer once."""

    def __init__(self, settings: Settings, on_answer: AnswerHandler) -> None:
        self.settings = settings
        self._on_answer = on_answer
        self._seq = itertools.count(1)
        # Handed to the worker, not answered yet, in order, as (topic, its frame): resent to a restarted worker.
        self.pending: dict[int, tuple[str, bytes]] = {}
        self._worker: _Worker | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._stopping = False
        self._abandoned = False
        self._stop_deadline: float | None = None  # the end of stop's grace period, on the loop's clock
        self._drained = asyncio.Event()
        self._events_dropped = 0  # refusal events dropped since the worker fell behind (`record_events`)

    @property
    def worker_pid(self) -> int | None:
        """The claim-worker process, while one is running."""
        return None if self._worker is None else self._worker.process.pid

    def submit(self, topic: str, payload: bytes) -> int:
        """Hand one message to the worker (or keep it for the worker being started); its sequence number."""
        seq = next(self._seq)
        data = encode_request(seq, topic, payload)
        self.pending[seq] = (topic, data)
        self._write(data)
        return seq

    def submit_prepared(self, claims: list[tuple[str, Prepared]]) -> list[int]:
        """Hand over claims this process prepared (`ClaimPreparer`), in one write, so that the worker takes
        them as one group commit; their sequence numbers. The worker does their transactions only. All or
        none: if one cannot be encoded, none is handed over (and the exception says why)."""
        seqs = [next(self._seq) for _ in claims]
        frames = [encode_prepared(seq, topic, prepared) for seq, (topic, prepared) in zip(seqs, claims, strict=True)]
        for seq, (topic, _), data in zip(seqs, claims, frames, strict=True):
            self.pending[seq] = (topic, data)
        self._write(b"".join(frames))
        return seqs

    def _write(self, data: bytes) -> None:
        if self._worker is not None and data:  # else it goes with the others once the worker is there
            self._worker.transport.write(data)

    def record_events(self, events: list[Event]) -> None:
        """Events made at the edge (refusals it answered itself), for the worker to store. Best effort, as
        every refusal's event is (`record_events_safely`): lost if no worker runs now (a restart), and dropped,
        with a warning, while the worker is so far behind that `MAX_EVENTS_BACKLOG_BYTES` wait for it."""
        if not events or self._worker is None:
            return
        transport = self._worker.transport
        if transport.get_write_buffer_size() > MAX_EVENTS_BACKLOG_BYTES:
            if not self._events_dropped:
                log.warning(
                    "the claim worker is behind: events of refusals answered here are dropped until it catches up"
                )
            self._events_dropped += len(events)
            return
        if self._events_dropped:
            log.warning("%d events of refusals were dropped while the claim worker was behind", self._events_dropped)
            self._events_dropped = 0
        transport.write(encode_events(events))

    async def start(self) -> None:
        """Start the worker and hand it what was submitted so far."""
        worker = await self._spawn()
        self._adopt(worker)

    def abandon(self) -> None:
        """A start that did not finish: nothing submitted will be answered, `stop` ends the worker at once."""
        self._stopping = self._abandoned = True

    async def stop(self) -> None:
        """Let the worker answer what it has (within the grace period), then end it."""
        self._stopping = True
        self._stop_deadline = asyncio.get_running_loop().time() + STOP_GRACE_SECONDS
        if self._restarting is not None:  # no worker now: what it would answer stays unanswered
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
        if self.pending and self._worker is not None and not self._abandoned:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), self._grace())
            except TimeoutError:
                log.warning("stopping with %d claims unanswered", len(self.pending))
        if self._worker is not None:
            worker, self._worker = self._worker, None  # first: its end must not look like a crash
            await self._end(worker)

    # --- from the worker ---------------------------------------------------------------------

    def answered(self, seq: int, publishes: list[Publish], line: Line | None = None) -> None:
        message = self.pending.pop(seq, None)
        if message is None:
            return  # answered before the worker it was resent to died
        if line is not None and log.isEnabledFor(logging.INFO):  # its line, written here (claimworker says why)
            summary, request_id = line
            # Made as `emit_record` makes the worker's other records: no look-up of this caller's file and line.
            record = log.makeRecord(
                log.name,
                logging.INFO,
                "",
                0,
                "claim on %s: %s",
                (message[0], summary),
                None,
                extra={"request_id": request_id},
            )
            log.handle(record)
        try:
            self._on_answer(seq, publishes)
        finally:
            if not self.pending:
                self._drained.set()

    def worker_lost(self, protocol: _WorkerProtocol) -> None:
        if self._worker is None or self._worker.protocol is not protocol:
            return  # one that never became the worker (it failed to start), or one already replaced
        lost, self._worker = self._worker, None
        if self._stopping:  # nobody will answer what it had: `stop` need not wait, the process is reaped
            self._drained.set()
            asyncio.get_running_loop().create_task(self._end(lost))
            return
        log.error("the claim worker exited; restarting it (%d claims in it are handed over again)", len(self.pending))
        self._restarting = asyncio.get_running_loop().create_task(self._restart(lost))

    # --- the process -------------------------------------------------------------------------

    def _adopt(self, worker: _Worker) -> None:
        for _topic, data in self.pending.values():
            worker.transport.write(data)
        self._worker = worker

    async def _spawn(self) -> _Worker:
        """A started claim worker that said it is ready."""
        ours, theirs = socket.socketpair()
        # Started on the edge's event loop, restarts too (tasks on it, never an executor thread): in
        # `provbridge serve` the main thread, which lasts as long as the process. The worker's parent-death
        # signal fires when the thread that started it ends (bridge.edges.lifeline).
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "bridge.edges.claimworker", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                # Ctrl-C reaches the edge's process, which stops the worker, and not the worker still
                # starting, before it ignores SIGINT. Its life is tied to ours by its parent-death signal.
                start_new_session=True,
            )
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        transport, protocol = await loop.create_unix_connection(lambda: _WorkerProtocol(self, ready), sock=ours)
        transport.write(frame(SETTINGS, pickle.dumps(self.settings)))
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

    async def _restart(self, lost: _Worker) -> None:
        await self._end(lost)  # reaped (killed, should it hang on its way out)
        while self._worker is None:
            await asyncio.sleep(WORKER_RESTART_DELAY_SECONDS)
            try:
                worker = await self._spawn()
            except (WorkerError, OSError) as exc:
                log.error("%s; retrying", exc)
                continue
            self._adopt(worker)
        self._restarting = None
