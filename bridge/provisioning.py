"""Turning one claim into one answer.

The decisions are pure functions over data (`parse_claim`, `key_denial`, `reclaim_action`; the
token and sealed credentials come from `bridge.credentials`, shared with token refresh);
`Provisioner.handle` runs them inside one database transaction, so a
claim either creates everything (device row, key use, stored answer, events) or nothing.
"""

import hashlib
import json
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from bridge import hardware_pattern, logs, secrets
from bridge.config import Settings
from bridge.credentials import device_key_of, issue_credentials, sealed_answer
from bridge.errors import InvalidPattern, StorageError
from bridge.keyfiles import KeyRing
from bridge.mirror import MirrorError, NoMirror, TokenMirror
from bridge.ratelimit import FloodLimits, RateLimiter, Refusal, check
from bridge.rotation import KeySource, current_ring
from bridge.store import Device, ProvisionKey, Store
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import (
    MAX_CLAIM_BYTES,
    Claim,
    ClaimError,
    ClaimOk,
    Event,
    FieldError,
    rfc3339,
    to_json,
)

log = logging.getLogger("provbridge.claims")

NO_TENANT = "_"
M = TypeVar("M", bound=BaseModel)
DENIED_MESSAGE = "provisioning key not accepted"
RATE_LIMITED = "claim.rate_limited"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{8,64}")


class Denial(StrEnum):
    """Why a key was refused. Only ops see this; the device gets one uniform permission_denied."""

    UNKNOWN_KEY = "unknown_key"
    KEY_REVOKED = "key_revoked"
    KEY_EXPIRED = "key_expired"
    KEY_EXHAUSTED = "key_exhausted"
    HARDWARE_ID_MISMATCH = "hardware_id_mismatch"
    HARDWARE_ID_PATTERN_INVALID = "hardware_id_pattern_invalid"  # stored before RE2, and RE2 cannot run it
    DEVICE_REVOKED = "device_revoked"


class Action(StrEnum):
    CREATE = "create"
    RECLAIM = "reclaim"
    ROTATE = "rotate"
    EXISTS = "exists"
    REVOKED = "revoked"


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


def key_denial(key: ProvisionKey | None, hardware_id: str, now: float) -> Denial | None:
    """Whether a key may be used at all (exhaustion is checked only when a device is created)."""
    if key is None:
        return Denial.UNKNOWN_KEY
    if key.status != "active":
        return Denial.KEY_REVOKED
    if key.expires_at is not None and now >= key.expires_at:
        return Denial.KEY_EXPIRED
    if key.hardware_id_pattern:
        try:
            if not hardware_pattern.fullmatch(key.hardware_id_pattern, hardware_id):
                return Denial.HARDWARE_ID_MISMATCH
        except InvalidPattern:  # fail closed: `provbridge doctor` names the key
            return Denial.HARDWARE_ID_PATTERN_INVALID
    return None


def is_exhausted(key: ProvisionKey) -> bool:
    return key.max_registrations is not None and key.registrations >= key.max_registrations


def reclaim_action(device: Device | None, public_key: bytes, key: ProvisionKey) -> Action:
    if device is None:
        return Action.CREATE
    if device.status != "active":
        return Action.REVOKED
    if device.public_key == public_key:
        return Action.RECLAIM
    # A leaked provisioning key must not let anyone take over a device: only the key that created it
    # may replace its public key, and only if the operator opted in.
    return Action.ROTATE if key.reclaim_policy == "rotate" and device.key_id == key.id else Action.EXISTS


def claim_digest(claim: Claim) -> bytes:
    return hashlib.sha256(claim.model_dump_json().encode("utf-8")).digest()


# --- the orchestration ----------------------------------------------------------------------


@dataclass
class _Context:
    client_id: str
    claim: Claim
    now: float
    keys: KeyRing  # one snapshot per claim: a rotation mid-claim must not mix a key with another kid
    events: list[Event] = field(default_factory=list)


def retryable_error(settings: Settings, request_id: str | None, message: str) -> bytes:
    return to_json(
        ClaimError(
            request_id=request_id,
            code=ErrorCode.INTERNAL_ERROR,
            message=message,
            retry_after=settings.claims.retry_after_seconds,
        )
    )


def new_event(name: str, now: float, tenant: str, **fields: Any) -> Event:
    return Event(event=name, time=rfc3339(now), tenant=tenant, **fields)


def record_events_safely(store: Store, events: list[Event]) -> None:
    """Store events outside a transaction (refusals that change nothing else); a failure only costs the events."""
    try:
        for e in events:
            store.add_event(e.time, e.tenant, e.event, e.model_dump_json(exclude_none=True))
    except (StorageError, sqlite3.Error) as exc:
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
    if hit is None:
        return None
    limiter, _, refusal = hit
    return refused(limits.name(limiter), refusal, event, request, now)


def refused(
    reason: str, refusal: Refusal, event: str, request: tuple[str, str, Callable[[], str | None]], now: float
) -> Outcome:
    """The `rate_limited` answer to a refusal by the limit named `reason`. Creates nothing.

    Its `event` (for the caller to store and publish) comes at most once per key and minute
    (ratelimit.REPORT_INTERVAL_SECONDS), so that a flood of refused messages is not a flood of event rows.
    """
    reply_to, client_id, request_id_of = request
    request_id = request_id_of()
    events: list[Event] = []
    if refusal.report:
        events.append(new_event(event, now, NO_TENANT, client_id=client_id, request_id=request_id, reason=reason))
        if refusal.suppressed:
            log.warning("%s: %d more refusals by the %s limit were not reported", event, refusal.suppressed, reason)
    answer = ClaimError(
        request_id=request_id, code=ErrorCode.RATE_LIMITED, message="too many requests", retry_after=refusal.retry_after
    )
    return Outcome(reply_to, to_json(answer), events, "rate_limited")


class RequestHandler:
    """What claims and token refreshes share: their state, and what happens before the payload is parsed."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        keys: KeyRing | KeySource,
        mirror: TokenMirror | None = None,
        limits: FloodLimits | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys  # a KeySource (`rotation.LiveKeyRing`) follows key rotations without a restart
        self.mirror: TokenMirror = mirror or NoMirror()
        self.limits = limits or FloodLimits(settings.claims)
        self.prefix = settings.topic_prefix

    def _admit(self, client_id: str | None, now: float, rejected_event: str) -> tuple[str, str] | Outcome:
        """(client id, response topic) of a message to answer, or the Outcome of one dropped."""
        logs.bind_request_id(None)  # this context's log lines stop belonging to the previous message
        if client_id is None:  # not our topic, or its client id is invalid: nobody to answer
            events = sampled(self.limits, [new_event(rejected_event, now, NO_TENANT, reason="invalid_client_id")], now)
            record_events_safely(self.store, events)
            return Outcome(None, None, events, "dropped: invalid client id in topic")
        # The client-id limit was applied by the edge (`BridgeCore.screen`), before the message came here.
        return client_id, topics.response_topic(self.prefix, client_id)


class Provisioner(RequestHandler):
    def handle(self, topic: str, payload: bytes, now: float | None = None) -> Outcome:
        """Answer one claim message. Never raises: every failure becomes an answer or a drop."""
        now = time.time() if now is None else now
        admitted = self._admit(topics.client_id_of_claim_topic(self.prefix, topic), now, "claim.rejected")
        if isinstance(admitted, Outcome):
            return admitted
        client_id, reply_to = admitted

        parsed = parse_claim(payload)
        logs.bind_request_id(parsed.request_id)
        if isinstance(parsed, ClaimError):
            event = new_event(
                "claim.rejected",
                now,
                NO_TENANT,
                client_id=client_id,
                request_id=parsed.request_id,
                reason="validation_error",
            )
            events = sampled(self.limits, [event], now)
            record_events_safely(self.store, events)
            return Outcome(reply_to, to_json(parsed), events, "validation_error")

        # Before the ECDH and the write lock. Unknown keys are limited like known ones: nothing is looked up yet.
        # The device limit is keyed by (hardware_id, key): someone without the key cannot use up a device's budget.
        key_hash = secrets.digest(secrets.normalise_key(parsed.provision_key))
        checks = [(self.limits.device, f"{parsed.hardware_id}\n{key_hash.hex()}")]
        if secrets.is_human_code(parsed.provision_key):
            checks += [(self.limits.code, key_hash.hex()), (self.limits.all_codes, "all")]
        else:
            checks.append((self.limits.key, key_hash.hex()))
        request = (reply_to, client_id, lambda: parsed.request_id)
        limited = rate_limited(self.limits, RATE_LIMITED, request, checks, now)
        if limited is not None:
            record_events_safely(self.store, limited.events)
            return limited

        ctx = _Context(client_id, parsed, now, current_ring(self.keys))
        try:
            answer = self._provision(ctx, key_hash)
        except (StorageError, sqlite3.Error) as exc:
            log.error("claim %s: storage failure: %s", parsed.request_id, exc)
            return Outcome(reply_to, self._retryable(parsed.request_id, "storage unavailable"), [], "internal_error")
        except MirrorError as exc:
            log.error("claim %s: broker did not take the token: %s", parsed.request_id, exc)
            return Outcome(reply_to, self._retryable(parsed.request_id, "broker unavailable"), [], "internal_error")
        except Exception:
            log.exception("claim %s: unexpected failure", parsed.request_id)
            return Outcome(reply_to, self._retryable(parsed.request_id, "internal error"), [], "internal_error")
        return Outcome(reply_to, answer, ctx.events, ctx.events[0].event if ctx.events else "replayed")

    def _retryable(self, request_id: str | None, message: str) -> bytes:
        return retryable_error(self.settings, request_id, message)

    def _error(self, ctx: _Context, code: ErrorCode, message: str, errors: list[FieldError] | None = None) -> bytes:
        return to_json(ClaimError(request_id=ctx.claim.request_id, code=code, message=message, errors=errors))

    def _provision(self, ctx: _Context, key_hash: bytes) -> bytes:
        claim = ctx.claim
        cloud_kid = claim.cloud_key_id or ctx.keys.active_cloud
        cloud_key = ctx.keys.cloud.get(cloud_kid)
        if cloud_key is None:
            ctx.events.append(self._ctx_event(ctx, "claim.rejected", NO_TENANT, reason="unknown_cloud_key"))
            ctx.events = sampled(self.limits, ctx.events, ctx.now)
            record_events_safely(self.store, ctx.events)
            return self._error(
                ctx,
                ErrorCode.VALIDATION_ERROR,
                "claim is not valid",
                [FieldError(field="cloud_key_id", message="unknown cloud key id")],
            )
        # The expensive, side-effect-free work happens before the write lock is taken.
        device_public = crypto.public_key_from_sec1(claim.public_key_sec1)
        shared = crypto.shared_secret(cloud_key, device_public)
        digest = claim_digest(claim)
        retention = self.settings.claims.response_retention_seconds

        with self.store.transaction() as db:
            stored = Store.stored_answer(db, ctx.client_id, claim.request_id, int(ctx.now) - retention)
            if stored is not None:
                if secrets.digests_equal(stored[0], digest):
                    return stored[1]
                return self._error(
                    ctx,
                    ErrorCode.VALIDATION_ERROR,
                    "request_id was already used for a different claim",
                    [FieldError(field="request_id", message="already used for a different claim")],
                )
            answer = self._decide(db, ctx, key_hash, shared, cloud_kid)
            ctx.events = sampled(self.limits, ctx.events, ctx.now)
            for event in ctx.events:
                Store.insert_event(db, event.time, event.tenant, event.event, event.model_dump_json(exclude_none=True))
            return answer

    def _decide(self, db: sqlite3.Connection, ctx: _Context, key_hash: bytes, shared: bytes, cloud_kid: str) -> bytes:
        claim = ctx.claim
        key = Store.key_by_hash(db, key_hash)
        if key is not None and not secrets.digests_equal(key.key_hash, key_hash):
            key = None
        denial = key_denial(key, claim.hardware_id, ctx.now)
        if denial is not None or key is None:
            return self._deny(ctx, key, denial or Denial.UNKNOWN_KEY)

        device = Store.device_by_hardware_id(db, key.tenant_id, claim.hardware_id)
        action = reclaim_action(device, claim.public_key_sec1, key)
        if action is Action.REVOKED:
            return self._deny(ctx, key, Denial.DEVICE_REVOKED)
        if action is Action.EXISTS:
            ctx.events.append(self._key_event(ctx, "claim.rejected", key, device, reason="public_key_mismatch"))
            return self._error(ctx, ErrorCode.DEVICE_EXISTS, "a device with this hardware_id already exists")
        # Uses count created devices; an exhausted key still re-claims the devices it created.
        if is_exhausted(key) and (device is None or device.key_id != key.id):
            return self._deny(ctx, key, Denial.KEY_EXHAUSTED)

        api_key = "" if action is Action.RECLAIM else secrets.new_api_key()
        now = int(ctx.now)
        if action is Action.CREATE:
            device = self._new_device(ctx, key, cloud_kid)
            Store.insert_device(db, device, secrets.digest(api_key))
            if Store.spend_key_use(db, key.id) == key.max_registrations:
                ctx.events.append(self._key_event(ctx, "key.exhausted", key, None))
            ctx.events.insert(0, self._key_event(ctx, "device.provisioned", key, device))
        elif action is Action.ROTATE:
            assert device is not None
            Store.rotate_device_key(db, device.id, claim.public_key_sec1, cloud_kid, secrets.digest(api_key), now)
            ctx.events.append(self._key_event(ctx, "device.reprovisioned", key, device))
        else:
            assert device is not None
            ctx.events.append(self._key_event(ctx, "device.reclaimed", key, device))
        assert device is not None

        answer = to_json(self._success(ctx, device, action is Action.CREATE, api_key, shared, cloud_kid))
        Store.store_answer(db, ctx.client_id, claim.request_id, claim_digest(claim), answer, now)
        return answer

    def _new_device(self, ctx: _Context, key: ProvisionKey, cloud_kid: str) -> Device:
        claim, now = ctx.claim, int(ctx.now)
        return Device(
            id=secrets.new_device_id(),
            tenant_id=key.tenant_id,
            tenant_name=key.tenant_name,
            hardware_id=claim.hardware_id,
            name=claim.device_name,
            public_key=claim.public_key_sec1,
            cloud_key_id=cloud_kid,
            labels=key.labels,
            groups=key.groups,
            profile=key.profile,
            hardware=claim.hardware.model_dump(exclude_none=True) if claim.hardware else None,
            network=claim.network.model_dump(exclude_none=True) if claim.network else None,
            agent_version=claim.agent_version,
            key_id=key.id,
            status="active",
            created_at=now,
            updated_at=now,
        )

    def _success(
        self, ctx: _Context, device: Device, created: bool, api_key: str, shared: bytes, cloud_kid: str
    ) -> ClaimOk:
        # Inside the transaction: no answer without a broker that knows the token (MirrorError rolls back).
        credentials = issue_credentials(self.settings, ctx.keys, self.mirror, device, api_key, int(ctx.now))
        return sealed_answer(ctx.claim.request_id, device, created, cloud_kid, shared, credentials)

    # --- refusals and events --------------------------------------------------------------

    def _deny(self, ctx: _Context, key: ProvisionKey | None, reason: Denial) -> bytes:
        if key is None:
            ctx.events.append(self._ctx_event(ctx, "claim.rejected", NO_TENANT, reason=reason.value))
        else:
            ctx.events.append(self._key_event(ctx, "claim.rejected", key, None, reason=reason.value))
        return self._error(ctx, ErrorCode.PERMISSION_DENIED, DENIED_MESSAGE)

    def _ctx_event(self, ctx: _Context, name: str, tenant: str, **fields: Any) -> Event:
        return new_event(
            name,
            ctx.now,
            tenant,
            request_id=ctx.claim.request_id,
            client_id=ctx.client_id,
            hardware_id=ctx.claim.hardware_id,
            **fields,
        )

    def _key_event(self, ctx: _Context, name: str, key: ProvisionKey, device: Device | None, **fields: Any) -> Event:
        return self._ctx_event(
            ctx,
            name,
            key.tenant_name,
            device_id=device.id if device else None,
            key_name=key.name,
            key_id_prefix=key.id[:12],
            **fields,
        )


def device_key(store: Store, keys: KeyRing | KeySource, device_id: str) -> bytes:
    """The long-term device key of a device, for trusted backend code (HMACs, payload encryption).

    Re-derived from the cloud private key the device claimed with and its stored public key; it is
    never stored nor transmitted.
    """
    return device_key_of(store.device(device_id), current_ring(keys))
