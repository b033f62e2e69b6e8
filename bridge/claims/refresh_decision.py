"""What becomes of an authenticated token refresh, decided over data: no database, broker or clock.

`Refresher` (bridge/claims/refresh.py) checks the MAC before the write lock (it costs an ECDH), then reads
the device's row and whether its request id was seen (`RefreshFacts`) inside the transaction, calls
`decide_refresh` and applies the verdict: `RefreshRefused` (only its event is written) or
`RefreshGranted` (remember the request id, mint the token or sign the renewed certificate, seal the answer).
"""

from dataclasses import dataclass
from enum import StrEnum

from bridge.storage.records import Device
from provwire.models import TokenRefresh


class RefreshDenial(StrEnum):
    """Why a refresh was refused. Only ops see this (event `reason`)."""

    INVALID_CLIENT_ID = "invalid_client_id"
    VALIDATION_ERROR = "validation_error"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_CLOUD_KEY = "unknown_cloud_key"
    BAD_MAC = "bad_mac"
    DEVICE_REVOKED = "device_revoked"
    DEVICE_RESET = "device_reset"  # reset by the operator: only a claim gives it credentials again
    CREDENTIAL_MISMATCH = "credential_mismatch"  # a certificate device sent no csr, or a token device sent one
    CSR_KEY_MISMATCH = "csr_key_mismatch"  # a renewal's csr is not for the device's key
    STALE_TIMESTAMP = "stale_timestamp"
    REPLAYED = "replayed"


@dataclass(frozen=True)
class RefreshFacts:
    """What the decision reads inside the refresh's transaction."""

    current: Device | None  # the device's row now (a re-claim may have changed it since the MAC check)
    seen: bool  # the device already used this request_id within the window


@dataclass(frozen=True)
class RefreshRefused:
    reason: RefreshDenial
    device: Device | None  # for the event's tenant and hardware id


@dataclass(frozen=True)
class RefreshGranted:
    device: Device
    remember_until: int  # keep its request_id until then, to refuse a replay


def decide_refresh(
    request: TokenRefresh, authenticated: Device, facts: RefreshFacts, now: int, skew_seconds: int
) -> RefreshRefused | RefreshGranted:
    """The checks after the MAC, in PROTOCOL.md §10.1's order. `authenticated`: the row the MAC was checked with."""
    current = facts.current
    if current is None or not same_keys(authenticated, current):
        return RefreshRefused(RefreshDenial.BAD_MAC, authenticated)  # re-provisioned with a new key pair meanwhile
    if current.status != "active":
        return RefreshRefused(RefreshDenial.DEVICE_REVOKED, current)
    if current.reset_pending:
        return RefreshRefused(RefreshDenial.DEVICE_RESET, current)
    mismatch = credential_mismatch(request, current)
    if mismatch is not None:
        return RefreshRefused(mismatch, current)
    if not within_skew(request.timestamp, now, skew_seconds):
        return RefreshRefused(RefreshDenial.STALE_TIMESTAMP, current)
    if facts.seen:
        return RefreshRefused(RefreshDenial.REPLAYED, current)
    return RefreshGranted(current, replay_expiry(request.timestamp, skew_seconds))


def credential_mismatch(request: TokenRefresh, device: Device) -> RefreshDenial | None:
    """Whether the request renews what the device holds: a certificate, with a CSR for the device's own key
    (the device keeps its key pair for life: its device key depends on it), or a token, with no CSR."""
    csr_key = request.csr_public_key_sec1
    if device.credential_type != "certificate":
        return None if csr_key is None else RefreshDenial.CREDENTIAL_MISMATCH
    if csr_key is None:
        return RefreshDenial.CREDENTIAL_MISMATCH
    return None if csr_key == device.public_key else RefreshDenial.CSR_KEY_MISMATCH


def within_skew(timestamp: int, now: int, skew_seconds: int) -> bool:
    return abs(now - timestamp) <= skew_seconds


def replay_expiry(timestamp: int, skew_seconds: int) -> int:
    """Until when a request id must be remembered: after that its timestamp is stale, so it is refused anyway."""
    return timestamp + skew_seconds


def same_keys(a: Device, b: Device) -> bool:
    """Whether the device still has the keys its MAC was checked with (a `rotate` re-claim may change them)."""
    return a.public_key == b.public_key and a.cloud_key_id == b.cloud_key_id
