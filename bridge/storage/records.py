"""The rows the claim path decides on, as plain data: no database here, so the decisions that take them
(bridge/claims/decision.py) stay free of I/O. bridge/storage/store.py reads and writes them."""

from dataclasses import dataclass
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


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate the bridge signed, recorded by serial number (hex) for audit and revocation."""

    serial: str
    device_id: str
    request_id: str
    not_before: int
    not_after: int
    issued_at: int


@dataclass(frozen=True)
class StoredAnswer:
    """The answer given to a (client id, request_id), kept for replays, with the digest of its claim."""

    claim_digest: bytes
    answer: bytes


@dataclass(frozen=True)
class Revoked:
    device_id: str
    revoked_at: int


@dataclass(frozen=True)
class TenantSummary:
    id: str
    name: str
    created_at: int
    devices: int
    keys: int
