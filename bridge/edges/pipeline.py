"""The claim work of an edge driven by an event loop on an external broker (Mosquitto: `bridge.edges.external`,
RabbitMQ: `bridge.edges.rabbitmq`): claims prepared here, their transactions in the claim-worker process.

This process has CPU to spare: it prepares each claim itself (parse, flood limits, the ECDH: `ClaimPreparer`, a
third of a claim's CPU) and hands the worker a `Prepared`, so that the worker, one process on one core and what
bounds a burst of claims, is left the transaction, the token and the seal. A claim refused before its transaction
(malformed, over a limit) is answered from here at once; its events go to the worker to store. Token refreshes go
to the worker whole.

The edge keeps its broker's side: it admits a request (`BridgeCore.admit`) before `dispatch`, and `answer` (given
to the pipeline) sends the publishes and acknowledges the request; the pipeline calls `BridgeCore.release` after.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from bridge import logs
from bridge.claims.provisioning import ClaimPreparer, Outcome, Prepared, retryable_error
from bridge.claims.ratelimit import FloodLimits
from bridge.config import Settings
from bridge.edges.claimworker import MAX_BATCH
from bridge.edges.core import BridgeCore, Publish, TurnKeys, count_outcome, log_outcome
from bridge.edges.workerlink import WorkerLink
from bridge.storage.rotation import LiveKeyRing
from provwire import topics
from provwire.models import Event

log = logging.getLogger("provbridge.service")

# Claims prepared per turn of the event loop (`_prepare_some`): a few ms of work, the worker's group commit.
PREPARE_CHUNK = MAX_BATCH


class Taken(Protocol):
    """A message taken from the broker: what the claim work reads of it."""

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


R = TypeVar("R", bound=Taken)


class ClaimPipeline(Generic[R]):
    def __init__(self, settings: Settings, core: BridgeCore, answer: Callable[[R, list[Publish]], None]) -> None:
        self.settings = settings
        self.core = core
        self._answer = answer
        self.worker = WorkerLink(settings, self._answered)
        self._claims = topics.claim_subscription(settings.topic_prefix)
        self._requests: dict[int, R] = {}
        self._keys: TurnKeys | None = None  # the data dir's keys, loaded by `start`
        self._preparer: ClaimPreparer | None = None
        self._unprepared: deque[R] = deque()  # claims taken, waiting for `_prepare_some`
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Load the keys and start the claim worker."""
        self._loop = asyncio.get_running_loop()
        # Looked at once per chunk of claims prepared (`_prepare_some`): each claim of a chunk arrived before.
        self._keys = TurnKeys(LiveKeyRing(self.settings.data_dir))
        self._preparer = ClaimPreparer(self.settings, self._keys, FloodLimits(self.settings.claims))
        await self.worker.start()

    async def stop(self) -> None:
        """Hand over what is taken, and let the worker answer all of it before it stops."""
        while self._unprepared:
            self._prepare_some()
        await self.worker.stop()

    def dispatch(self, request: R) -> None:
        """Take an admitted request: a claim to prepare here, anything else (a token refresh) to the worker."""
        if self._preparer is None or not topics.topic_matches(self._claims, request.topic):
            self._requests[self.worker.submit(request.topic, request.payload)] = request
            return
        self._unprepared.append(request)
        if len(self._unprepared) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._prepare_some)

    def record_events(self, events: list[Event]) -> None:
        """Store events made on the edge (a refusal before any claim work), in the worker."""
        self.worker.record_events(events)

    def _prepare_some(self) -> None:
        """Prepare up to PREPARE_CHUNK claims, hand them to the worker in one write, and come back on the next
        turn of the event loop for more. In chunks: a broker hands over hundreds of claims at once in a burst,
        and preparing them all at once would keep the worker's answers unread (the worker then waits on its full
        socket) and every answer unsent for as long."""
        assert self._loop is not None
        try:
            self._turn_keys()
            chunk = [self._unprepared.popleft() for _ in range(min(PREPARE_CHUNK, len(self._unprepared)))]
            steps = [(request, self._prepare(request)) for request in chunk]
            self._hand_over([(request, step) for request, step in steps if isinstance(step, Prepared)])
            refused = [(request, step) for request, step in steps if isinstance(step, Outcome)]
            # Refused before any write: answered from here, their events stored by the worker (one frame).
            self.record_events([event for _, outcome in refused for event in outcome.events])
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

    def _hand_over(self, handed: list[tuple[R, Prepared]]) -> None:
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

    def _settle(self, request: R, outcome: Outcome) -> None:
        """Answer a claim from here and give its in-flight slot back."""
        try:
            self._answer(request, self.core.publishes(outcome))
        except Exception:  # `answer` contains its own failures; this is for making the messages
            log.exception("answer to %s could not be made", request.topic)
        finally:
            self.core.release()

    def _prepare(self, request: R) -> Outcome | Prepared:
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

    def _answered(self, seq: int, publishes: list[Publish]) -> None:
        request = self._requests.pop(seq)
        try:
            self._answer(request, publishes)
        finally:
            self.core.release()
