"""Token refresh and certificate renewal: a provisioned device proves it holds its device key and gets a fresh
token, or (certificate devices, whose request carries a CSR) a fresh certificate.

The device publishes a TokenRefresh on `{prefix}/token/{client_id}`: device_id, request_id, timestamp
and an HMAC over them with its device key (PROTOCOL.md section 10.1). No secret travels; the answer is
a ClaimOk sealed like a claim's (its Credentials carry api_key ""), on `{prefix}/res/{client_id}`.

The checks, in order; each refusal is the same uniform permission_denied to the device, and the
exact reason goes to ops in a `token.refresh_rejected` event:

    unknown_device      no device with this id
    unknown_cloud_key   the cloud key the device was provisioned with is not on disk any more
    bad_mac             the MAC does not verify with the device's device key (checked in constant time)
    device_revoked      the device was revoked (after the MAC: only its genuine owner learns nothing new)
    credential_mismatch a certificate device sent no csr, or a token device sent one
    csr_key_mismatch    the csr is not for the device's own key
    stale_timestamp     the timestamp is further than token.refresh_skew_seconds from the bridge's clock
    replayed            this device already used this request_id within the window

The MAC is checked before the write lock is taken (it costs an ECDH); the revocation, replay and
minting steps run in one transaction, so a refresh records its request id, its event and the
broker's knowledge of its token (the mirror) together or not at all.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from bridge import logs
from bridge.claims.credentials import issue_certificate, issue_credentials, sealed_answer, shared_secret
from bridge.claims.decision import NO_TENANT, new_event
from bridge.claims.provisioning import (
    Outcome,
    RequestHandler,
    parse_request,
    rate_limited,
    record_events_safely,
    retryable_error,
    sampled,
)
from bridge.claims.refresh_decision import RefreshDenial, RefreshFacts, RefreshRefused, decide_refresh
from bridge.errors import ConfigError, MirrorError, NotInitialised, StorageError
from bridge.storage.keyfiles import KeyRing
from bridge.storage.records import Device
from bridge.storage.rotation import current_ring
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import MAX_REFRESH_BYTES, ClaimError, Event, TokenRefresh, to_json

log = logging.getLogger("provbridge.refresh")

DENIED_MESSAGE = "token refresh not accepted"
REFRESHED = "token.refreshed"
RENEWED = "certificate.renewed"
REJECTED = "token.refresh_rejected"
RATE_LIMITED = "token.refresh_rate_limited"


# --- pure decisions -------------------------------------------------------------------------


def mac_matches(device_key: bytes, request: TokenRefresh) -> bool:
    return crypto.refresh_mac_matches(
        device_key, request.device_id, request.request_id, request.timestamp, request.mac_bytes, request.csr
    )


# --- the orchestration ----------------------------------------------------------------------


@dataclass
class _Context:
    client_id: str
    request: TokenRefresh
    now: float
    keys: KeyRing  # one snapshot per refresh, as for claims
    events: list[Event] = field(default_factory=list)


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
                reason=RefreshDenial.VALIDATION_ERROR.value,
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
        except StorageError as exc:
            log.error("refresh %s: storage failure: %s", request_id, exc)
            return Outcome(
                reply_to, retryable_error(self.settings, request_id, "storage unavailable"), [], "internal_error"
            )
        except MirrorError as exc:
            log.error("refresh %s: broker did not take the token: %s", request_id, exc)
            return Outcome(
                reply_to, retryable_error(self.settings, request_id, "broker unavailable"), [], "internal_error"
            )
        except (NotInitialised, ConfigError) as exc:  # the device CA: missing, or its files unusable
            log.error("refresh %s: cannot sign a device certificate: %s", request_id, exc)
            unavailable = retryable_error(self.settings, request_id, "certificate authority unavailable")
            return Outcome(reply_to, unavailable, [], "internal_error")
        except Exception:
            log.exception("refresh %s: unexpected failure", request_id)
            return Outcome(reply_to, retryable_error(self.settings, request_id, "internal error"), [], "internal_error")
        if isinstance(answer, RefreshRefused):
            ctx.events = sampled(self.limits, [self._rejected(ctx, answer)], now)
            record_events_safely(self.store, ctx.events)
            denied = ClaimError(request_id=request_id, code=ErrorCode.PERMISSION_DENIED, message=DENIED_MESSAGE)
            return Outcome(reply_to, to_json(denied), ctx.events, f"refused: {answer.reason.value}")
        return Outcome(reply_to, answer, ctx.events, ctx.events[0].event)

    def _refresh(self, ctx: _Context) -> bytes | RefreshRefused:
        """edge → parse (done) → authenticate → read → decide → apply: the answer, or why it is refused."""
        request, now = ctx.request, int(ctx.now)
        # Authenticate before the write lock: the ECDH is the expensive part, and forgeries never lock.
        device = self.store.find_device(request.device_id)
        if device is None:
            return RefreshRefused(RefreshDenial.UNKNOWN_DEVICE, None)
        try:
            shared = shared_secret(ctx.keys, device.cloud_key_id, device.public_key)
        except KeyError:
            log.error("device %s was provisioned with cloud key %s, which is missing", device.id, device.cloud_key_id)
            return RefreshRefused(RefreshDenial.UNKNOWN_CLOUD_KEY, device)
        if not mac_matches(crypto.derive_device_key(shared), request):
            return RefreshRefused(RefreshDenial.BAD_MAC, device)

        with self.store.transaction() as tx:
            tx.purge_refreshes(now)
            current = tx.device_by_id(device.id)
            seen = current is not None and tx.refresh_seen(current.id, request.request_id, now)
            verdict = decide_refresh(
                request, device, RefreshFacts(current, seen), now, self.settings.token.refresh_skew_seconds
            )
            if isinstance(verdict, RefreshRefused):
                return verdict  # the purge above is kept: it only drops what no replay check needs
            granted = verdict.device
            tx.remember_refresh(granted.id, request.request_id, verdict.remember_until)
            csr = request.parsed_csr
            if csr is not None:  # a certificate device's renewal (decide_refresh checked the csr is for its key)
                key = tx.key_by_id(granted.key_id)
                order = self.certificate_order(csr, key.certificate_validity_seconds if key else None)
                credentials, issued = issue_certificate(self.settings, order, granted, "", request.request_id, now)
                tx.record_certificate(issued)
            else:
                # Inside the transaction, as for claims: a MirrorError rolls the refresh back
                # (bridge/claims/provisioning.py).
                credentials = issue_credentials(self.settings, ctx.keys, self.mirror, granted, "", now)
            answer = to_json(
                sealed_answer(request.request_id, granted, False, granted.cloud_key_id, shared, credentials)
            )
            ctx.events.append(self._device_event(ctx, REFRESHED if csr is None else RENEWED, granted))
            for event in ctx.events:
                tx.add_event(event)
            return answer

    # --- events ---------------------------------------------------------------------------

    def _rejected(self, ctx: _Context, refused: RefreshRefused) -> Event:
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
