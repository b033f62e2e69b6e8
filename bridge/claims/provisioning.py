"""Turning one claim into one answer.

The decisions are pure functions over data (`parse_claim`, `key_denial`, `reclaim_action`; the
token and sealed credentials come from `bridge.claims.credentials`, shared with token refresh);
`Provisioner.handle` runs them inside one database transaction, so a
claim either creates everything (device row, key use, stored answer, events) or nothing.
"""

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography import x509
from pydantic import BaseModel, ValidationError

from bridge import logs
from bridge.claims import identifiers
from bridge.claims.credentials import (
    DEFAULT_CERTIFICATE_VALIDITY_SECONDS,
    CertificateOrder,
    device_key_of,
    issue_certificate,
    issue_credentials,
    sealed_answer,
)
from bridge.claims.decision import (
    NO_TENANT,
    Action,
    Answered,
    ClaimFacts,
    ClaimRequest,
    Fresh,
    Granted,
    claim_event,
    decide,
    new_event,
)
from bridge.claims.mirror import NoMirror, TokenMirror
from bridge.claims.ratelimit import FloodLimits, LimitHit, RateLimiter, check
from bridge.config import Settings
from bridge.errors import ConfigError, MirrorError, NotInitialised, StorageError
from bridge.metrics import counters
from bridge.storage.keyfiles import KeyRing
from bridge.storage.rotation import KeySource, current_ring
from bridge.storage.store import Store, Transaction
from bridge.tls.device_ca import DeviceCaSource
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import (
    MAX_CLAIM_BYTES,
    Claim,
    ClaimError,
    Event,
    FieldError,
    to_json,
)

log = logging.getLogger("provbridge.claims")

M = TypeVar("M", bound=BaseModel)
RATE_LIMITED = "claim.rate_limited"
REJECTED = "claim.rejected"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{8,64}")


@dataclass(frozen=True)
class Outcome:
    """What the MQTT edge must publish. `answer` is None when the claim cannot be answered."""

    response_topic: str | None
    answer: bytes | None
    events: list[Event] = field(default_factory=list)
    summary: str = ""


# --- pure decisions -------------------------------------------------------------------------


class _Members(dict[str, Any]):
    """A decoded JSON object that remembers the names it had more than once (the last value is kept)."""

    duplicates: tuple[str, ...] = ()


def _members(pairs: list[tuple[str, Any]]) -> _Members:
    obj = _Members(pairs)
    if len(obj) != len(pairs):
        obj.duplicates = tuple(name for name, n in Counter(name for name, _ in pairs).items() if n > 1)
    return obj


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")


def _decode(payload: bytes) -> tuple[Any, bool]:
    """The payload with every object a `_Members` (None when it is not JSON), and whether any object
    had a member twice (so that the search for where is skipped for the usual claim)."""
    twice: list[_Members] = []

    def hook(pairs: list[tuple[str, Any]]) -> _Members:
        obj = _members(pairs)
        if obj.duplicates:
            twice.append(obj)
        return obj

    try:
        # parse_constant: Python's json (like pydantic's parser) reads NaN, Infinity and -Infinity; RFC 8259 does not.
        return json.loads(payload, object_pairs_hook=hook, parse_constant=_not_json), bool(twice)
    except (ValueError, RecursionError):
        return None, False


NOT_JSON = FieldError(field="", message="Invalid JSON: NaN, Infinity and -Infinity are not JSON numbers")


def duplicate_members(document: Any) -> list[str]:
    """Dotted paths (as in `errors[].field`) of the members sent twice in one object, anywhere in `document`.

    Rejected rather than resolved: JSON parsers disagree on which copy wins (Python and pydantic keep the
    last, cJSON and many firmware parsers the first), so a claim with two `provision_key`s or two
    `hardware_id`s could mean one thing to the device, a proxy or a log reader and another to the bridge.
    """
    found: list[str] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), document)]
    while stack:  # iterative: the document may be as deep as the JSON parser allows
        path, node = stack.pop()
        if isinstance(node, _Members):
            found += [".".join(str(p) for p in (*path, name)) for name in node.duplicates]
            stack += [((*path, name), value) for name, value in node.items()]
        elif isinstance(node, list):
            stack += [((*path, index), value) for index, value in enumerate(node)]
    return sorted(found)


def _request_id_of(document: Any) -> str | None:
    if not isinstance(document, _Members) or "request_id" in document.duplicates:
        return None  # two request_ids: echoing either could match the wrong retry
    value = document.get("request_id")
    return value if isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value) else None


def readable_request_id(payload: bytes) -> str | None:
    """The request_id of an invalid claim, when it can still be read, so the device can match the error."""
    return _request_id_of(_decode(payload)[0])


def parse_claim(payload: bytes) -> Claim | ClaimError:
    return parse_request(Claim, payload, MAX_CLAIM_BYTES, "claim")


def parse_request(model: type[M], payload: bytes, max_bytes: int, what: str) -> M | ClaimError:
    """A device's message as `model`, or the validation_error answer that tells it which fields are wrong."""
    if len(payload) > max_bytes:
        return ClaimError(
            code=ErrorCode.VALIDATION_ERROR,
            message=f"{what} is larger than {max_bytes} bytes",
            errors=[FieldError(field="", message="payload too large")],
        )
    try:
        parsed: M | None = model.model_validate_json(payload)
        problems = []
    except ValidationError as exc:
        parsed = None
        # Messages only, never `input`: a bad claim may still carry a provisioning key.
        problems = exc.errors(include_url=False, include_input=False)
    # Not JSON (to the parser that decides) or not an object: no request_id can be trusted from it, even
    # one a more lenient parser would read (Python's json takes lone surrogates, a BOM, UTF-16).
    if any(not e["loc"] for e in problems):
        document, twice = None, False
    else:
        document, twice = _decode(payload)
        if document is None:  # pydantic read it and strict JSON does not: NaN or an infinity
            return ClaimError(code=ErrorCode.VALIDATION_ERROR, message=f"{what} is not valid", errors=[NOT_JSON])
    duplicates = duplicate_members(document) if twice else []
    if parsed is not None and not duplicates:
        return parsed
    errors = [FieldError(field=path, message="member appears more than once") for path in duplicates]
    errors += [FieldError(field=".".join(str(p) for p in e["loc"]), message=e["msg"]) for e in problems]
    return ClaimError(
        request_id=_request_id_of(document),
        code=ErrorCode.VALIDATION_ERROR,
        message=f"{what} is not valid",
        errors=errors[:20],
    )


def claim_digest(claim: Claim) -> bytes:
    return hashlib.sha256(claim.model_dump_json().encode("utf-8")).digest()


# --- the orchestration ----------------------------------------------------------------------


def retryable_error(settings: Settings, request_id: str | None, message: str) -> bytes:
    return to_json(
        ClaimError(
            request_id=request_id,
            code=ErrorCode.INTERNAL_ERROR,
            message=message,
            retry_after=settings.claims.retry_after_seconds,
        )
    )


def record_events_safely(store: Store, events: list[Event]) -> None:
    """Store events outside a transaction (refusals that change nothing else); a failure only costs the events."""
    if not events:
        return
    try:
        store.add_events(events)
    except StorageError as exc:
        log.warning("could not record %d event(s): %s", len(events), exc)


def sampled(limits: FloodLimits, events: list[Event], now: float) -> list[Event]:
    """The events to store and publish: those with no tenant (anyone can cause them at will: junk, unknown keys)
    pass a budget per (event, reason), `claims.rate_events_*`, so a flood from ever-fresh client ids that no
    per-client limit catches still cannot add one row per message. Tenant events are bounded by the key limits."""
    kept = [
        e for e in events if e.tenant != NO_TENANT or check([(limits.events, f"{e.event}:{e.reason}")], now) is None
    ]
    if len(kept) < len(events):
        log.debug("%d event(s) beyond the events budget were dropped", len(events) - len(kept))
    return kept


def rate_limited(
    limits: FloodLimits,
    event: str,
    request: tuple[str, str, Callable[[], str | None]],
    checks: list[tuple[RateLimiter, str]],
    now: float,
) -> Outcome | None:
    """None when every (limiter, key) of `checks` has a token (then all are spent), else the rate_limited answer.

    `request` is (reply topic, client id, its request id: called only on a refusal, as it may need a parse).
    """
    hit = check(checks, now)
    return None if hit is None else rate_limited_answer(limits.name(hit.limiter), hit, event, request, now)


def rate_limited_answer(
    reason: str, hit: LimitHit, event: str, request: tuple[str, str, Callable[[], str | None]], now: float
) -> Outcome:
    """The `rate_limited` answer to a refusal by the limit named `reason`. Creates nothing.

    Its `event` (for the caller to store and publish) comes at most once per key and minute
    (ratelimit.REPORT_INTERVAL_SECONDS), so that a flood of refused messages is not a flood of event rows.
    """
    reply_to, client_id, request_id_of = request
    request_id = request_id_of()
    events: list[Event] = []
    if hit.report:
        events.append(new_event(event, now, NO_TENANT, client_id=client_id, request_id=request_id, reason=reason))
        if hit.suppressed:
            log.warning("%s: %d more refusals by the %s limit were not reported", event, hit.suppressed, reason)
    answer = ClaimError(
        request_id=request_id, code=ErrorCode.RATE_LIMITED, message="too many requests", retry_after=hit.retry_after
    )
    counters.FLOOD_REFUSALS.labels(reason).inc()
    return Outcome(reply_to, to_json(answer), events, "rate_limited")


def admit(
    limits: FloodLimits, prefix: str, client_id: str | None, now: float, rejected_event: str
) -> tuple[str, str] | Outcome:
    """(client id, response topic) of a message to answer, or the Outcome of one dropped, its events for the
    caller to store."""
    logs.bind_request_id(None)  # this context's log lines stop belonging to the previous message
    if client_id is None:  # not our topic, or its client id is invalid: nobody to answer
        events = sampled(limits, [new_event(rejected_event, now, NO_TENANT, reason="invalid_client_id")], now)
        return Outcome(None, None, events, "dropped: invalid client id in topic")
    # The client-id limit was applied by the edge (`BridgeCore.screen`), before the message came here.
    return client_id, topics.response_topic(prefix, client_id)


class RequestHandler:
    """What claims and token refreshes share: their state, and what happens before the payload is parsed."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        keys: KeyRing | KeySource,
        mirror: TokenMirror | None = None,
        limits: FloodLimits | None = None,
        device_ca: DeviceCaSource | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys  # a KeySource (`rotation.LiveKeyRing`) follows key rotations without a restart
        self.mirror: TokenMirror = mirror or NoMirror()
        self.device_ca = device_ca or DeviceCaSource(settings.data_dir)
        self.limits = limits or FloodLimits(settings.claims)
        self.prefix = settings.topic_prefix

    def _admit(self, client_id: str | None, now: float, rejected_event: str) -> tuple[str, str] | Outcome:
        """(client id, response topic) of a message to answer, or the Outcome of one dropped (its events stored)."""
        admitted = admit(self.limits, self.prefix, client_id, now, rejected_event)
        if isinstance(admitted, Outcome):
            record_events_safely(self.store, admitted.events)
        return admitted

    def certificate_order(self, csr: x509.CertificateSigningRequest, validity_seconds: int | None) -> CertificateOrder:
        """What signing a certificate for `csr` takes: the device CA, the key's validity, a fresh serial number."""
        validity = validity_seconds or DEFAULT_CERTIFICATE_VALIDITY_SECONDS
        return CertificateOrder(self.device_ca.get(), csr, validity, x509.random_serial_number())


@dataclass(frozen=True)
class Prepared:
    """A claim ready for its transaction (`ClaimPreparer.prepare`): parsed, within its limits, its ECDH
    done and its ids drawn, so that the write lock is held for the reads, the decision and the writes only.

    Picklable: the external broker's edge prepares claims in its own process and hands them to the claim
    worker this way (`bridge.edges.claimworker`)."""

    reply_to: str
    request: ClaimRequest
    shared: bytes = field(repr=False)
    fresh: Fresh = field(repr=False)


class ClaimPreparer:
    """The work on a claim before its transaction: edge → parse → limits → the ECDH. No storage: the events of
    a refusal travel in its Outcome, for the caller to store (`Provisioner.prepare`, or the external edge,
    which hands them to its claim worker)."""

    def __init__(self, settings: Settings, keys: KeyRing | KeySource, limits: FloodLimits) -> None:
        self.settings = settings
        self.keys = keys
        self.limits = limits
        self.prefix = settings.topic_prefix

    def prepare(self, topic: str, payload: bytes, now: float | None = None) -> Outcome | Prepared:
        """The answer when there is nothing to write (a refusal, a malformed claim), else the claim
        `Provisioner.complete` finishes. Never raises."""
        now = time.time() if now is None else now
        admitted = admit(self.limits, self.prefix, topics.client_id_of_claim_topic(self.prefix, topic), now, REJECTED)
        if isinstance(admitted, Outcome):
            return admitted
        client_id, reply_to = admitted

        parsed = parse_claim(payload)
        logs.bind_request_id(parsed.request_id)
        if isinstance(parsed, ClaimError):
            event = new_event(
                REJECTED, now, NO_TENANT, client_id=client_id, request_id=parsed.request_id, reason="validation_error"
            )
            return Outcome(reply_to, to_json(parsed), sampled(self.limits, [event], now), "validation_error")

        # Before the ECDH and the write lock. Unknown keys are limited like known ones: nothing is looked up yet.
        # The device limit is keyed by (hardware_id, key): someone without the key cannot use up a device's budget.
        key_hash = identifiers.digest(identifiers.normalise_key(parsed.provision_key))
        checks = [(self.limits.device, f"{parsed.hardware_id}\n{key_hash.hex()}")]
        if identifiers.is_human_code(parsed.provision_key):
            checks += [(self.limits.code, key_hash.hex()), (self.limits.all_codes, "all")]
        else:
            checks.append((self.limits.key, key_hash.hex()))
        request = (reply_to, client_id, lambda: parsed.request_id)
        limited = rate_limited(self.limits, RATE_LIMITED, request, checks, now)
        if limited is not None:
            return limited

        try:
            return self._prepare(reply_to, client_id, parsed, key_hash, now)
        except Exception:
            log.exception("claim %s: unexpected failure", parsed.request_id)
            internal = retryable_error(self.settings, parsed.request_id, "internal error")
            return Outcome(reply_to, internal, [], "internal_error")

    def _prepare(self, reply_to: str, client_id: str, claim: Claim, key_hash: bytes, now: float) -> Outcome | Prepared:
        keys = current_ring(self.keys)  # one snapshot per claim: a rotation mid-claim must not mix kids
        cloud_kid = claim.cloud_key_id or keys.active_cloud
        request = ClaimRequest(client_id, claim, claim_digest(claim), key_hash, cloud_kid, now)
        cloud_key = keys.cloud.get(cloud_kid)
        if cloud_key is None:
            rejected = claim_event(request, REJECTED, NO_TENANT, reason="unknown_cloud_key")
            unknown = [FieldError(field="cloud_key_id", message="unknown cloud key id")]
            error = ClaimError(
                request_id=claim.request_id,
                code=ErrorCode.VALIDATION_ERROR,
                message="claim is not valid",
                errors=unknown,
            )
            return Outcome(reply_to, to_json(error), sampled(self.limits, [rejected], now), REJECTED)
        # The expensive, side-effect-free work happens before the write lock is taken.
        shared = crypto.shared_secret(cloud_key, crypto.public_key_from_sec1(claim.public_key_sec1))
        fresh = Fresh(device_id=identifiers.new_device_id(now), api_key=identifiers.new_api_key())
        return Prepared(reply_to, request, shared, fresh)


class Provisioner(RequestHandler):
    """Claims: `prepare` (no lock) then `complete` (the transaction), or both in `handle`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preparer = ClaimPreparer(self.settings, self.keys, self.limits)

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> Outcome:
        """Answer one claim message. Never raises: every failure becomes an answer or a drop."""
        step = self.prepare(topic, payload, now)
        return step if isinstance(step, Outcome) else self.complete(step)

    def prepare(self, topic: str, payload: bytes, now: float | None = None) -> Outcome | Prepared:
        """`ClaimPreparer.prepare`, the events of a refusal stored. Never raises."""
        step = self.preparer.prepare(topic, payload, now)
        if isinstance(step, Outcome):
            record_events_safely(self.store, step.events)
        return step

    def complete(self, prepared: Prepared) -> Outcome:
        """read → decide → apply, in one transaction (or a savepoint of `Store.batch`). Never raises."""
        reply_to, request_id = prepared.reply_to, prepared.request.claim.request_id
        logs.bind_request_id(request_id)  # others may have been prepared since (`ClaimHandlers.handle_batch`)
        try:
            answer, events = self._apply(prepared)
        except StorageError as exc:
            log.error("claim %s: storage failure: %s", request_id, exc)
            return Outcome(reply_to, self._retryable(request_id, "storage unavailable"), [], "internal_error")
        except MirrorError as exc:
            log.error("claim %s: broker did not take the token: %s", request_id, exc)
            return Outcome(reply_to, self._retryable(request_id, "broker unavailable"), [], "internal_error")
        except (NotInitialised, ConfigError) as exc:  # the device CA: missing, or its files unusable
            log.error("claim %s: cannot sign a device certificate: %s", request_id, exc)
            return Outcome(
                reply_to, self._retryable(request_id, "certificate authority unavailable"), [], "internal_error"
            )
        except Exception:
            log.exception("claim %s: unexpected failure", request_id)
            return Outcome(reply_to, self._retryable(request_id, "internal error"), [], "internal_error")
        return Outcome(reply_to, answer, events, events[0].event if events else "replayed")

    def _retryable(self, request_id: str | None, message: str) -> bytes:
        return retryable_error(self.settings, request_id, message)

    def _apply(self, prepared: Prepared) -> tuple[bytes, list[Event]]:
        """read → decide → apply: the answer and the events stored with it."""
        request, shared, now = prepared.request, prepared.shared, prepared.request.now
        keys = current_ring(self.keys)  # the token key: a rotation since the claim was prepared applies
        with self.store.transaction() as tx:
            verdict = decide(request, self._read(tx, request), prepared.fresh)
            answer = (
                verdict.answer if isinstance(verdict, Answered) else self._grant(tx, request, verdict, keys, shared)
            )
            events = sampled(self.limits, verdict.events, now)
            for event in events:
                tx.add_event(event)
            return answer, events

    def _read(self, tx: Transaction, request: ClaimRequest) -> ClaimFacts:
        """What `decide` needs, read inside the transaction (a replay needs nothing more)."""
        not_before = int(request.now) - self.settings.claims.response_retention_seconds
        stored = tx.stored_answer(request.client_id, request.claim.request_id, not_before)
        if stored is not None:
            return ClaimFacts(stored, None, None)
        key = tx.key_by_hash(request.key_hash)
        if key is None:
            return ClaimFacts(None, None, None)
        device = tx.device_by_hardware_id(key.tenant_id, request.claim.hardware_id)
        entry = None if device is not None else tx.allowlist_entry(key.tenant_id, request.claim.hardware_id)
        return ClaimFacts(None, key, device, entry)

    def _grant(self, tx: Transaction, request: ClaimRequest, granted: Granted, keys: KeyRing, shared: bytes) -> bytes:
        """Write the granted device's rows, mint its token and seal its credentials; the answer, stored for replays."""
        device, now = granted.device, int(request.now)
        if granted.action is Action.CREATE:
            entry = granted.entry
            preset = None if entry is None else entry.api_key_hash  # an admin-made API key, shown to the admin
            tx.insert_device(device, preset or identifiers.digest(granted.api_key))
            if entry is not None:
                tx.consume_allowlist_entry(entry.tenant_id, entry.hardware_id)
        elif granted.action is Action.ROTATE:
            tx.rotate_device_key(device, identifiers.digest(granted.api_key), now)
        if granted.spends_use:
            tx.spend_key_use(granted.key.id)
        request_id = request.claim.request_id
        csr = request.claim.parsed_csr
        if device.credential_type == "certificate" and csr is not None:  # decide checked that they go together
            order = self.certificate_order(csr, granted.key.certificate_validity_seconds)
            credentials, issued = issue_certificate(self.settings, order, device, granted.api_key, request_id, now)
            tx.record_certificate(issued)
        else:
            # Inside the transaction on purpose: with dynamic security the mirror tells Mosquitto the token here,
            # and a MirrorError rolls the claim back, so no device holds a token its broker does not know; the
            # janitor's invariant (bridge/mosquitto/janitor.py: no grant in flight while it holds the write lock)
            # rests on it.
            credentials = issue_credentials(self.settings, keys, self.mirror, device, granted.api_key, now)
        created = granted.action is Action.CREATE
        ok = sealed_answer(request_id, device, created, request.cloud_kid, shared, credentials)
        answer = to_json(ok)
        tx.store_answer(request.client_id, request_id, request.digest, answer, now)
        return answer


def device_key(store: Store, keys: KeyRing | KeySource, device_id: str) -> bytes:
    """The long-term device key of a device, for trusted backend code (HMACs, payload encryption).

    Re-derived from the cloud private key the device claimed with and its stored public key; it is
    never stored nor transmitted.
    """
    return device_key_of(store.device(device_id), current_ring(keys))
