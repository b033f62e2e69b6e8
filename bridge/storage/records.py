"""The rows the claim path decides on, as plain data: no database here, so the decisions that take them
(bridge/claims/decision.py) stay free of I/O. bridge/storage/store.py reads and writes them."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProvisionKey:
    id: str
    tenant_id: str
    tenant_name: str
    name: str
    kind: str
    key_hash: bytes
    profile: str
    hardware_id_pattern: str | None
    expires_at: int | None
    max_registrations: int | None
    registrations: int
    labels: dict[str, str]
    groups: list[str]
    reclaim_policy: str
    status: str
    created_at: int
    credential_type: str = "token"  # what its claims get: "token" (a JWT) or "certificate" (an X.509 certificate)
    certificate_validity_seconds: int | None = None  # certificate keys: the validity of the certificates issued
    preprovisioned_only: bool = False  # creates devices only for hardware ids on its tenant's allowlist


@dataclass(frozen=True)
class Device:
    id: str
    tenant_id: str
    tenant_name: str
    hardware_id: str
    name: str | None
    public_key: bytes
    cloud_key_id: str
    labels: dict[str, str]
    groups: list[str]
    profile: str
    hardware: dict[str, Any] | None
    network: dict[str, Any] | None
    agent_version: str | None
    key_id: str
    status: str
    created_at: int
    updated_at: int
    credential_type: str = "token"  # its key's when it was created; re-claims and refreshes must ask for the same
    # Raised by a reinstatement or reset: tokens carry it (`gen`), and brokers refuse those of a lower one.
    credential_generation: int = 0
    reset_pending: bool = False  # `device reset`: the next valid claim for its hardware id may bring a new key pair
    refused_until: int | None = None  # until when the denylist lists credentials it held (bridge/ops/lifecycle.py)
    online: bool | None = None  # connected to its broker, as the broker last said (None: never seen)
    last_seen: int | None = None  # when it last connected or disconnected (unix seconds)


@dataclass(frozen=True)
class AllowlistEntry:
    """A pre-provisioned hardware id: what the device it becomes starts with, besides what its key gives."""

    tenant_id: str
    hardware_id: str
    device_id: str | None  # admin-made (`allowlist add --with-credentials`); None: drawn at the claim
    api_key_hash: bytes | None = field(default=None, repr=False)  # admin-made API key; None: made at the claim
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0


@dataclass(frozen=True)
class AdminToken:
    """A token of the admin HTTP API (its value is shown once; only its SHA-256 is stored)."""

    id: str
    name: str
    token_hash: bytes = field(repr=False)
    scopes: frozenset[str]  # "read", "write" (implies read), "backend"
    tenant_id: str | None  # None: every tenant
    tenant_name: str | None
    created_at: int
    revoked_at: int | None = None


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate the bridge signed, recorded by serial number (hex) for audit and revocation."""

    serial: str
    device_id: str
    request_id: str
    not_before: int
    not_after: int
    issued_at: int
    generation: int = 0  # the device's credential generation when it was signed (Device.credential_generation)


@dataclass(frozen=True)
class StoredAnswer:
    """The answer given to a (client id, request_id), kept for replays, with the digest of its claim."""

    claim_digest: bytes
    answer: bytes


@dataclass(frozen=True)
class Refused:
    """A device whose credentials the brokers must refuse until `until`: all of them (`generation` None: revoked
    or deleted), or those older than `generation` (tokens of a lower `gen`, the certificates by serial)."""

    device_id: str
    until: int
    generation: int | None
    certificates: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TenantSummary:
    id: str
    name: str
    created_at: int
    devices: int
    keys: int
