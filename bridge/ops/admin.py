"""Operator actions behind the CLI: initialise the data directory, create tenants and keys."""

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bridge.claims import hardware_pattern, identifiers
from bridge.config import Settings
from bridge.errors import AlreadyExists, NotFound, UsageError
from bridge.storage import keyfiles
from bridge.storage.records import ProvisionKey
from bridge.storage.store import Store
from bridge.tls import device_ca
from bridge.tls.device_ca import create_device_ca

OPS_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TENANT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # never "_", the no-tenant marker
DEFAULT_TENANT = "default"
FIRST_KEY_NAME = "first-key"
_DURATION_RE = re.compile(r"([0-9]{1,9})([smhd])")  # ASCII digits, short enough for int() and SQLite
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90s', '15m', '12h', '30d' -> seconds."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise UsageError(f"bad duration {text!r}: use a number and s, m, h or d, like 30d")
    return int(match[1]) * _UNIT_SECONDS[match[2]]


@dataclass(frozen=True)
class KeySpec:
    tenant: str
    name: str
    profile: str = "default"
    hardware_id_pattern: str | None = None
    expires_at: int | None = None
    max_registrations: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    reclaim_policy: str = "reject"
    human_code: bool = False
    credential_type: str = "token"  # "token" or "certificate" (the claim then carries a CSR)
    certificate_validity_seconds: int | None = None  # certificate keys; None: DEFAULT_CERTIFICATE_VALIDITY_SECONDS


@dataclass(frozen=True)
class InitResult:
    created: bool
    tenant: str
    cloud_key_id: str
    key_id: str | None = None
    provision_key: str | None = None  # shown once, never stored


def open_store(settings: Settings) -> Store:
    keyfiles.load_keys(settings.data_dir)  # refuses an uninitialised data dir with a clear reason
    return Store(settings.database_file)


def init_data_dir(settings: Settings) -> InitResult:
    """Create keys, database, default tenant and a first key. Does nothing if already done."""
    data_dir = settings.data_dir
    if keyfiles.is_initialised(data_dir):
        ring = keyfiles.load_keys(data_dir)
        return InitResult(created=False, tenant=DEFAULT_TENANT, cloud_key_id=ring.active_cloud)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(settings.database_file)
    try:
        now = int(time.time())
        if not any(t.name == DEFAULT_TENANT for t in store.tenants()):
            create_tenant(store, DEFAULT_TENANT, now)
        key, raw = create_key(store, settings, KeySpec(tenant=DEFAULT_TENANT, name=FIRST_KEY_NAME), now)
    finally:
        store.close()
    # Keys last: their presence is what marks the directory as initialised.
    ring = keyfiles.create_keys(data_dir)
    return InitResult(True, DEFAULT_TENANT, ring.active_cloud, key.id, raw)


def create_tenant(store: Store, name: str, now: int) -> str:
    if TENANT_NAME_RE.fullmatch(name) is None:
        raise UsageError(
            "tenant name must be 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            " (it appears in event topics)"
        )
    tenant_id = identifiers.new_tenant_id()
    store.create_tenant(tenant_id, name, now)
    return tenant_id


def create_key(store: Store, settings: Settings, spec: KeySpec, now: int) -> tuple[ProvisionKey, str]:
    """Create a provisioning key; returns it and its raw value, which is never stored."""
    if spec.profile not in settings.profiles:
        raise UsageError(f"unknown profile {spec.profile!r}; configured: {', '.join(sorted(settings.profiles))}")
    if spec.reclaim_policy not in ("reject", "rotate"):
        raise UsageError("re-claim policy must be 'reject' or 'rotate'")
    if spec.max_registrations is not None and spec.max_registrations < 1:
        raise UsageError("max registrations must be at least 1 (leave it out for unlimited)")
    if spec.expires_at is not None and spec.expires_at <= now:
        raise UsageError("expiry must be in the future")
    if spec.human_code:
        _check_code_spec(spec, settings.claims.code_ttl_seconds, now)
    _check_credential_spec(spec)
    if spec.hardware_id_pattern is not None:
        hardware_pattern.compile_pattern(spec.hardware_id_pattern)  # InvalidPattern says why RE2 refuses it
    tenant_id = store.tenant_id(spec.tenant)
    expires_at, max_registrations = spec.expires_at, spec.max_registrations
    if spec.human_code:
        raw = identifiers.new_human_code()
        # Short codes are guessable at scale: always one-time and short-lived.
        max_registrations = 1
        expires_at = expires_at or now + settings.claims.code_ttl_seconds
    else:
        raw = identifiers.new_provision_key()
    key = ProvisionKey(
        id=identifiers.new_key_id(),
        tenant_id=tenant_id,
        tenant_name=spec.tenant,
        name=spec.name,
        kind="code" if spec.human_code else "key",
        key_hash=identifiers.digest(raw),
        profile=spec.profile,
        hardware_id_pattern=spec.hardware_id_pattern,
        expires_at=expires_at,
        max_registrations=max_registrations,
        registrations=0,
        labels=dict(spec.labels),
        groups=list(spec.groups),
        reclaim_policy=spec.reclaim_policy,
        status="active",
        created_at=now,
        credential_type=spec.credential_type,
        certificate_validity_seconds=spec.certificate_validity_seconds,
    )
    if key.credential_type == "certificate":
        # Before the key exists, so that no claim with it can find no CA to sign with. Never replaced once made.
        create_device_ca(settings.data_dir, datetime.fromtimestamp(now, UTC))
    store.create_key(key)
    return key, raw


def _check_credential_spec(spec: KeySpec) -> None:
    if spec.credential_type not in ("token", "certificate"):
        raise UsageError("credential type must be 'token' or 'certificate'")
    validity = spec.certificate_validity_seconds
    if validity is None:
        return
    if spec.credential_type != "certificate":
        raise UsageError("a certificate validity applies only to keys of credential type 'certificate'")
    if not device_ca.MIN_VALIDITY_SECONDS <= validity <= device_ca.MAX_VALIDITY_SECONDS:
        raise UsageError(
            f"certificate validity must be {device_ca.MIN_VALIDITY_SECONDS} s to {device_ca.MAX_VALIDITY_SECONDS} s"
            " (397 days)"
        )


def _check_code_spec(spec: KeySpec, code_ttl_seconds: int, now: int) -> None:
    """Short codes are guessable at scale: always one-time and short-lived, so options that say otherwise are
    refused rather than silently overridden."""
    if spec.max_registrations not in (None, 1):
        raise UsageError(
            f"a human code is always one-time: it cannot allow {spec.max_registrations} registrations"
            " (use a pk_ key for several devices)"
        )
    if spec.expires_at is not None and spec.expires_at > now + code_ttl_seconds:
        raise UsageError(
            f"a human code lives at most {code_ttl_seconds} s (claims.code_ttl_seconds): give a shorter expiry,"
            " or use a pk_ key for a longer one"
        )


def create_ops_user(settings: Settings, name: str) -> str:
    """A read-only broker account for events and status; returns its password, which is never stored."""
    reserved = {"provision", settings.broker.username}
    if OPS_NAME_RE.fullmatch(name) is None or name in reserved or name.startswith("dev_"):
        raise UsageError("ops user name must be 1-64 of A-Z a-z 0-9 . _ -, not 'provision', the bridge's, or dev_*")
    users = keyfiles.read_ops_users(settings.data_dir)
    if name in users:
        raise AlreadyExists(f"ops user {name!r} already exists (delete it first to reset its password)")
    password = identifiers.new_ops_password()
    users[name] = hashlib.sha256(password.encode("utf-8")).hexdigest()
    keyfiles.write_ops_users(settings.data_dir, users)
    return password


def delete_ops_user(settings: Settings, name: str) -> None:
    users = keyfiles.read_ops_users(settings.data_dir)
    if users.pop(name, None) is None:
        raise NotFound(f"no ops user {name!r}")
    keyfiles.write_ops_users(settings.data_dir, users)
