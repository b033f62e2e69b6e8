"""What every MQTT edge of the bridge shares, whatever carries the messages.

Two edges move claims and token refreshes in and answers out: `bridge.edges.paho` (a paho client, for
an external broker) and `bridge.edges.inprocess` (inside the embedded amqtt broker, no client at all).
Both take from here:

* `BridgeCore`: the topics the bridge takes, the per-client-id flood limit and the bound on claims in
  flight with their `rate_limited` answers, the turning of an `Outcome` into messages, the status
  payloads. Cheap, non-blocking.
* `ClaimHandlers`: the blocking part, run on a worker (a thread, or the claim-worker process): the
  route from a topic to `Provisioner.handle` / `Refresher.handle`, and the purge of stored answers
  and old events.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from bridge import logs
from bridge.claims.mirror import TokenMirror
from bridge.claims.provisioning import (
    RATE_LIMITED,
    Outcome,
    Prepared,
    Provisioner,
    rate_limited_answer,
    readable_request_id,
    record_events_safely,
    retryable_error,
)
from bridge.claims.ratelimit import check, client_limiter
from bridge.claims.refresh import RATE_LIMITED as REFRESH_RATE_LIMITED
from bridge.claims.refresh import Refresher
from bridge.config import Settings
from bridge.metrics import counters
from bridge.ops.lifecycle import publish_denylist
from bridge.storage.keyfiles import KeyRing
from bridge.storage.rotation import LiveKeyRing
from bridge.storage.store import Store
from provwire import topics
from provwire.errors import ErrorCode
from provwire.models import BridgeStatus, ClaimError, Event, to_json

log = logging.getLogger("provbridge.service")

PURGE_INTERVAL_SECONDS = 600.0

# What a message needs done in the write transaction, once the work before it is done (`ClaimHandlers.prepare`).
Pending = Callable[[], Outcome]
# A route: the answer when nothing is left to write, else what is.
Preparer = Callable[[str, bytes], Outcome | Pending]


@dataclass(frozen=True)
class Publish:
    """One message an edge must send. Answers and events are QoS 1; only the status is retained."""

    topic: str
    payload: bytes
    retain: bool = False
    correlation: bytes | None = None  # MQTT 5 Correlation Data echoed to the requester


@dataclass(frozen=True)
class Throttled:
    """A message refused by the client-id limit: its answer, and the seconds until the client has a token."""

    outcome: Outcome
    wait: float


class BridgeCore:
    """The transport-independent bookkeeping of an edge. Thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = settings.topic_prefix
        self.filters = [topics.claim_subscription(self.prefix), topics.token_subscription(self.prefix)]
        self.client_limit = client_limiter(settings.claims)
        self._in_flight = 0
        self._lock = threading.Lock()

    # --- the client-id limit ---------------------------------------------------------------

    def screen(self, topic: str, payload: bytes, now: float | None = None) -> Throttled | None:
        """The `rate_limited` answer to a message beyond its client id's budget, or None to take it.

        Here rather than in the claim worker: a flood from one client id (guessed keys, junk) is then
        answered at the cost of a dict lookup, and never queues in front of other devices' claims. The
        refusal's event, at most one per client id and minute, is the edge's to record (`record_events`).
        """
        client_id = topics.client_id_of_claim_topic(self.prefix, topic)
        event = RATE_LIMITED
        if client_id is None:
            client_id, event = topics.client_id_of_token_topic(self.prefix, topic), REFRESH_RATE_LIMITED
        if client_id is None:
            return None  # nobody to answer: the worker drops it, with its sampled event
        now = time.time() if now is None else now
        hit = check([(self.client_limit, client_id)], now)
        if hit is None:
            return None
        request = (topics.response_topic(self.prefix, client_id), client_id, lambda: readable_request_id(payload))
        return Throttled(rate_limited_answer("client_id", hit, event, request, now), hit.wait)

    # --- the in-flight bound ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admit(self) -> bool:
        """Take a slot for one message, or False when `claims.max_in_flight` are taken (answer `overloaded`)."""
        with self._lock:
            if self._in_flight >= self.settings.claims.max_in_flight:
                return False
            self._in_flight += 1
        counters.IN_FLIGHT.inc()
        return True

    def release(self) -> None:
        """Give the slot back once the message's answer has been handed to the transport."""
        with self._lock:
            self._in_flight -= 1
        counters.IN_FLIGHT.dec()

    def overloaded(self, topic: str, payload: bytes) -> Outcome:
        """The answer to a message that finds `claims.max_in_flight` taken: retry later. Cheap, non-blocking."""
        return retry_later(self.settings, topic, payload, ErrorCode.RATE_LIMITED, "bridge is busy, retry later")

    # --- what goes out ---------------------------------------------------------------------

    def publishes(
        self, outcome: Outcome, reply_to: str | None = None, correlation: bytes | None = None
    ) -> list[Publish]:
        """The answer, then the events. `reply_to`: an MQTT 5 Response Topic vetted by `is_reply_topic`."""
        out: list[Publish] = []
        if outcome.response_topic is not None and outcome.answer is not None:
            out.append(Publish(reply_to or outcome.response_topic, outcome.answer, correlation=correlation))
        for event in outcome.events:
            out.append(Publish(topics.event_topic(self.prefix, event.tenant, event.event), to_json(event)))
        return out

    def is_reply_topic(self, topic: object, request_topic: str) -> bool:
        """An MQTT 5 Response Topic is honoured only when it is the requester's own response topic.

        Anything else would let a client make the bridge account write to another client's response
        topic, or to events and status, which the bridge account may also write.
        """
        client_id = topics.client_id_of_claim_topic(self.prefix, request_topic) or topics.client_id_of_token_topic(
            self.prefix, request_topic
        )
        return client_id is not None and topic == topics.response_topic(self.prefix, client_id)

    def status(self, online: bool) -> Publish:
        """The retained bridge status (PROTOCOL.md §12)."""
        payload = to_json(BridgeStatus(status="online" if online else "offline"))
        return Publish(topics.status_topic(self.prefix), payload, retain=True)


def retry_later(settings: Settings, topic: str, payload: bytes, code: ErrorCode, message: str) -> Outcome:
    """A retryable answer (`code`, with `claims.retry_after_seconds`) to a message nothing was done for."""
    prefix = settings.topic_prefix
    client_id = topics.client_id_of_claim_topic(prefix, topic) or topics.client_id_of_token_topic(prefix, topic)
    if client_id is None:
        return Outcome(None, None, [], f"dropped: {message}")
    answer = ClaimError(
        request_id=readable_request_id(payload),
        code=code,
        message=message,
        retry_after=settings.claims.retry_after_seconds,
    )
    return Outcome(topics.response_topic(prefix, client_id), to_json(answer), [], code.value)


def log_outcome(topic: str, outcome: Outcome) -> None:
    """The one line every message gets, `claim on TOPIC: SUMMARY`, tagged with the request_id bound in this
    context (`bridge.logs`)."""
    log.info("claim on %s: %s", topic, outcome.summary)


def count_outcome(prefix: str, topic: str, outcome: Outcome, seconds: float | None) -> None:
    """The message's outcome and the bridge's time on it, in the metrics (bridge/metrics)."""
    kind = counters.kind_of(topic, prefix)
    name, _, detail = outcome.summary.partition(": ")
    reason = next((event.reason for event in outcome.events if event.reason), None)
    if reason is None and name == "refused":
        reason = detail  # a refused refresh names its reason in its summary
    counters.MESSAGES.labels(kind, name or "dropped", reason or "").inc()
    if seconds is not None:
        counters.MESSAGE_SECONDS.labels(kind).observe(seconds)


def claim_handlers(
    settings: Settings, store: Store, mirror: TokenMirror | None = None, *, one_thread: bool = False
) -> "ClaimHandlers":
    """The handlers over the data dir's live keys (`provbridge keys rotate` applies without a restart).

    `one_thread`: every message is handled on one thread (the claim-worker process), so the key ring may be
    looked at once per turn (`TurnKeys`) rather than once per claim; worker threads each look for themselves."""
    live = LiveKeyRing(settings.data_dir)
    keys = TurnKeys(live) if one_thread else live
    return ClaimHandlers(settings, Provisioner(settings, store, keys, mirror=mirror))


class TurnKeys:
    """The live key ring (`rotation.LiveKeyRing`), looked at once per turn of `ClaimHandlers` on its one thread (a
    message, or the messages of a group commit) rather than once per claim (a path built and a `stat`: 6 µs, a few per
    cent of the claim worker's CPU per claim in the group commit, bench/worker_cpu.py). A rotation still
    applies from the next message handed over after it: every message of a turn had arrived before the turn
    began, so before the ring was looked at."""

    def __init__(self, live: LiveKeyRing) -> None:
        self.live = live
        self._ring = live.current()

    def turn(self) -> None:
        self._ring = self.live.current()

    def current(self) -> KeyRing:
        return self._ring


class ClaimHandlers:
    """The blocking part: SQLite and crypto. Refreshes share the claims' store, keys and mirror."""

    def __init__(self, settings: Settings, provisioner: Provisioner) -> None:
        self.settings = settings
        self.provisioner = provisioner
        # Called once per answered message, where its request_id is bound: writes its `claim on TOPIC: SUMMARY`
        # line. The claim-worker process puts its own here, so that the edge's process writes the line.
        self.report: Callable[[str, Outcome], None] = log_outcome
        self._started = time.monotonic()  # when the message (or batch) being handled was taken
        # One set of flood limits: a client id's budget covers its claims and its refreshes.
        self.refresher = Refresher(
            settings,
            provisioner.store,
            provisioner.keys,
            provisioner.mirror,
            provisioner.limits,
            device_ca=provisioner.device_ca,
        )
        prefix = settings.topic_prefix
        self.routes: dict[str, Preparer] = {
            topics.claim_subscription(prefix): self._prepare_claim,
            # A refresh is authenticated inside its transaction: refreshes are rare next to claims.
            topics.token_subscription(prefix): lambda topic, payload: partial(self.refresher.handle, topic, payload),
        }

    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Answer one message. Never raises: the bridge must survive anything a message can do."""
        self._turn()
        self._started = time.monotonic()
        step = self.prepare(topic, payload)
        return step if isinstance(step, Outcome) else self.complete(topic, step)

    def prepare(self, topic: str, payload: bytes) -> Outcome | Pending:
        """The work before the write lock (parsing, limits, the ECDH): the answer when nothing is left to write."""
        try:
            step = self._route(topic)(topic, payload)
        except Exception:
            log.exception("claim on %s could not be handled", topic)
            return Outcome(None, None, [], "failed")
        if isinstance(step, Outcome):
            self.report(topic, step)
            count_outcome(self.settings.topic_prefix, topic, step, time.monotonic() - self._started)
        return step

    def complete(self, topic: str, pending: Pending) -> Outcome:
        """The rest, in the write transaction (or a savepoint of `Store.batch`)."""
        outcome = self._complete_unreported(topic, pending)
        self._account(topic, outcome)
        return outcome

    def _complete_unreported(self, topic: str, pending: Pending) -> Outcome:
        try:
            return pending()
        except Exception:
            log.exception("claim on %s could not be handled", topic)
            return Outcome(None, None, [], "failed")

    def _account(self, topic: str, outcome: Outcome, database_error_counted: bool = False) -> None:
        """A completed message's line and metrics: once its writes are committed, or known not to be."""
        self.report(topic, outcome)
        count_outcome(self.settings.topic_prefix, topic, outcome, time.monotonic() - self._started)
        if outcome.summary == ErrorCode.INTERNAL_ERROR.value and not database_error_counted:
            counters.DATABASE_ERRORS.inc()  # or a broker that did not take the token: the write did not happen

    def handle_batch(self, messages: list[tuple[str, bytes | Prepared]]) -> list[Outcome]:
        """Several messages, their writes in one database transaction (`Store.batch`, a group commit).

        A message is its payload, or a claim its edge has prepared already (`ClaimPreparer`). What needs no
        lock (parsing, limits, the ECDH) is done for all of them first, so that another bridge process may
        write meanwhile; then each one's reads, decision and writes are a savepoint of the batch, and the
        answers are handed out only once it committed. If it cannot begin or commit, none of those writes
        happened: each such message is answered `internal_error`, retry. Lines and metrics say what the
        device is answered, so they are made after the commit."""
        self._turn()
        self._started = time.monotonic()
        # Each message's request_id as its preparation, then its completion, bound it (`bind_request_id`): its line
        # is tagged with its own, not the last one the batch bound.
        steps: list[Outcome | Pending] = []
        request_ids: list[str | None] = []
        for topic, message in messages:
            logs.bind_request_id(None)  # a preparer that binds none (a refresh's) must not inherit the last one's
            steps.append(self._step(topic, message))
            prepared = message.request.claim.request_id if isinstance(message, Prepared) else None
            request_ids.append(prepared or logs.current_request_id())  # a Prepared was parsed by the edge
        if all(isinstance(step, Outcome) for step in steps):
            return [step for step in steps if isinstance(step, Outcome)]
        failed = False
        try:
            with self.provisioner.store.batch():
                outcomes: list[Outcome] = []
                for n, ((topic, _), step) in enumerate(zip(messages, steps, strict=True)):
                    if not isinstance(step, Outcome):
                        step = self._complete_unreported(topic, step)
                        request_ids[n] = logs.current_request_id()
                    outcomes.append(step)
        except Exception as exc:  # StorageError, or anything else: the claims are answered, the worker lives
            log.error("a batch of %d messages was not committed: %s", len(messages), exc)
            counters.DATABASE_ERRORS.inc()  # one failed transaction, however many claims it held
            failed = True
            outcomes = [
                step if isinstance(step, Outcome) else self._unwritten(topic, message)
                for (topic, message), step in zip(messages, steps, strict=True)
            ]
        for (topic, _), step, outcome, request_id in zip(messages, steps, outcomes, request_ids, strict=True):
            if not isinstance(step, Outcome):  # those were accounted for by `prepare`
                logs.bind_request_id(request_id)
                self._account(topic, outcome, database_error_counted=failed)
        return outcomes

    def _step(self, topic: str, message: bytes | Prepared) -> Outcome | Pending:
        if isinstance(message, Prepared):
            return partial(self.provisioner.complete, message)
        return self.prepare(topic, message)

    def _unwritten(self, topic: str, message: bytes | Prepared) -> Outcome:
        """The answer to a message whose writes did not happen: `internal_error`, retry."""
        if isinstance(message, Prepared):
            request_id = message.request.claim.request_id
            answer = retryable_error(self.settings, request_id, "storage unavailable")
            return Outcome(message.reply_to, answer, [], ErrorCode.INTERNAL_ERROR.value)
        return retry_later(self.settings, topic, message, ErrorCode.INTERNAL_ERROR, "storage unavailable")

    def _turn(self) -> None:
        keys = self.provisioner.keys
        if isinstance(keys, TurnKeys):
            try:
                keys.turn()
            except Exception:  # LiveKeyRing keeps its last good ring itself; never let a turn fail the messages
                log.exception("the key ring could not be looked at; keeping the previous one")

    def _prepare_claim(self, topic: str, payload: bytes) -> Outcome | Pending:
        step = self.provisioner.prepare(topic, payload)
        return step if isinstance(step, Outcome) else partial(self.provisioner.complete, step)

    def record_events(self, events: list[Event]) -> None:
        """Store events made at the edge (a refusal by the client-id limit). A failure costs only them."""
        record_events_safely(self.provisioner.store, events)

    def _route(self, topic: str) -> Preparer:
        for topic_filter, preparer in self.routes.items():
            if topics.topic_matches(topic_filter, topic):
                return preparer
        return self._prepare_claim  # cannot happen: edges deliver the routes' topics only

    def start_purge(self, stopping: threading.Event) -> None:
        """Run `purge` every 10 minutes until `stopping` is set."""
        threading.Thread(target=self._purge_loop, args=(stopping,), name="answer-purge", daemon=True).start()

    def _purge_loop(self, stopping: threading.Event) -> None:
        while not stopping.wait(PURGE_INTERVAL_SECONDS):
            self.purge(int(time.time()))

    def purge(self, now: int) -> None:
        """One round of the periodic purge: stored answers past their retention, deleted devices no longer on the
        denylist, then old events."""
        store, claims = self.provisioner.store, self.settings.claims
        try:
            purged = store.purge_answers(now - claims.response_retention_seconds)
            if purged:
                log.info("purged %d answers older than the retention window", purged)
        except Exception as exc:
            log.warning("answer purge failed: %s", exc)
        try:
            store.purge_deleted_devices(now)
            publish_denylist(self.settings, store, now)  # repairs a denylist a failed write left behind
        except Exception as exc:
            log.warning("denylist upkeep failed: %s", exc)
        if claims.event_retention_days == 0:
            return  # 0: events are kept forever
        try:
            purged = store.purge_events(now - claims.event_retention_days * 86_400)
            if purged:
                log.info("purged %d events older than %d days", purged, claims.event_retention_days)
        except Exception as exc:
            log.warning("event purge failed: %s", exc)
