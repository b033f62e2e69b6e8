"""Operator actions behind the CLI: initialise the data directory, create tenants and keys."""

import hashlib
import re
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from bridge.claims import hardware_pattern, identifiers
from bridge.config import Settings
from bridge.errors import AlreadyExists, NotFound, UsageError
from bridge.storage import keyfiles, sharedfiles
from bridge.storage.records import ProvisionKey, TenantSummary
from bridge.storage.store import PageCursor, Store
from bridge.tls import device_ca
from bridge.tls.device_ca import create_device_ca
from provwire.models import Event, rfc3339

OPS_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TENANT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # never "_", the no-tenant marker
DEFAULT_TENANT = "default"
FIRST_KEY_NAME = "first-key"
DEFAULT_KEY_NAME = "default"  # the key `tenant create` makes with each tenant
CLI_ACTOR = "cli"  # the `actor` of the events of changes made with the CLI
MAX_CODES_AT_ONCE = 10_000
MAX_KEY_NAME_CHARS = 128
MAX_KEY_PAGE = 1000  # keys per page
MAX_LABELS = 32  # labels, and groups, of a key or device (as an allowlist entry's)
MAX_LABEL_CHARS = 128
MAX_TENANT_PAGE = 1000  # tenants per page
RECLAIM_POLICIES = ("reject", "rotate")
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
    # creates devices only for hardware ids on the allowlist (bridge/ops/allowlist.py)
    preprovisioned_only: bool = False


@dataclass(frozen=True)
class TenantCreated:
    id: str
    name: str
    default_key: ProvisionKey
    provision_key: str  # the default key's raw value: shown once, never stored


@dataclass(frozen=True)
class InitResult:
    created: bool
    tenant: str
    cloud_key_id: str
    key_id: str | None = None
    provision_key: str | None = None  # shown once, never stored
    joined: bool = False  # PostgreSQL: the keys were taken from the database, made by another host's `init`


def open_store(settings: Settings) -> Store:
    keyfiles.load_keys(settings.data_dir)  # refuses an uninitialised data dir with a clear reason
    return Store(settings.database)


def init_data_dir(settings: Settings) -> InitResult:
    """Create keys, database, default tenant and a first key. Does nothing if already done.

    On PostgreSQL the key files are shared through the database (bridge/storage/sharedfiles.py): the first `init`
    of a deployment makes them, its storage key, and puts them there; `init` on another host given that storage
    key takes them from there (`joined`), and makes no tenant or key."""
    data_dir = settings.data_dir
    if keyfiles.is_initialised(data_dir):
        ring = keyfiles.load_keys(data_dir)
        return InitResult(created=False, tenant=DEFAULT_TENANT, cloud_key_id=ring.active_cloud)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(settings.database)
    try:
        if sharedfiles.is_shared(settings) and any(data is not None for data in store.shared_files().values()):
            sharedfiles.sync(settings, store)  # another host made this deployment: its keys, by its storage key
            ring = keyfiles.load_keys(data_dir)
            return InitResult(created=False, tenant=DEFAULT_TENANT, cloud_key_id=ring.active_cloud, joined=True)
        now = int(time.time())
        # The default tenant's default key is the first key, whose value `init` shows once.
        if not any(t.name == DEFAULT_TENANT for t in store.tenants()):
            created = create_tenant(store, settings, DEFAULT_TENANT, now, key_name=FIRST_KEY_NAME)
            key, raw = created.default_key, created.provision_key
        else:  # a database left by an `init` that stopped before making the keys
            key, raw = create_key(store, settings, KeySpec(tenant=DEFAULT_TENANT, name=FIRST_KEY_NAME), now)
        # Keys last: their presence is what marks the directory as initialised.
        ring = keyfiles.create_keys(data_dir)
        if sharedfiles.is_shared(settings):
            sharedfiles.publish(settings, store, now)
    finally:
        store.close()
    return InitResult(True, DEFAULT_TENANT, ring.active_cloud, key.id, raw)


def create_tenant(
    store: Store,
    settings: Settings,
    name: str,
    now: int,
    actor: str = CLI_ACTOR,
    key_name: str = DEFAULT_KEY_NAME,
) -> TenantCreated:
    """A tenant and its default key (`DEFAULT_KEY_NAME`, unlimited), in one transaction; the key's raw value is
    returned to be shown once. Like a new project's default registration token: devices can claim at once."""
    if TENANT_NAME_RE.fullmatch(name) is None:
        raise UsageError(
            "tenant name must be 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            " (it appears in event topics)"
        )
    tenant_id = identifiers.new_tenant_id()
    key, raw = _new_key(settings, KeySpec(tenant=name, name=key_name), tenant_id, now)
    store.create_tenant(tenant_id, name, now, actor, default_key=key)
    return TenantCreated(tenant_id, name, key, raw)


def create_key(
    store: Store, settings: Settings, spec: KeySpec, now: int, actor: str = CLI_ACTOR
) -> tuple[ProvisionKey, str]:
    """Create a provisioning key; returns it and its raw value, which is never stored."""
    key, raw = _new_key(settings, spec, store.tenant_id(spec.tenant), now)
    if key.credential_type == "certificate":
        # Before the key exists, so that no claim with it can find no CA to sign with. Never replaced once made.
        create_device_ca(settings.data_dir, datetime.fromtimestamp(now, UTC))
    store.create_key(key, actor)
    return key, raw


def create_codes(
    store: Store, settings: Settings, spec: KeySpec, count: int, now: int, actor: str = CLI_ACTOR
) -> list[tuple[ProvisionKey, str]]:
    """`count` one-time human codes made alike from `spec` (its `human_code` implied), in one transaction with
    one `key.codes_created` event; each returned with its raw value, to be shown once."""
    if not 1 <= count <= MAX_CODES_AT_ONCE:
        raise UsageError(f"give 1 to {MAX_CODES_AT_ONCE} codes at a time")
    spec = replace(spec, human_code=True)
    tenant_id = store.tenant_id(spec.tenant)
    codes = [_new_key(settings, spec, tenant_id, now) for _ in range(count)]
    if spec.credential_type == "certificate":
        create_device_ca(settings.data_dir, datetime.fromtimestamp(now, UTC))
    event = Event(
        event="key.codes_created", time=rfc3339(now), tenant=spec.tenant, key_name=spec.name, actor=actor, count=count
    )
    store.create_codes([key for key, _ in codes], event)
    return codes


def _new_key(settings: Settings, spec: KeySpec, tenant_id: str, now: int) -> tuple[ProvisionKey, str]:
    """A key as `spec` says, checked (UsageError says what is wrong), not stored; and its raw value."""
    check_profile(settings, spec.profile)
    if spec.reclaim_policy not in RECLAIM_POLICIES:
        raise UsageError("re-claim policy must be 'reject' or 'rotate'")
    _check_name(spec.name)
    check_labels_and_groups(dict(spec.labels), list(spec.groups))
    if spec.max_registrations is not None and spec.max_registrations < 1:
        raise UsageError("max registrations must be at least 1 (leave it out for unlimited)")
    if spec.expires_at is not None and spec.expires_at <= now:
        raise UsageError("expiry must be in the future")
    if spec.human_code:
        _check_code_spec(spec, settings.claims.code_ttl_seconds, now)
    _check_credential_spec(spec)
    if spec.hardware_id_pattern is not None:
        hardware_pattern.compile_pattern(spec.hardware_id_pattern)  # InvalidPattern says why RE2 refuses it
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
        preprovisioned_only=spec.preprovisioned_only,
    )
    return key, raw


# --- changing a key ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelChanges:
    """Labels set or removed and groups added or removed, as `key update` and `device update` take them."""

    set_labels: dict[str, str] = field(default_factory=dict)
    remove_labels: list[str] = field(default_factory=list)
    add_groups: list[str] = field(default_factory=list)
    remove_groups: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class KeyUpdate:
    """What `key update` changes; what is left at its default stays as it is."""

    name: str | None = None
    profile: str | None = None
    max_registrations: int | None = None
    unlimited: bool = False  # no limit on registrations
    expires_at: int | None = None
    no_expiry: bool = False
    labels: LabelChanges = field(default_factory=LabelChanges)
    reclaim_policy: str | None = None
    preprovisioned_only: bool | None = None

    def is_empty(self) -> bool:
        return self == KeyUpdate()


def update_key(
    store: Store, settings: Settings, key_id: str, update: KeyUpdate, now: int, actor: str = CLI_ACTOR
) -> tuple[ProvisionKey, list[str]]:
    """Change a key as `update` says, with a `key.updated` event naming the fields that changed: one transaction.
    Refused (UsageError, nothing changed) when the result would not be a key `key create` could make.
    Returns the key as it now is and the fields that changed."""
    if update.is_empty():
        raise UsageError("nothing to change: give at least one option (see --help)")
    if update.unlimited and update.max_registrations is not None:
        raise UsageError("give --max-registrations or --unlimited, not both")
    if update.no_expiry and update.expires_at is not None:
        raise UsageError("give an expiry or --no-expiry, not both")
    key, event = store.change_key(key_id, lambda key: key_update(key, update, settings, now, actor))
    return key, event.changes or []


def key_update(
    key: ProvisionKey, update: KeyUpdate, settings: Settings, now: int, actor: str
) -> tuple[dict[str, Any], Event]:
    """The columns `update` sets on `key`, and the event saying which fields changed (pure)."""
    labels, groups = labels_and_groups("key", key.labels, key.groups, update.labels)
    after: dict[str, Any] = {  # in the order `changes` lists them
        "name": update.name if update.name is not None else key.name,
        "profile": update.profile if update.profile is not None else key.profile,
        "max_registrations": None
        if update.unlimited
        else (update.max_registrations if update.max_registrations is not None else key.max_registrations),
        "expires_at": None if update.no_expiry else (update.expires_at or key.expires_at),
        "labels": labels,
        "groups": groups,
        "reclaim_policy": update.reclaim_policy or key.reclaim_policy,
        "preprovisioned_only": key.preprovisioned_only
        if update.preprovisioned_only is None
        else update.preprovisioned_only,
    }
    _check_name(after["name"])
    check_profile(settings, after["profile"])
    if after["reclaim_policy"] not in RECLAIM_POLICIES:
        raise UsageError("re-claim policy must be 'reject' or 'rotate'")
    if after["max_registrations"] is not None and after["max_registrations"] < 1:
        raise UsageError("max registrations must be at least 1 (--unlimited for no limit)")
    if update.expires_at is not None and update.expires_at <= now:
        raise UsageError("expiry must be in the future")
    if key.kind == "code":
        if after["max_registrations"] != 1:
            raise UsageError("a human code is always one-time: its registrations cannot change")
        if after["expires_at"] is None or after["expires_at"] > key.created_at + settings.claims.code_ttl_seconds:
            raise UsageError(
                f"a human code lives at most {settings.claims.code_ttl_seconds} s from its creation"
                " (claims.code_ttl_seconds): it can be shortened, not lengthened"
            )
    before = {
        "name": key.name,
        "profile": key.profile,
        "max_registrations": key.max_registrations,
        "expires_at": key.expires_at,
        "labels": key.labels,
        "groups": key.groups,
        "reclaim_policy": key.reclaim_policy,
        "preprovisioned_only": key.preprovisioned_only,
    }
    columns, changed = changed_columns(before, after)
    event = _key_event("key.updated", replace(key, name=after["name"]), now, actor, changes=changed)
    return columns, event


def labels_and_groups(
    what: str, labels: dict[str, str], groups: list[str], changes: LabelChanges
) -> tuple[dict[str, str], list[str]]:
    """`labels` and `groups` after `changes` (pure); UsageError when one to remove is not there."""
    missing = [name for name in changes.remove_labels if name not in labels]
    missing += [group for group in changes.remove_groups if group not in groups]
    if missing:
        raise UsageError(f"the {what} has no label or group {', '.join(map(repr, missing))} to remove")
    check_labels_and_groups(changes.set_labels, changes.add_groups)
    kept = {k: v for k, v in labels.items() if k not in changes.remove_labels}
    added = [g for g in dict.fromkeys(changes.add_groups) if g not in groups]
    after = kept | changes.set_labels, [g for g in groups if g not in changes.remove_groups] + added
    if (changes.set_labels or changes.add_groups) and (len(after[0]) > MAX_LABELS or len(after[1]) > MAX_LABELS):
        raise UsageError(f"a {what} has at most {MAX_LABELS} labels and {MAX_LABELS} groups")
    return after


def check_labels_and_groups(labels: dict[str, str], groups: list[str]) -> None:
    """Labels and groups an operator gives, as the allowlist's are checked: printable (no NUL, no control or
    bidirectional-override characters that would make a list lie), bounded, and a label name without '=' or ';',
    which `--label NAME=VALUE` filters and the CSV's `name=value;...` column could not tell apart."""
    if len(labels) > MAX_LABELS or len(groups) > MAX_LABELS:
        raise UsageError(f"at most {MAX_LABELS} labels and {MAX_LABELS} groups")
    for name, value in labels.items():
        if not (1 <= len(name) <= MAX_LABEL_CHARS and len(value) <= MAX_LABEL_CHARS):
            raise UsageError(f"a label name is 1-{MAX_LABEL_CHARS} characters, its value at most {MAX_LABEL_CHARS}")
        if not (name.isprintable() and value.isprintable()) or any(c in name for c in "=;"):
            raise UsageError("labels must be printable, and a label name has no '=' or ';'")
    for group in groups:
        if not (1 <= len(group) <= MAX_LABEL_CHARS and group.isprintable()):
            raise UsageError(f"a group is 1-{MAX_LABEL_CHARS} printable characters")


def changed_columns(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The columns to write for the fields whose value differs (groups live in `groups_`), and those fields."""
    changed = [name for name in after if after[name] != before[name]]
    return {("groups_" if name == "groups" else name): after[name] for name in changed}, changed


def check_profile(settings: Settings, profile: str) -> None:
    if profile not in settings.profiles:
        raise UsageError(f"unknown profile {profile!r}; configured: {', '.join(sorted(settings.profiles))}")


@dataclass(frozen=True)
class TenantPage:
    tenants: list[TenantSummary]
    next_cursor: str | None  # the last tenant's name; None: this was the last page


def list_tenants(store: Store, after: str | None, limit: int, tenant_id: str | None = None) -> TenantPage:
    """One page of tenants by name (only `tenant_id` if given); `after` is the `next_cursor` of the page before."""
    if not 1 <= limit <= MAX_TENANT_PAGE:
        raise UsageError(f"a page holds 1 to {MAX_TENANT_PAGE} tenants")
    found = store.tenants(after, limit + 1, tenant_id)  # one more: is there a next page?
    page = found[:limit]
    return TenantPage(page, page[-1].name if len(found) > limit and page else None)


@dataclass(frozen=True)
class KeyPage:
    keys: list[ProvisionKey]
    next_cursor: str | None  # None: this was the last page


def list_keys(store: Store, tenant_id: str | None, after: str | None, limit: int) -> KeyPage:
    """One page of keys, oldest first; `after` is the `next_cursor` of the page before."""
    if not 1 <= limit <= MAX_KEY_PAGE:
        raise UsageError(f"a page holds 1 to {MAX_KEY_PAGE} keys")
    cursor = None if after is None else PageCursor.decode(after)
    found = store.keys_page(tenant_id, cursor, limit + 1)  # one more: is there a next page?
    page = found[:limit]
    last = page[-1] if page else None
    more = len(found) > limit and last is not None
    return KeyPage(page, PageCursor(last.created_at, last.id).encode() if more and last else None)


def revoke_key(store: Store, key_id: str, now: int, actor: str = CLI_ACTOR) -> ProvisionKey:
    """New claims with the key are refused (`key_revoked`); devices it made keep working. Idempotent."""

    def revoke(key: ProvisionKey) -> tuple[dict[str, Any], Event]:
        columns: dict[str, Any] = {} if key.status == "revoked" else {"status": "revoked", "revoked_at": now}
        return columns, _key_event("key.revoked", key, now, actor)

    return store.change_key(key_id, revoke)[0]


def reinstate_key(store: Store, key_id: str, now: int, actor: str = CLI_ACTOR) -> ProvisionKey:
    """Undo `revoke_key`: claims with the key are taken again (within its expiry and registrations)."""

    def reinstate(key: ProvisionKey) -> tuple[dict[str, Any], Event]:
        if key.status != "revoked":
            raise UsageError(f"key {key.id} is not revoked")
        return {"status": "active", "revoked_at": None}, _key_event("key.reinstated", key, now, actor)

    return store.change_key(key_id, reinstate)[0]


def _key_event(name: str, key: ProvisionKey, now: int, actor: str, **fields: Any) -> Event:
    return Event(
        event=name,
        time=rfc3339(now),
        tenant=key.tenant_name,
        key_name=key.name,
        key_id_prefix=key.id[:12],
        actor=actor,
        **fields,
    )


def _check_name(name: str) -> None:
    if not 1 <= len(name) <= MAX_KEY_NAME_CHARS or not name.isprintable():
        raise UsageError(f"a key name must be 1-{MAX_KEY_NAME_CHARS} printable characters")


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
