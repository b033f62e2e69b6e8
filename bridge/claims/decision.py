"""What becomes of a valid claim, decided over data: no database, no broker, no clock, no randomness.

`Provisioner` (bridge/claims/provisioning.py) reads the rows a claim needs inside its transaction
(`ClaimFacts`), draws the random values a new device may need (`Fresh`), calls `decide`, and applies
the verdict: `Answered` (a replay or a refusal: only its events are written) or `Granted` (a device
to create, re-key or re-claim; the token and sealed credentials are made when it is applied). The
checks run in the order of PROTOCOL.md §7.2's table, the first that applies deciding.
"""

import hmac
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from bridge.claims import hardware_pattern
from bridge.errors import InvalidPattern
from bridge.storage.records import AllowlistEntry, Device, ProvisionKey, StoredAnswer
from provwire.errors import ErrorCode
from provwire.models import Claim, ClaimError, Event, FieldError, rfc3339, to_json

NO_TENANT = "_"
DENIED_MESSAGE = "provisioning key not accepted"


class Denial(StrEnum):
    """Why a key was refused. Only ops see this; the device gets one uniform permission_denied."""

    UNKNOWN_KEY = "unknown_key"
    KEY_REVOKED = "key_revoked"
    KEY_EXPIRED = "key_expired"
    KEY_EXHAUSTED = "key_exhausted"
    HARDWARE_ID_MISMATCH = "hardware_id_mismatch"
    HARDWARE_ID_PATTERN_INVALID = "hardware_id_pattern_invalid"  # stored before RE2, and RE2 cannot run it
    DEVICE_REVOKED = "device_revoked"
    NOT_PREPROVISIONED = "not_preprovisioned"  # the key creates devices only for hardware ids on the allowlist


class Action(StrEnum):
    CREATE = "create"
    RECLAIM = "reclaim"
    ROTATE = "rotate"
    EXISTS = "exists"
    REVOKED = "revoked"


@dataclass(frozen=True)
class ClaimRequest:
    """One valid claim and what the bridge knows of it before the transaction."""

    client_id: str
    claim: Claim
    digest: bytes  # `claim_digest(claim)`: a replay must be the same claim
    key_hash: bytes  # SHA-256 of the normalised provisioning key
    cloud_kid: str  # the cloud key the claim is answered with
    now: float


@dataclass(frozen=True)
class ClaimFacts:
    """What the decision reads, inside the claim's transaction."""

    stored: StoredAnswer | None  # stored for this client id and request_id
    key: ProvisionKey | None  # the key whose hash is the claim's
    device: Device | None  # the key's tenant's device with the claim's hardware id
    entry: AllowlistEntry | None = None  # when there is no device: the hardware id's allowlist entry, if any


@dataclass(frozen=True)
class Fresh:
    """Random values drawn before deciding, used only if the verdict needs them."""

    device_id: str
    api_key: str


@dataclass(frozen=True)
class Answered:
    """The claim's final answer is known: a replay, or a refusal. Nothing is written but the events."""

    answer: bytes
    events: list[Event]


@dataclass(frozen=True)
class Granted:
    """The claim provisions `device`: apply `action`, then answer with a token and sealed credentials."""

    action: Action  # CREATE (insert the device, spend a key use), ROTATE (record the new public key), RECLAIM
    key: ProvisionKey
    device: Device
    api_key: str  # "" for a re-claim (the device keeps its API key) or an admin-made one (shown to the admin)
    events: list[Event]
    entry: AllowlistEntry | None = None  # CREATE of a pre-provisioned hardware id: the entry it uses up
    spends_use: bool = False  # counts against the key's max registrations (a new device, or a reset device taken)


def decide(request: ClaimRequest, facts: ClaimFacts, fresh: Fresh) -> Answered | Granted:
    claim = request.claim
    if facts.stored is not None:
        if hmac.compare_digest(facts.stored.claim_digest, request.digest):
            return Answered(facts.stored.answer, [])
        reused = [FieldError(field="request_id", message="already used for a different claim")]
        return _error(request, ErrorCode.VALIDATION_ERROR, "request_id was already used for a different claim", reused)

    key = facts.key
    if key is not None and not hmac.compare_digest(key.key_hash, request.key_hash):  # constant time
        key = None
    denial = key_denial(key, claim.hardware_id, request.now)
    if denial is not None or key is None:
        return _denied(request, key, denial or Denial.UNKNOWN_KEY)
    mismatch = credential_mismatch(key, claim)
    if mismatch is not None:
        events = [key_event(request, "claim.rejected", key, None, reason="credential_mismatch")]
        return _error(request, ErrorCode.VALIDATION_ERROR, "claim is not valid", [mismatch], events)

    device = facts.device
    action = reclaim_action(device, claim.public_key_sec1, key)
    if action is Action.CREATE and key.preprovisioned_only and facts.entry is None:
        return _denied(request, key, Denial.NOT_PREPROVISIONED)
    if action is Action.REVOKED:
        return _denied(request, key, Denial.DEVICE_REVOKED)
    if action is Action.EXISTS:
        events = [key_event(request, "claim.rejected", key, device, reason="public_key_mismatch")]
        return _error(request, ErrorCode.DEVICE_EXISTS, "a device with this hardware_id already exists", events=events)
    if action is Action.RECLAIM and device is not None and device.credential_type != key.credential_type:
        # A device keeps the credential type it was created with. Switching it by re-claim would need no proof
        # of possession in one direction (a token key's claim has no CSR): a leaked key of the tenant, the
        # hardware id and the (public) public key would cut a certificate device off at its next renewal.
        events = [key_event(request, "claim.rejected", key, device, reason="credential_mismatch")]
        held = FieldError(
            field="csr",
            message=f"this device holds a {device.credential_type}: re-claim it with a key"
            f" that issues {device.credential_type}s",
        )
        return _error(request, ErrorCode.VALIDATION_ERROR, "claim is not valid", [held], events)
    # Uses count created devices; an exhausted key still re-claims the devices it created.
    if is_exhausted(key) and (device is None or device.key_id != key.id):
        return _denied(request, key, Denial.KEY_EXHAUSTED)

    if action is Action.CREATE:
        entry = facts.entry
        device = new_device(request, key, fresh.device_id, entry)
        events = [key_event(request, "device.provisioned", key, device)]
        if key.max_registrations is not None and key.registrations + 1 == key.max_registrations:
            events.append(key_event(request, "key.exhausted", key, None))  # this claim takes its last use
        api_key = "" if entry is not None and entry.api_key_hash is not None else fresh.api_key
        return Granted(action, key, device, api_key, events, entry, spends_use=True)
    assert device is not None  # ROTATE and RECLAIM are for a known device
    if action is Action.ROTATE:
        events = [key_event(request, "device.reprovisioned", key, device)]
        # After a reset any valid key of the tenant may bring the new key pair: another key's use is spent then,
        # so a one-time code takes over one device, and an exhausted key none (checked above).
        spends = device.reset_pending and device.key_id != key.id
        return Granted(action, key, rotated(device, request, key), fresh.api_key, events, spends_use=spends)
    return Granted(action, key, device, "", [key_event(request, "device.reclaimed", key, device)])


def credential_mismatch(key: ProvisionKey, claim: Claim) -> FieldError | None:
    """Whether the claim asks for the credential the key issues: a CSR for a certificate key, none for a token key.

    Checked after the key is accepted, so that only a holder of the key learns which type it issues.
    """
    if key.credential_type == "certificate" and claim.csr is None:
        return FieldError(field="csr", message="required: this provisioning key issues certificates")
    if key.credential_type != "certificate" and claim.csr is not None:
        return FieldError(field="csr", message="not accepted: this provisioning key issues tokens, not certificates")
    return None


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
    if device.reset_pending:  # the operator allowed one claim to bring a new key pair (`device reset`)
        return Action.ROTATE
    if device.public_key == public_key:
        return Action.RECLAIM
    # A leaked provisioning key must not let anyone take over a device: only the key that created it
    # may replace its public key, and only if the operator opted in.
    return Action.ROTATE if key.reclaim_policy == "rotate" and device.key_id == key.id else Action.EXISTS


def new_device(request: ClaimRequest, key: ProvisionKey, device_id: str, entry: AllowlistEntry | None = None) -> Device:
    """The device a claim creates: its key's template, and what its allowlist entry (if any) names: an admin-made
    device id, a name (over the claim's), labels (over the key's)."""
    claim, now = request.claim, int(request.now)
    name = claim.device_name if entry is None or entry.name is None else entry.name
    return Device(
        id=device_id if entry is None or entry.device_id is None else entry.device_id,
        tenant_id=key.tenant_id,
        tenant_name=key.tenant_name,
        hardware_id=claim.hardware_id,
        name=name,
        public_key=claim.public_key_sec1,
        cloud_key_id=request.cloud_kid,
        labels=key.labels if entry is None else key.labels | entry.labels,
        groups=key.groups,
        profile=key.profile,
        hardware=claim.hardware.model_dump(exclude_none=True) if claim.hardware else None,
        network=claim.network.model_dump(exclude_none=True) if claim.network else None,
        agent_version=claim.agent_version,
        key_id=key.id,
        status="active",
        created_at=now,
        updated_at=now,
        credential_type=key.credential_type,
    )


def rotated(device: Device, request: ClaimRequest, key: ProvisionKey) -> Device:
    """The device as a `rotate` re-claim (or the claim after a reset) leaves it: the claim's public key and cloud
    key, the key's credential type, no reset pending."""
    return replace(
        device,
        public_key=request.claim.public_key_sec1,
        cloud_key_id=request.cloud_kid,
        updated_at=int(request.now),
        credential_type=key.credential_type,
        reset_pending=False,
    )


# --- events ---------------------------------------------------------------------------------


def new_event(name: str, now: float, tenant: str, **fields: Any) -> Event:
    return Event(event=name, time=rfc3339(now), tenant=tenant, **fields)


def claim_event(request: ClaimRequest, name: str, tenant: str, **fields: Any) -> Event:
    claim = request.claim
    return new_event(
        name,
        request.now,
        tenant,
        request_id=claim.request_id,
        client_id=request.client_id,
        hardware_id=claim.hardware_id,
        **fields,
    )


def key_event(request: ClaimRequest, name: str, key: ProvisionKey, device: Device | None, **fields: Any) -> Event:
    return claim_event(
        request,
        name,
        key.tenant_name,
        device_id=device.id if device else None,
        key_name=key.name,
        key_id_prefix=key.id[:12],
        **fields,
    )


# --- refusals -------------------------------------------------------------------------------


def _error(
    request: ClaimRequest,
    code: ErrorCode,
    message: str,
    errors: list[FieldError] | None = None,
    events: list[Event] | None = None,
) -> Answered:
    answer = ClaimError(request_id=request.claim.request_id, code=code, message=message, errors=errors)
    return Answered(to_json(answer), events or [])


def _denied(request: ClaimRequest, key: ProvisionKey | None, reason: Denial) -> Answered:
    if key is None:
        event = claim_event(request, "claim.rejected", NO_TENANT, reason=reason.value)
    else:
        event = key_event(request, "claim.rejected", key, None, reason=reason.value)
    return _error(request, ErrorCode.PERMISSION_DENIED, DENIED_MESSAGE, events=[event])
