"""Token refresh: a provisioned device proves it holds its device key and gets a fresh token.

The device publishes a TokenRefresh on `{prefix}/token/{client_id}`: device_id, request_id, timestamp
and an HMAC over them with its device key (PROTOCOL.md section 10.1). No secret travels; the answer is
a ClaimOk sealed like a claim's (its Credentials carry api_key ""), on `{prefix}/res/{client_id}`.

The checks, in order; each refusal is the same uniform permission_denied to the device, and the
exact reason goes to ops in a `token.refresh_rejected` event:

    unknown_device      no device with this id
    unknown_cloud_key   the cloud key the device was provisioned with is not on disk any more
    bad_mac             the MAC does not verify with the device's device key (checked in constant time)
    device_revoked      the device was revoked (after the MAC: only its genuine owner learns nothing new)
    stale_timestamp     the timestamp is further than token.refresh_skew_seconds from the bridge's clock
    replayed            this device already used this request_id within the window

The MAC is checked before the write lock is taken (it costs an ECDH); the revocation, replay and
minting steps run in one transaction, so a refresh records its request id, its event and the
broker's knowledge of its token (the mirror) together or not at all.
"""

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bridge import logs
from bridge.credentials import issue_credentials, sealed_answer, shared_secret
from bridge.errors import ProvbridgeError, StorageError
from bridge.keyfiles import KeyRing
from bridge.mirror import MirrorError
from bridge.provisioning import (
    NO_TENANT,
    Outcome,
    RequestHandler,
    new_event,
    parse_request,
    rate_limited,
    record_events_safely,
    retryable_error,
    sampled,
)
from bridge.rotation import current_ring
from bridge.store import Device, Store
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import MAX_REFRESH_BYTES, ClaimError, Event, TokenRefresh, to_json

log = logging.getLogger("provbridge.refresh")

DENIED_MESSAGE = "token refresh not accepted"
REFRESHED = "token.refreshed"
REJECTED = "token.refresh_rejected"
RATE_LIMITED = "token.refresh_rate_limited"


class Refusal(StrEnum):
    """Why a refresh was refused. Only ops see this (event `reason`)."""

    INVALID_CLIENT_ID = "invalid_client_id"
    VALIDATION_ERROR = "validation_error"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_CLOUD_KEY = "unknown_cloud_key"
    BAD_MAC = "bad_mac"
    DEVICE_REVOKED = "device_revoked"
    STALE_TIMESTAMP = "stale_timestamp"
    REPLAYED = "replayed"


# --- pure decisions -------------------------------------------------------------------------


def within_skew(timestamp: int, now: int, skew_seconds: int) -> bool:
    return abs(now - timestamp) <= skew_seconds


def replay_expiry(timestamp: int, skew_seconds: int) -> int:
    """Until when a request id must be remembered: after that its timestamp is stale, so it is refused anyway."""
    return timestamp + skew_seconds


def mac_matches(device_key: bytes, request: TokenRefresh) -> bool:
    return crypto.refresh_mac_matches(
        device_key, request.device_id, request.request_id, request.timestamp, request.mac_bytes
    )


def same_keys(a: Device, b: Device) -> bool:
    """Whether the device still has the keys its MAC was checked with (a `rotate` re-claim may change them)."""
    return a.public_key == b.public_key and a.cloud_key_id == b.cloud_key_id


# --- the orchestration ----------------------------------------------------------------------


@dataclass
class _Context:
    client_id: str
    request: TokenRefresh
    now: float
    keys: KeyRing  # one snapshot per refresh, as for claims
    events: list[Event] = field(default_factory=list)


class _Refused(ProvbridgeError):
    """Internal control flow: this refresh is refused for `reason` (the device only sees permission_denied)."""

    def __init__(self, reason: Refusal, device: Device | None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.device = device


class Refresher(RequestHandler):
    """Answers token-refresh messages. `handle` is the route for `topics.token_subscription(prefix)`."""

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> Outcome:
        """Answer one refresh message. Never raises: every failure becomes an answer or a drop."""
        now = time.time() if now is None else now
        admitted = self._admit(topics.client_id_of_token_topic(self.prefix, topic), now, REJECTED)
        if isinstance(admitted, Outcome):
            return admitted
        client_id, reply_to = admitted

        parsed = parse_request(TokenRefresh, payload, MAX_REFRESH_BYTES, "token refresh")
        logs.bind_request_id(parsed.request_id)
        if isinstance(parsed, ClaimError):
            event = new_event(
                REJECTED,
                now,
                NO_TENANT,
                client_id=client_id,
                request_id=parsed.request_id,
                reason=Refusal.VALIDATION_ERROR.value,
            )
            events = sampled(self.limits, [event], now)
            record_events_safely(self.store, events)
            return Outcome(reply_to, to_json(parsed), events, "validation_error")

        # Before the device lookup and the ECDH: forged refreshes for one device id are limited too.
        request = (reply_to, client_id, lambda: parsed.request_id)
        limited = rate_limited(self.limits, RATE_LIMITED, request, [(self.limits.device, parsed.device_id)], now)
        if limited is not None:
            record_events_safely(self.store, limited.events)
            return limited

        ctx = _Context(client_id, parsed, now, current_ring(self.keys))
        request_id = parsed.request_id
        try:
            answer = self._refresh(ctx)
        except _Refused as refused:
            ctx.events = sampled(self.limits, [self._rejected(ctx, refused)], now)
            record_events_safely(self.store, ctx.events)
            denied = ClaimError(request_id=request_id, code=ErrorCode.PERMISSION_DENIED, message=DENIED_MESSAGE)
            return Outcome(reply_to, to_json(denied), ctx.events, f"refused: {refused.reason.value}")
        except (StorageError, sqlite3.Error) as exc:
            log.error("refresh %s: storage failure: %s", request_id, exc)
            return Outcome(
                reply_to, retryable_error(self.settings, request_id, "storage unavailable"), [], "internal_error"
            )
        except MirrorError as exc:
            log.error("refresh %s: broker did not take the token: %s", request_id, exc)
            return Outcome(
                reply_to, retryable_error(self.settings, request_id, "broker unavailable"), [], "internal_error"
            )
        except Exception:
            log.exception("refresh %s: unexpected failure", request_id)
            return Outcome(reply_to, retryable_error(self.settings, request_id, "internal error"), [], "internal_error")
        return Outcome(reply_to, answer, ctx.events, REFRESHED)

    def _refresh(self, ctx: _Context) -> bytes:
        request, now = ctx.request, int(ctx.now)
        skew = self.settings.token.refresh_skew_seconds
        # Authenticate before the write lock: the ECDH is the expensive part, and forgeries never lock.
        device = Store.device_by_id(self.store.read(), request.device_id)
        if device is None:
            raise _Refused(Refusal.UNKNOWN_DEVICE, None)
        try:
            shared = shared_secret(ctx.keys, device.cloud_key_id, device.public_key)
        except KeyError:
            log.error("device %s was provisioned with cloud key %s, which is missing", device.id, device.cloud_key_id)
            raise _Refused(Refusal.UNKNOWN_CLOUD_KEY, device) from None
        if not mac_matches(crypto.derive_device_key(shared), request):
            raise _Refused(Refusal.BAD_MAC, device)

        with self.store.transaction() as db:
            current = Store.device_by_id(db, device.id)
            if current is None or not same_keys(device, current):
                raise _Refused(Refusal.BAD_MAC, device)  # re-provisioned with a new key pair meanwhile
            if current.status != "active":
                raise _Refused(Refusal.DEVICE_REVOKED, current)
            if not within_skew(request.timestamp, now, skew):
                raise _Refused(Refusal.STALE_TIMESTAMP, current)
            Store.purge_refreshes(db, now)
            if Store.refresh_seen(db, current.id, request.request_id, now):
                raise _Refused(Refusal.REPLAYED, current)
            Store.remember_refresh(db, current.id, request.request_id, replay_expiry(request.timestamp, skew))
            credentials = issue_credentials(self.settings, ctx.keys, self.mirror, current, "", now)
            answer = to_json(
                sealed_answer(request.request_id, current, False, current.cloud_key_id, shared, credentials)
            )
            ctx.events.append(self._device_event(ctx, REFRESHED, current))
            for e in ctx.events:
                Store.insert_event(db, e.time, e.tenant, e.event, e.model_dump_json(exclude_none=True))
            return answer

    # --- events ---------------------------------------------------------------------------

    def _rejected(self, ctx: _Context, refused: _Refused) -> Event:
        if refused.device is None:
            return new_event(
                REJECTED,
                ctx.now,
                NO_TENANT,
                request_id=ctx.request.request_id,
                client_id=ctx.client_id,
                device_id=ctx.request.device_id,
                reason=refused.reason.value,
            )
        return self._device_event(ctx, REJECTED, refused.device, reason=refused.reason.value)

    def _device_event(self, ctx: _Context, name: str, device: Device, **fields: Any) -> Event:
        return new_event(
            name,
            ctx.now,
            device.tenant_name,
            request_id=ctx.request.request_id,
            client_id=ctx.client_id,
            hardware_id=device.hardware_id,
            device_id=device.id,
            **fields,
        )
