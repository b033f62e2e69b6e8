"""The one storage API the claim path and the admin actions use, on SQLite or PostgreSQL.

Two objects:
    Store         the database; each of its methods is one transaction or one read
    Transaction   the reads and writes of one open transaction (`with store.transaction() as tx:`): what
                  a claim or a refresh does between its read and its commit, all or nothing

Every query is here, written once for both engines; a `Database` (bridge/storage/database.py) runs them: SQLite
(bridge/storage/sqlite.py, the default) or PostgreSQL (bridge/storage/postgres.py). Either way one write transaction
runs at a time. Raw secrets never reach this module: provisioning and API keys arrive as SHA-256 digests, answers
arrive already sealed to the device. The engine's errors leave it as StorageError.
"""

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.errors import AlreadyExists, NotFound, UsageError
from bridge.storage import migrations, postgres, sqlite
from bridge.storage.database import Connection, Database
from bridge.storage.records import (
    AdminToken,
    AllowlistEntry,
    Device,
    IssuedCertificate,
    ProvisionKey,
    Refused,
    StoredAnswer,
    TenantSummary,
)
from provwire.models import Event, rfc3339

LOCK_TIMEOUT_SECONDS = 10.0  # how long a write waits for the database before it fails (retryable)
# Old events are deleted this many rows per transaction, with a pause between transactions: claims
# queue on the same write lock, so a purge of a huge backlog must not hold it for long at a time.
EVENT_PURGE_BATCH = 1000
EVENT_PURGE_PAUSE_SECONDS = 0.01


_KEY_SELECT = "SELECT k.*, t.name AS tenant_name FROM provision_keys k JOIN tenants t ON t.id = k.tenant_id"
_DEVICE_COLUMNS = "SELECT d.*, t.name AS tenant_name, p.online AS online, p.last_seen AS last_seen"
_DEVICE_SELECT = (
    _DEVICE_COLUMNS + " FROM devices d"
    " JOIN tenants t ON t.id = d.tenant_id LEFT JOIN device_presence p ON p.device_id = d.id"
)


def _devices_by_label(fixed_join: str) -> str:
    """A page of devices driven from a label's rows, in page order: the join keeps SQLite from reordering the loops
    (`Database.fixed_join`), so the driving table's index gives the order, one device row read per result."""
    return (
        _DEVICE_COLUMNS + f" FROM device_labels l {fixed_join} devices d ON d.id = l.device_id"
        " JOIN tenants t ON t.id = d.tenant_id LEFT JOIN device_presence p ON p.device_id = d.id"
    )


def _devices_by_presence(fixed_join: str) -> str:
    """As `_devices_by_label`, driven from the presence index."""
    return (
        _DEVICE_COLUMNS + f" FROM device_presence p {fixed_join} devices d ON d.id = p.device_id"
        " JOIN tenants t ON t.id = d.tenant_id"
    )


def _key(row: Any) -> ProvisionKey:
    return ProvisionKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        tenant_name=row["tenant_name"],
        name=row["name"],
        kind=row["kind"],
        key_hash=row["key_hash"],
        profile=row["profile"],
        hardware_id_pattern=row["hardware_id_pattern"],
        expires_at=row["expires_at"],
        max_registrations=row["max_registrations"],
        registrations=row["registrations"],
        labels=json.loads(row["labels"]),
        groups=json.loads(row["groups_"]),
        reclaim_policy=row["reclaim_policy"],
        status=row["status"],
        created_at=row["created_at"],
        credential_type=row["credential_type"],
        certificate_validity_seconds=row["certificate_validity_seconds"],
        preprovisioned_only=bool(row["preprovisioned_only"]),
    )


def _device(row: Any) -> Device:
    return Device(
        id=row["id"],
        tenant_id=row["tenant_id"],
        tenant_name=row["tenant_name"],
        hardware_id=row["hardware_id"],
        name=row["name"],
        public_key=row["public_key"],
        cloud_key_id=row["cloud_key_id"],
        labels=json.loads(row["labels"]),
        groups=json.loads(row["groups_"]),
        profile=row["profile"],
        hardware=json.loads(row["hardware"]) if row["hardware"] else None,
        network=json.loads(row["network"]) if row["network"] else None,
        agent_version=row["agent_version"],
        key_id=row["key_id"],
        status=row["status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        credential_type=row["credential_type"],
        credential_generation=row["credential_generation"],
        reset_pending=bool(row["reset_pending"]),
        refused_until=row["refused_until"],
        online=None if row["online"] is None else bool(row["online"]),
        last_seen=row["last_seen"],
    )


_ALLOWLIST_COLUMNS = "tenant_id, hardware_id, device_id, api_key_hash, name, labels, created_at"
# Rows of an unfinished import are not on the allowlist yet (migration 6).
_VISIBLE = (
    "(import_id IS NULL OR EXISTS"
    " (SELECT 1 FROM allowlist_imports i WHERE i.id = allowlist.import_id AND i.status = 'done'))"
)


def _entry(row: Any) -> AllowlistEntry:
    return AllowlistEntry(
        tenant_id=row["tenant_id"],
        hardware_id=row["hardware_id"],
        device_id=row["device_id"],
        api_key_hash=None if row["api_key_hash"] is None else bytes(row["api_key_hash"]),
        name=row["name"],
        labels=json.loads(row["labels"]),
        created_at=row["created_at"],
    )


def _entry_row(entry: AllowlistEntry, import_id: str | None) -> tuple[Any, ...]:
    """An entry's INSERT parameters (made before a transaction opens where they can be: json.dumps is not free)."""
    labels = json.dumps(entry.labels)
    return (entry.tenant_id, entry.hardware_id, entry.device_id, entry.api_key_hash, entry.name, labels,
            entry.created_at, import_id)  # fmt: skip


_INSERT_ENTRY = f"INSERT INTO allowlist ({_ALLOWLIST_COLUMNS}, import_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


def _insert_entry(db: Connection, entry: AllowlistEntry, import_id: str | None) -> None:
    db.execute(_INSERT_ENTRY, _entry_row(entry, import_id))


_ADMIN_TOKEN_SELECT = "SELECT a.*, t.name AS tenant_name FROM admin_tokens a LEFT JOIN tenants t ON t.id = a.tenant_id"


def _admin_token(row: Any) -> AdminToken:
    return AdminToken(
        id=row["id"],
        name=row["name"],
        token_hash=bytes(row["token_hash"]),
        scopes=frozenset(row["scopes"].split(",")),
        tenant_id=row["tenant_id"],
        tenant_name=row["tenant_name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


# A key's columns an operator may change (`Store.change_key`); the others are fixed at creation.
_CHANGEABLE_KEY_COLUMNS = frozenset(
    {"name", "profile", "expires_at", "max_registrations", "labels", "groups_", "reclaim_policy", "preprovisioned_only"}
    | {"status", "revoked_at"}
)
# What `Store.change_key` asks of the caller: given the key as stored, the columns to set and the event.
KeyChange = Callable[[ProvisionKey], tuple[dict[str, Any], Event]]
# A device's columns an operator may change (`Store.change_device`), and what it asks of the caller.
_CHANGEABLE_DEVICE_COLUMNS = frozenset({"name", "profile", "labels", "groups_", "api_key_hash"})
DeviceChange = Callable[[Device], tuple[dict[str, Any], Event]]
# What revoking, reinstating and resetting change (`Store.change_credentials`), and what they ask of the caller:
# given the device as stored and when its last certificate expires (0: it has none), the columns and the event.
_CREDENTIAL_COLUMNS = frozenset({"status", "credential_generation", "reset_pending", "refused_until", "updated_at"})
CredentialChange = Callable[[Device, int], tuple[dict[str, Any], Event]]
# What deleting asks of the caller (`Store.delete_device`): until when the denylist lists it, and the event.
Deletion = Callable[[Device, int], tuple[int, Event]]


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices a list shows; None: any."""

    tenant_id: str | None = None
    status: str | None = None
    hardware_id: str | None = None
    hardware_id_prefix: str | None = None
    label: tuple[str, str] | None = None  # (key, value)
    online: bool | None = None  # presence: True online, False seen and now offline (never seen: neither)
    device_id: str | None = None

    @property
    def by_hardware_id(self) -> bool:
        """A hardware-id prefix alone pages in hardware-id order (its index's), every other list newest first."""
        return self.hardware_id_prefix is not None and self.label is None and self.online is None


@dataclass(frozen=True)
class PageCursor:
    """Where a page ends: the next page starts after this (created_at, id), or for a list in hardware-id order
    after this (hardware_id, id)."""

    created_at: int
    device_id: str  # or the key's id
    hardware_id: str | None = None

    def encode(self) -> str:
        if self.hardware_id is None:
            raw = f"{self.created_at}:{self.device_id}"
        else:
            raw = f"h:{_b64(self.hardware_id.encode())}:{self.device_id}"
        return _b64(raw.encode())

    @classmethod
    def decode(cls, text: str) -> "PageCursor":
        """The cursor `encode` made; UsageError for anything else."""
        try:
            raw = _unb64(text).decode("ascii")
            if raw.startswith("h:"):
                _, hardware_id, device_id = raw.split(":", 2)
                cursor = cls(0, device_id, _unb64(hardware_id).decode())
            else:
                created_at, device_id = raw.split(":", 1)
                cursor = cls(int(created_at), device_id)
        except ValueError:
            raise UsageError(f"{text[:40]!r} is not a cursor from a previous page") from None
        if cursor.encode() != text or not 0 <= cursor.created_at < 1 << 40:
            raise UsageError(f"{text[:40]!r} is not a cursor from a previous page")
        return cursor


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _admin_event(name: str, now: int, tenant: str, actor: str, key: ProvisionKey | None = None, **fields: Any) -> Event:
    if key is not None:
        fields |= {"key_name": key.name, "key_id_prefix": key.id[:12]}
    return Event(event=name, time=rfc3339(now), tenant=tenant, actor=actor, **fields)


def _update_row(tx: "Transaction", table: str, row_id: str, columns: dict[str, Any], allowed: frozenset[str]) -> None:
    """Set `columns` of one row of `table` (labels and groups as JSON). Only `allowed` column names, which are
    this module's constants, reach the SQL text; the values are parameters."""
    unknown = set(columns) - allowed
    if unknown:
        raise ValueError(f"not a changeable {table} column: {', '.join(sorted(unknown))}")
    if columns:
        # Flags are integer columns: PostgreSQL takes no bool for them.
        values = [
            json.dumps(v) if c in ("labels", "groups_") else int(v) if isinstance(v, bool) else v
            for c, v in columns.items()
        ]
        assignments = ", ".join(f"{column} = ?" for column in columns)
        tx.connection.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", (*values, row_id))


def _insert_key(tx: "Transaction", key: ProvisionKey, actor: str | None) -> None:
    """Insert a key, and its `key.created` event made by `actor` (None: none, bulk codes have one for all)."""
    tx.connection.execute(
        "INSERT INTO provision_keys (id, tenant_id, name, kind, key_hash, profile,"
        " hardware_id_pattern, expires_at, max_registrations, registrations, labels, groups_,"
        " reclaim_policy, status, created_at, pattern_syntax, credential_type, certificate_validity_seconds,"
        " preprovisioned_only) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            key.id,
            key.tenant_id,
            key.name,
            key.kind,
            key.key_hash,
            key.profile,
            key.hardware_id_pattern,
            key.expires_at,
            key.max_registrations,
            0,
            json.dumps(key.labels),
            json.dumps(key.groups),
            key.reclaim_policy,
            "active",
            key.created_at,
            None if key.hardware_id_pattern is None else "re2",
            key.credential_type,
            key.certificate_validity_seconds,
            int(key.preprovisioned_only),
        ),
    )
    if actor is not None:
        tx.add_event(_admin_event("key.created", key.created_at, key.tenant_name, actor, key))


def write_probe(location: Path | str, timeout: float) -> str:
    """ "ok" when the database takes the write lock within `timeout` (then given back at once), else why not: a full
    disk, a read-only file, an unreachable server or a writer stuck holding the lock shows here (/readyz)."""
    if isinstance(location, str):
        return postgres.write_probe(location, timeout)
    return sqlite.write_probe(location, timeout)


def open_database(location: Path | str, lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> Database:
    """The database at `location`: a SQLite file, or a PostgreSQL server's `postgresql://` URL."""
    if isinstance(location, str):
        return postgres.PostgresDatabase(location, lock_timeout)
    return sqlite.SqliteDatabase(location, lock_timeout)


class Transaction:
    """The reads and writes of one open transaction. Only `Store.transaction()` makes one."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection  # for migrations and tests that set up rows no method writes

    # --- provisioning keys ---------------------------------------------------------------

    def key_by_hash(self, key_hash: bytes) -> ProvisionKey | None:
        row = self.connection.execute(_KEY_SELECT + " WHERE k.key_hash = ?", (key_hash,)).fetchone()
        return None if row is None else _key(row)

    def key_by_id(self, key_id: str) -> ProvisionKey | None:
        row = self.connection.execute(_KEY_SELECT + " WHERE k.id = ?", (key_id,)).fetchone()
        return None if row is None else _key(row)

    def spend_key_use(self, key_id: str) -> int:
        """Count one registration; returns the new count."""
        row = self.connection.execute(
            "UPDATE provision_keys SET registrations = registrations + 1 WHERE id = ? RETURNING registrations",
            (key_id,),
        ).fetchone()
        return int(row[0])

    # --- devices -------------------------------------------------------------------------

    def device_by_id(self, device_id: str) -> Device | None:
        row = self.connection.execute(_DEVICE_SELECT + " WHERE d.id = ?", (device_id,)).fetchone()
        return None if row is None else _device(row)

    def device_by_hardware_id(self, tenant_id: str, hardware_id: str) -> Device | None:
        row = self.connection.execute(
            _DEVICE_SELECT + " WHERE d.tenant_id = ? AND d.hardware_id = ?", (tenant_id, hardware_id)
        ).fetchone()
        return None if row is None else _device(row)

    def insert_device(self, device: Device, api_key_hash: bytes) -> None:
        self.connection.execute(
            "INSERT INTO devices (id, tenant_id, hardware_id, name, public_key, cloud_key_id, api_key_hash,"
            " labels, groups_, profile, hardware, network, agent_version, key_id, status, created_at,"
            " updated_at, credential_type) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                device.id,
                device.tenant_id,
                device.hardware_id,
                device.name,
                device.public_key,
                device.cloud_key_id,
                api_key_hash,
                json.dumps(device.labels),
                json.dumps(device.groups),
                device.profile,
                json.dumps(device.hardware) if device.hardware else None,
                json.dumps(device.network) if device.network else None,
                device.agent_version,
                device.key_id,
                device.status,
                device.created_at,
                device.updated_at,
                device.credential_type,
            ),
        )
        if device.labels:
            self.put_device_labels(device.id, device.created_at, device.labels)

    def record_certificate(self, issued: IssuedCertificate) -> None:
        self.connection.execute(
            "INSERT INTO device_certificates (serial, device_id, request_id, not_before, not_after, issued_at,"
            " generation) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                issued.serial,
                issued.device_id,
                issued.request_id,
                issued.not_before,
                issued.not_after,
                issued.issued_at,
                issued.generation,
            ),
        )

    def rotate_device_key(self, device: Device, api_key_hash: bytes, now: int) -> None:
        """Record `device`'s new public key (and the cloud key it was claimed with), its new API key and the
        credential type of the key it was re-claimed with; a pending reset is used up."""
        self.connection.execute(
            "UPDATE devices SET public_key = ?, cloud_key_id = ?, api_key_hash = ?, updated_at = ?,"
            " credential_type = ?, reset_pending = 0 WHERE id = ?",
            (device.public_key, device.cloud_key_id, api_key_hash, now, device.credential_type, device.id),
        )

    def allowlist_entry(self, tenant_id: str, hardware_id: str) -> AllowlistEntry | None:
        """The hardware id's allowlist entry, if it has one (of an unfinished import: not yet)."""
        row = self.connection.execute(
            f"SELECT {_ALLOWLIST_COLUMNS} FROM allowlist WHERE tenant_id = ? AND hardware_id = ? AND {_VISIBLE}",
            (tenant_id, hardware_id),
        ).fetchone()
        return None if row is None else _entry(row)

    def consume_allowlist_entry(self, tenant_id: str, hardware_id: str) -> None:
        """The entry became a device: it is off the allowlist (the device row is the record now)."""
        self.connection.execute(
            "DELETE FROM allowlist WHERE tenant_id = ? AND hardware_id = ?", (tenant_id, hardware_id)
        )

    def certificates_expire_at(self, device_id: str) -> int:
        """When the last certificate signed for the device expires (0: it has none)."""
        row = self.connection.execute(
            "SELECT MAX(not_after) FROM device_certificates WHERE device_id = ?", (device_id,)
        ).fetchone()
        return int(row[0] or 0)

    # --- answers (idempotency) -----------------------------------------------------------

    def stored_answer(self, client_id: str, request_id: str, not_before: int) -> StoredAnswer | None:
        row = self.connection.execute(
            "SELECT claim_digest, answer FROM answers WHERE client_id = ? AND request_id = ? AND created_at >= ?",
            (client_id, request_id, not_before),
        ).fetchone()
        return None if row is None else StoredAnswer(claim_digest=bytes(row[0]), answer=bytes(row[1]))

    def store_answer(self, client_id: str, request_id: str, claim_digest: bytes, answer: bytes, now: int) -> None:
        self.connection.execute(
            "INSERT INTO answers (client_id, request_id, claim_digest, answer, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (client_id, request_id) DO UPDATE SET claim_digest = excluded.claim_digest,"
            " answer = excluded.answer, created_at = excluded.created_at",
            (client_id, request_id, claim_digest, answer, now),
        )

    # --- files shared by the bridges of several hosts (bridge/storage/sharedfiles.py) ------------

    def shared_files(self) -> dict[str, bytes | None]:
        """Every shared file by name: its sealed content, or None for a file deleted."""
        rows = self.connection.execute("SELECT name, data FROM shared_files").fetchall()
        return {str(row[0]): None if row[1] is None else bytes(row[1]) for row in rows}

    def put_shared_file(self, name: str, data: bytes | None, now: int) -> None:
        self.connection.execute(
            "INSERT INTO shared_files (name, data, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
            (name, data, now),
        )

    # --- token refresh replay protection -------------------------------------------------

    def refresh_seen(self, device_id: str, request_id: str, now: int) -> bool:
        row = self.connection.execute(
            "SELECT 1 FROM refresh_requests WHERE device_id = ? AND request_id = ? AND expires_at >= ?",
            (device_id, request_id, now),
        ).fetchone()
        return row is not None

    def remember_refresh(self, device_id: str, request_id: str, expires_at: int) -> None:
        self.connection.execute(
            "INSERT INTO refresh_requests (device_id, request_id, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (device_id, request_id) DO UPDATE SET expires_at = excluded.expires_at",
            (device_id, request_id, expires_at),
        )

    def purge_refreshes(self, now: int) -> int:
        """Forget request ids whose timestamps are outside the skew window by now: they are refused anyway."""
        return self.connection.execute("DELETE FROM refresh_requests WHERE expires_at < ?", (now,)).rowcount

    # --- events --------------------------------------------------------------------------

    def add_event(self, event: Event) -> None:
        self.connection.execute(
            "INSERT INTO events (time, tenant, event, device_id, body) VALUES (?, ?, ?, ?, ?)",
            (event.time, event.tenant, event.event, event.device_id, event.model_dump_json(exclude_none=True)),
        )

    def put_device_labels(self, device_id: str, created_at: int, labels: dict[str, str]) -> None:
        self.connection.executemany(
            "INSERT INTO device_labels (key, value, created_at, device_id) VALUES (?, ?, ?, ?)",
            [(k, v, created_at, device_id) for k, v in labels.items()],
        )

    def drop_device_labels(self, device_id: str, created_at: int, labels: dict[str, str]) -> None:
        # By primary key: the rows are exactly the device's labels (every change of them goes through here).
        self.connection.executemany(
            "DELETE FROM device_labels WHERE key = ? AND value = ? AND created_at = ? AND device_id = ?",
            [(k, v, created_at, device_id) for k, v in labels.items()],
        )


class Store:
    """The database. Safe to share between threads: each thread gets its own connection."""

    def __init__(self, location: Path | str, lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> None:
        """`location`: a SQLite file (made owner-only if missing), or a PostgreSQL server's `postgresql://` URL.
        `lock_timeout`: how long a write waits for the write lock before it fails with StorageError (retryable)."""
        self.location = location
        self._db = open_database(location, lock_timeout)
        self._local = threading.local()
        self._by_label = _devices_by_label(self._db.fixed_join)
        self._by_presence = _devices_by_presence(self._db.fixed_join)
        with self._reading() as db:
            current = self._db.schema_version(db)
        if current != migrations.LATEST:  # an up-to-date database takes no lock
            with self.transaction() as tx:  # one upgrade at a time, whichever process opens it first
                self._db.upgrade(tx.connection)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One atomic write: everything inside commits together or not at all.

        Inside `batch()` (same thread) it is a savepoint of the batch's transaction instead: undone alone
        if it fails, committed with the batch.
        """
        if getattr(self._local, "batch", False):
            with self._db.savepoint() as conn:
                yield Transaction(conn)
        else:
            with self._db.writing() as conn:
                yield Transaction(conn)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction around several writes (the claim worker's group commit): each `transaction()`
        inside, on this thread, is a savepoint of it, and all of them commit together at the end, or none
        if the commit fails. One BEGIN, one COMMIT and one turn of the write locks for the lot: those cost
        a claim more than its own statements."""
        with self._db.writing(batch=True):
            self._local.batch = True
            try:
                yield
            finally:
                self._local.batch = False

    def _reading(self) -> AbstractContextManager[Connection]:
        """A read outside any transaction (it sees the last commit)."""
        return self._db.reading()

    def connection(self) -> Connection:
        """This thread's raw connection, for tests and tools that inspect the database; the bridge uses the
        methods."""
        return self._db.raw_connection()

    def close(self) -> None:
        self._db.close()

    def shared_files(self) -> dict[str, bytes | None]:
        """The files shared through the database (`Transaction.shared_files`), as last committed."""
        with self._reading() as db:
            return Transaction(db).shared_files()

    # --- tenants -------------------------------------------------------------------------

    def create_tenant(
        self, tenant_id: str, name: str, now: int, actor: str, default_key: ProvisionKey | None = None
    ) -> None:
        """A tenant, with its default key when given, and the events of both: one transaction."""
        with self.transaction() as tx:
            db = tx.connection
            if db.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"tenant {name!r} already exists")
            db.execute("INSERT INTO tenants VALUES (?, ?, ?)", (tenant_id, name, now))
            tx.add_event(_admin_event("tenant.created", now, name, actor))
            if default_key is not None:
                _insert_key(tx, default_key, actor)

    def tenants(self, after: str | None = None, limit: int = -1, tenant_id: str | None = None) -> list[TenantSummary]:
        """Tenants by name, the ones after `after` (a name), at most `limit` (-1: all); only `tenant_id` if given.
        Names are unique and indexed: a page is a seek, whatever the number of tenants."""
        where, args = "t.name > ?", [after or ""]
        if tenant_id is not None:
            where += " AND t.id = ?"
            args.append(tenant_id)
        with self._reading() as db:
            rows = db.execute(
                "SELECT t.id, t.name, t.created_at,"
                " (SELECT COUNT(*) FROM devices d WHERE d.tenant_id = t.id) AS devices,"
                " (SELECT COUNT(*) FROM provision_keys k WHERE k.tenant_id = t.id) AS keys"
                f" FROM tenants t WHERE {where} ORDER BY t.name LIMIT ?",  # `where`: constants above, not input
                (*args, limit if limit >= 0 else 2**62),
            ).fetchall()
        return [TenantSummary(r["id"], r["name"], r["created_at"], r["devices"], r["keys"]) for r in rows]

    def tenant_id(self, name: str) -> str:
        with self._reading() as db:
            row = db.execute("SELECT id FROM tenants WHERE name = ? OR id = ?", (name, name)).fetchone()
        if row is None:
            raise NotFound(f"no tenant {name!r}")
        return str(row["id"])

    # --- provisioning keys ---------------------------------------------------------------

    def create_key(self, key: ProvisionKey, actor: str) -> None:
        """One key and its `key.created` event."""
        with self.transaction() as tx:
            _insert_key(tx, key, actor)

    def create_codes(self, codes: list[ProvisionKey], event: Event) -> None:
        """Many keys (one-time codes) and the one event that says so, in one transaction: all or none."""
        with self.transaction() as tx:
            for code in codes:
                _insert_key(tx, code, None)
            tx.add_event(event)

    def key(self, key_id: str) -> ProvisionKey:
        with self._reading() as db:
            row = db.execute(_KEY_SELECT + " WHERE k.id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no provisioning key {key_id!r}")
        return _key(row)

    def keys(self, tenant_id: str | None = None) -> list[ProvisionKey]:
        """Every key (of one tenant), oldest first: for the few callers that need them all; lists page."""
        where, args = (" WHERE k.tenant_id = ?", (tenant_id,)) if tenant_id else ("", ())
        with self._reading() as db:
            return [_key(r) for r in db.execute(_KEY_SELECT + where + " ORDER BY k.created_at, k.id", args)]

    def keys_page(self, tenant_id: str | None, after: PageCursor | None, limit: int) -> list[ProvisionKey]:
        """Keys oldest first (by creation, then id), of one tenant or all, from just after `after`: one page, read
        in the order of an index (migration 9), so bulk codes by the hundred thousand cost a page."""
        clauses: list[str] = []
        args: list[str | int] = []
        if tenant_id is not None:
            clauses.append("k.tenant_id = ?")
            args.append(tenant_id)
        if after is not None:
            clauses.append("(k.created_at, k.id) > (?, ?)")  # a row value: the index seeks straight to it
            args += [after.created_at, after.device_id]
        sql = _KEY_SELECT + (" WHERE " + " AND ".join(clauses) if clauses else "")
        with self._reading() as db:
            return [_key(r) for r in db.execute(sql + " ORDER BY k.created_at, k.id LIMIT ?", (*args, limit))]

    def change_key(self, key_id: str, change: "KeyChange") -> tuple[ProvisionKey, Event]:
        """Read a key, let `change` decide (the columns to set and the event, or an exception that changes
        nothing), write both: one transaction, so two changes of the same key cannot lose one another.
        Returns the key as it now is and the event."""
        with self.transaction() as tx:
            db = tx.connection
            row = db.execute(_KEY_SELECT + " WHERE k.id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"no provisioning key {key_id!r}")
            columns, event = change(_key(row))
            _update_row(tx, "provision_keys", key_id, columns, _CHANGEABLE_KEY_COLUMNS)
            tx.add_event(event)
            return _key(db.execute(_KEY_SELECT + " WHERE k.id = ?", (key_id,)).fetchone()), event

    # --- devices -------------------------------------------------------------------------

    def find_device(self, device_id: str) -> Device | None:
        with self._reading() as db:
            return Transaction(db).device_by_id(device_id)

    def device(self, device_id: str) -> Device:
        device = self.find_device(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return device

    def devices(self, tenant_id: str | None = None, limit: int = 1000) -> list[Device]:
        """The newest `limit` devices (of one tenant): `devices_page` without a cursor."""
        return self.devices_page(DeviceFilter(tenant_id=tenant_id), None, limit)

    def devices_page(self, where: "DeviceFilter", after: PageCursor | None, limit: int) -> list[Device]:
        """Devices matching `where`, from just after `after`: one page, newest first (by creation, then id), or in
        hardware-id order for a hardware-id prefix alone (`DeviceFilter.by_hardware_id`).

        Every list is read in the order of an index, so a page costs a page on a fleet of any size: the devices'
        own (migration 4: all, tenant, status; a prefix is a range of `devices_hardware_id`), a label's rows
        (`device_labels`) or presence (`device_presence_page`; a tenant's, `device_presence_tenant_page`),
        whichever is given, the other filters checked on the rows it yields. The cursor is a row value, so a page
        seeks straight to it (many devices may share a creation second)."""
        clauses: list[str] = []
        args: list[str | int] = []
        if where.label is not None:
            sql, position = self._by_label, ("l.created_at", "l.device_id")
            clauses += ["l.key = ?", "l.value = ?"]
            args += list(where.label)
        elif where.online is not None:
            sql, position = self._by_presence, ("p.created_at", "p.device_id")
        else:
            sql, position = _DEVICE_SELECT, ("d.created_at", "d.id")
        if where.online is not None:
            clauses.append("p.online = ?")
            args.append(int(where.online))
            if where.tenant_id is not None:  # the presence rows' own copy: a seek into `device_presence_tenant_page`
                clauses.append("p.tenant_id = ?")
                args.append(where.tenant_id)
        # Column names below are constants, never input.
        for column, value in (
            ("tenant_id", where.tenant_id),
            ("status", where.status),
            ("hardware_id", where.hardware_id),
            ("id", where.device_id),
        ):
            if value is not None:
                clauses.append(f"d.{column} = ?")
                args.append(value)
        if where.hardware_id_prefix:
            # A range of the index rather than LIKE, whose wildcards would be the caller's to escape.
            clauses.append("d.hardware_id >= ? AND d.hardware_id < ?")
            args += [where.hardware_id_prefix, where.hardware_id_prefix + "\U0010ffff"]
        if where.by_hardware_id:
            order = "d.hardware_id, d.id"
            if after is not None:
                if after.hardware_id is None:
                    raise UsageError("that cursor is from a list in another order")
                clauses.append("(d.hardware_id, d.id) > (?, ?)")
                args += [after.hardware_id, after.device_id]
        else:
            order = f"{position[0]} DESC, {position[1]} DESC"
            if after is not None:
                if after.hardware_id is not None:
                    raise UsageError("that cursor is from a list in another order")
                clauses.append(f"({position[0]}, {position[1]}) < (?, ?)")
                args += [after.created_at, after.device_id]
        sql += (" WHERE " + " AND ".join(clauses) if clauses else "") + f" ORDER BY {order} LIMIT ?"
        with self._reading() as db:
            return [_device(r) for r in db.execute(sql, (*args, limit))]

    def device_by_api_key(self, api_key_hash: bytes) -> Device | None:
        """The device whose API key has this SHA-256 (an index lookup on the digest: the raw key is never
        compared, so the time taken says nothing about it)."""
        with self._reading() as db:
            row = db.execute(_DEVICE_SELECT + " WHERE d.api_key_hash = ?", (api_key_hash,)).fetchone()
        return None if row is None else _device(row)

    def change_device(self, device_id: str, change: "DeviceChange") -> tuple[Device, Event]:
        """As `change_key`, for a device: read it, let `change` decide the columns and the event, write both,
        one transaction."""
        with self.transaction() as tx:
            device = tx.device_by_id(device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            columns, event = change(device)
            _update_row(tx, "devices", device_id, columns, _CHANGEABLE_DEVICE_COLUMNS)
            if "labels" in columns:
                tx.drop_device_labels(device_id, device.created_at, device.labels)
                tx.put_device_labels(device_id, device.created_at, columns["labels"])
            tx.add_event(event)
            changed = tx.device_by_id(device_id)
            assert changed is not None
            return changed, event

    def change_credentials(
        self, device_id: str, change: CredentialChange, before_commit: Callable[[], None] | None = None
    ) -> tuple[Device, Event]:
        """Revoke, reinstate or reset: read the device, let `change` decide the columns and the event, write both,
        one transaction (so no claim or refresh of the device runs between the read and the write). `before_commit`
        runs last inside it: what it raises undoes the change."""
        with self.transaction() as tx:
            device = tx.device_by_id(device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            columns, event = change(device, tx.certificates_expire_at(device_id))
            _update_row(tx, "devices", device_id, columns, _CREDENTIAL_COLUMNS)
            tx.add_event(event)
            if before_commit is not None:
                before_commit()
            changed = tx.device_by_id(device_id)
            assert changed is not None
            return changed, event

    def delete_device(
        self, device_id: str, now: int, deletion: Deletion, before_commit: Callable[[], None] | None = None
    ) -> tuple[Device, Event]:
        """Delete a device and what hangs off it (its certificates' records, its remembered refresh ids), keeping
        a tombstone the denylist lists until `deletion`'s time; its hardware id is free from then on. One
        transaction; returns the device as it was and the event."""
        with self.transaction() as tx:
            device = tx.device_by_id(device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            refused_until, event = deletion(device, tx.certificates_expire_at(device_id))
            db = tx.connection
            db.execute(
                "INSERT INTO deleted_devices (id, tenant_id, hardware_id, deleted_at, refused_until)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET tenant_id = excluded.tenant_id,"
                " hardware_id = excluded.hardware_id, deleted_at = excluded.deleted_at,"
                " refused_until = excluded.refused_until",
                (device.id, device.tenant_id, device.hardware_id, now, refused_until),
            )
            db.execute("DELETE FROM device_certificates WHERE device_id = ?", (device_id,))
            db.execute("DELETE FROM refresh_requests WHERE device_id = ?", (device_id,))
            db.execute("DELETE FROM device_presence WHERE device_id = ?", (device_id,))
            tx.drop_device_labels(device_id, device.created_at, device.labels)
            db.execute("DELETE FROM devices WHERE id = ?", (device_id,))
            tx.add_event(event)
            if before_commit is not None:
                before_commit()
            return device, event

    def deleted_device(self, device_id: str) -> tuple[str, str, str] | None:
        """(tenant name, hardware id, id) of a device deleted and still on the denylist, if it is one."""
        with self._reading() as db:
            row = db.execute(
                "SELECT t.name, d.hardware_id, d.id FROM deleted_devices d JOIN tenants t ON t.id = d.tenant_id"
                " WHERE d.id = ?",
                (device_id,),
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]))

    def certificates(self, device_id: str) -> list[IssuedCertificate]:
        """The certificates signed for a device, oldest first."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT serial, device_id, request_id, not_before, not_after, issued_at, generation"
                " FROM device_certificates WHERE device_id = ? ORDER BY issued_at, serial",
                (device_id,),
            ).fetchall()
        return [IssuedCertificate(*row) for row in rows]

    def refused_credentials(self, now: int) -> list[Refused]:
        """Every device with credentials the brokers must still refuse at `now` (indexed by refused_until): revoked
        and deleted ones (all their credentials), and reinstated or reset ones (those of an older generation, with
        the serials of their older certificates still valid)."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT id, status, credential_generation, refused_until FROM devices WHERE refused_until > ?", (now,)
            ).fetchall()
            deleted = db.execute("SELECT id, refused_until FROM deleted_devices WHERE refused_until > ?", (now,))
            refused = [Refused(str(r[0]), int(r[1]), None) for r in deleted.fetchall()]
            for device_id, status, generation, until in rows:
                if status != "active":
                    refused.append(Refused(device_id, until, None))
                    continue
                serials = db.execute(
                    "SELECT serial FROM device_certificates WHERE device_id = ? AND generation < ? AND not_after > ?",
                    (device_id, generation, now),
                ).fetchall()
                refused.append(Refused(device_id, until, generation, frozenset(str(s[0]) for s in serials)))
        return sorted(refused, key=lambda r: r.device_id)

    def api_key_hash(self, device_id: str) -> bytes:
        with self._reading() as db:
            row = db.execute("SELECT api_key_hash FROM devices WHERE id = ?", (device_id,)).fetchone()
        if row is None:
            raise NotFound(f"no device {device_id!r}")
        return bytes(row[0])

    # --- the allowlist ---------------------------------------------------------------------

    def add_allowlist_entry(self, entry: AllowlistEntry, event: Event) -> None:
        """Put a hardware id on its tenant's allowlist, with its event, one transaction; AlreadyExists when it is
        on it already or is a device."""
        with self.transaction() as tx:
            if tx.device_by_hardware_id(entry.tenant_id, entry.hardware_id) is not None:
                raise AlreadyExists(f"hardware id {entry.hardware_id!r} is a device already")
            try:
                _insert_entry(tx.connection, entry, None)
            except self._db.integrity_error:
                raise AlreadyExists(f"hardware id {entry.hardware_id!r} is on the allowlist already") from None
            tx.add_event(event)

    def remove_allowlist_entry(self, tenant_id: str, hardware_id: str, event: Event) -> None:
        with self.transaction() as tx:
            deleted = tx.connection.execute(
                f"DELETE FROM allowlist WHERE tenant_id = ? AND hardware_id = ? AND {_VISIBLE}",
                (tenant_id, hardware_id),
            ).rowcount
            if not deleted:
                raise NotFound(f"hardware id {hardware_id!r} is not on the allowlist")
            tx.add_event(event)

    def allowlist_page(self, tenant_id: str, after: tuple[int, str] | None, limit: int) -> list[AllowlistEntry]:
        """A tenant's allowlist newest first, from just after (created_at, hardware_id) `after`: one page, by index.

        Merged from two sources in one read snapshot, so that a page never walks past the rows of an import still
        staging (they are in neither index read here): entries added one at a time, by (tenant, created_at,
        hardware_id); and the entries of each finished import, newest import first, by (import, hardware_id). An
        import's entries all have its created_at (`stage_entries` holds to it), so its rows come in page order, and
        the imports stop being read once the page is full of entries newer than the next import."""
        keyed: list[tuple[tuple[int, str], Any]] = []
        with self._db.snapshot() as db:  # an import finishing between the reads below is in all or none
            sql = f"SELECT {_ALLOWLIST_COLUMNS} FROM allowlist WHERE tenant_id = ? AND import_id IS NULL"
            args: list[str | int] = [tenant_id]
            if after is not None:
                sql += " AND (created_at < ? OR (created_at = ? AND hardware_id < ?))"
                args += [after[0], after[0], after[1]]
            rows = db.execute(sql + " ORDER BY created_at DESC, hardware_id DESC LIMIT ?", (*args, limit))
            keyed += [((r["created_at"], r["hardware_id"]), r) for r in rows]
            imports = db.execute(  # read as far as needed, not all
                "SELECT id, created_at FROM allowlist_imports WHERE tenant_id = ? AND status = 'done'"
                " AND created_at <= ? ORDER BY created_at DESC",
                (tenant_id, after[0] if after is not None else 2**62),
            )
            for import_id, created_at in imports:
                if len(keyed) >= limit and created_at < keyed[limit - 1][0][0]:
                    break  # this import's entries, and every older one's, come after the page's last
                sql = f"SELECT {_ALLOWLIST_COLUMNS} FROM allowlist WHERE import_id = ?"
                args = [import_id]
                if after is not None and created_at == after[0]:
                    sql += " AND hardware_id < ?"
                    args.append(after[1])
                rows = db.execute(sql + " ORDER BY hardware_id DESC LIMIT ?", (*args, limit))
                keyed += [((r["created_at"], r["hardware_id"]), r) for r in rows]
                keyed.sort(key=lambda pair: pair[0], reverse=True)  # keys are unique: a tenant's hardware ids
                del keyed[limit:]
        keyed.sort(key=lambda pair: pair[0], reverse=True)
        return [_entry(r) for _, r in keyed[:limit]]

    def allowlist_conflicts(self, tenant_id: str, hardware_ids: list[str]) -> dict[str, str]:
        """Which of `hardware_ids` cannot go on the tenant's allowlist, and why (read a few hundred at a time)."""
        conflicts: dict[str, str] = {}
        with self._reading() as db:
            for start in range(0, len(hardware_ids), 500):
                chunk = hardware_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for (hardware_id,) in db.execute(
                    f"SELECT hardware_id FROM devices WHERE tenant_id = ? AND hardware_id IN ({marks})",
                    (tenant_id, *chunk),
                ):
                    conflicts[hardware_id] = "is a device already"
                for (hardware_id,) in db.execute(
                    f"SELECT hardware_id FROM allowlist WHERE tenant_id = ? AND hardware_id IN ({marks})",
                    (tenant_id, *chunk),
                ):
                    conflicts.setdefault(hardware_id, "is on the allowlist already (or being imported)")
        return conflicts

    def begin_import(self, import_id: str, tenant_id: str, entries: int, now: int) -> None:
        """An import of `entries` entries, staging: nothing of it is visible until `finish_import`."""
        with self.transaction() as tx:
            tx.connection.execute(
                "INSERT INTO allowlist_imports (id, tenant_id, entries, status, created_at) VALUES (?, ?, ?, ?, ?)",
                (import_id, tenant_id, entries, "staging", now),
            )

    def stage_entries(self, import_id: str, entries: list[AllowlistEntry]) -> list[str]:
        """Write some of an import's entries, not yet visible to claims or lists: one transaction, whose length
        grows with len(entries) (the caller sizes the slices, and calls `checkpoint` between them). The entries take
        the import's created_at (as `begin_import` was given it), so that its entries list together. An entry whose
        hardware id became a device since the import was checked is not written but recorded as skipped (see
        `finish_import`); returns those hardware ids. AlreadyExists when an entry is on the allowlist meanwhile (or
        its admin-made device id is taken), or when the import is no longer staging (removed as a dead one): the
        caller removes the import."""
        rows = [_entry_row(entry, import_id) for entry in entries]  # outside the lock
        by_tenant: dict[str, list[str]] = {}
        for entry in entries:
            by_tenant.setdefault(entry.tenant_id, []).append(entry.hardware_id)
        with self._db.checkpoint_deferred(), self.transaction() as tx:
            db = tx.connection
            taken = {
                hardware_id
                for tenant_id, hardware_ids in by_tenant.items()
                for (hardware_id,) in db.execute(
                    "SELECT hardware_id FROM devices WHERE tenant_id = ?"
                    f" AND hardware_id IN ({','.join('?' * len(hardware_ids))})",
                    (tenant_id, *hardware_ids),
                )
            }
            staging = db.execute(
                "UPDATE allowlist_imports SET skipped = skipped + ?"
                " WHERE id = ? AND status = 'staging' AND aborted_at IS NULL RETURNING created_at",
                (len(taken), import_id),
            ).fetchone()
            if staging is None:
                raise AlreadyExists(f"import {import_id} was removed while it ran (taken for a dead one): run it again")
            created_at = staging[0]  # every entry of an import has its time: allowlist_page lists an import by it
            if any(row[6] != created_at for row in rows):
                rows = [(*row[:6], created_at, row[7]) for row in rows]
            try:
                db.executemany(_INSERT_ENTRY, (row for row in rows if row[1] not in taken) if taken else rows)
            except self._db.integrity_error:
                raise AlreadyExists(
                    "a hardware id (or admin-made device id) of the import was taken while it ran: nothing was imported"
                ) from None
            if taken:
                db.executemany(
                    "INSERT INTO allowlist_import_skipped (import_id, hardware_id) VALUES (?, ?)",
                    ((import_id, hardware_id) for hardware_id in sorted(taken)),
                )
        return sorted(taken)

    def finish_import(self, import_id: str, events: Callable[[int, int], list[Event]]) -> tuple[int, int]:
        """Every staged entry of the import on the allowlist at once: one transaction that changes one row (the
        import's status) and writes `events(listed, skipped)`, whatever the import's size.

        Entries whose hardware id became a device while the import ran are not on the allowlist: the device is the
        record now. Those are the import's *skipped* entries, taken out as they happen (by `stage_entries` when the
        device came first, by the trigger of migration 11 in the claim's own transaction when the entry came
        first), so nothing here looks at the entries. Returns (entries on the allowlist, entries skipped); their
        hardware ids are `import_skipped`. AlreadyExists when the import is no longer staging (another import took
        it for a dead one and is removing it)."""
        with self.transaction() as tx:
            row = tx.connection.execute(
                "UPDATE allowlist_imports SET status = 'done'"
                " WHERE id = ? AND status = 'staging' AND aborted_at IS NULL RETURNING entries, skipped",
                (import_id,),
            ).fetchone()
            if row is None:
                raise AlreadyExists(f"import {import_id} was removed while it ran (taken for a dead one): run it again")
            listed, skipped = int(row[0]) - int(row[1]), int(row[1])
            for event in events(listed, skipped):
                tx.add_event(event)
            return listed, skipped

    def import_skipped(self, import_id: str) -> list[str]:
        """The hardware ids an import skipped because they became devices while it ran (fixed once it is done)."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT hardware_id FROM allowlist_import_skipped WHERE import_id = ? ORDER BY hardware_id",
                (import_id,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def abort_import(self, import_id: str, batch: int, pause: float = 0.0) -> bool:
        """Remove an unfinished import: marked aborted first (one row: from then on it can be neither staged into
        nor finished), then its staged and skipped rows `batch` per transaction with `pause` seconds between, then
        the import itself. Its rows were never visible, so removing them in slices changes nothing anyone sees.
        Safe to repeat (an abort cut short is finished by the next); False, touching nothing, for a done import."""
        now = int(time.time())
        with self.transaction() as tx:
            marked = tx.connection.execute(
                "UPDATE allowlist_imports SET aborted_at = COALESCE(aborted_at, ?) WHERE id = ? AND status = 'staging'",
                (now, import_id),
            ).rowcount
        if not marked:
            return False
        for table, key in (("allowlist", self._db.row_key), ("allowlist_import_skipped", "hardware_id")):
            while True:
                with self._db.checkpoint_deferred(), self.transaction() as tx:
                    deleted = tx.connection.execute(
                        f"DELETE FROM {table} WHERE import_id = ? AND {key} IN"  # constants above, not input
                        f" (SELECT {key} FROM {table} WHERE import_id = ? LIMIT ?)",
                        (import_id, import_id, batch),
                    ).rowcount
                if deleted < batch:
                    break
                self.checkpoint()
                time.sleep(pause)
        with self.transaction() as tx:
            tx.connection.execute("DELETE FROM allowlist_imports WHERE id = ? AND status = 'staging'", (import_id,))
        return True

    def checkpoint(self) -> None:
        """Let the engine catch up between a bulk writer's (an import's) transactions, whose own commits leave it
        to this (SQLite's WAL checkpoint, `Database.checkpoint`)."""
        self._db.checkpoint()

    def unfinished_imports(self, older_than: int) -> list[str]:
        """Imports still staging that began before `older_than` (their process died) or were being aborted: to abort."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT id FROM allowlist_imports"
                " WHERE status = 'staging' AND (created_at < ? OR aborted_at IS NOT NULL)",
                (older_than,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    # --- presence -----------------------------------------------------------------------------

    def record_presence(self, changes: list[tuple[str, bool, int]]) -> None:
        """Devices' connections as their broker reported them, (device id, online, unix seconds) in order: one
        transaction; the last word per device wins. Devices the bridge does not know are skipped."""
        with self.transaction() as tx:
            tx.connection.executemany(
                "INSERT INTO device_presence (device_id, online, last_seen, created_at, tenant_id)"
                " SELECT d.id, ?, ?, d.created_at, d.tenant_id FROM devices d WHERE d.id = ?"
                " ON CONFLICT (device_id) DO UPDATE SET online = excluded.online, last_seen = excluded.last_seen",
                [(int(online), at, device_id) for device_id, online, at in changes],
            )

    # --- admin API tokens ---------------------------------------------------------------------

    def add_admin_token(self, token: AdminToken, event: Event) -> None:
        with self.transaction() as tx:
            tx.connection.execute(
                "INSERT INTO admin_tokens (id, name, token_hash, scopes, tenant_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    token.id,
                    token.name,
                    token.token_hash,
                    ",".join(sorted(token.scopes)),
                    token.tenant_id,
                    token.created_at,
                ),
            )
            tx.add_event(event)

    def admin_token_by_hash(self, token_hash: bytes) -> AdminToken | None:
        """The token with this SHA-256 (an index lookup on the digest: nothing about the raw token is compared)."""
        with self._reading() as db:
            row = db.execute(_ADMIN_TOKEN_SELECT + " WHERE a.token_hash = ?", (token_hash,)).fetchone()
        return None if row is None else _admin_token(row)

    def admin_token_by_id(self, token_id: str) -> AdminToken | None:
        with self._reading() as db:
            row = db.execute(_ADMIN_TOKEN_SELECT + " WHERE a.id = ?", (token_id,)).fetchone()
        return None if row is None else _admin_token(row)

    def admin_tokens(self) -> list[AdminToken]:
        with self._reading() as db:
            return [_admin_token(r) for r in db.execute(_ADMIN_TOKEN_SELECT + " ORDER BY a.created_at, a.id")]

    def revoke_admin_token(self, token_id: str, now: int, event: Callable[[AdminToken], Event]) -> AdminToken:
        """Revoke the token (NotFound if there is none). Revoking it again changes nothing and is no new event."""
        with self.transaction() as tx:
            changed = tx.connection.execute(
                "UPDATE admin_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id)
            ).rowcount
            row = tx.connection.execute(_ADMIN_TOKEN_SELECT + " WHERE a.id = ?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"no admin token {token_id!r}")
            token = _admin_token(row)
            if changed:
                tx.add_event(event(token))
            return token

    # --- answers, events -----------------------------------------------------------------

    def purge_deleted_devices(self, now: int) -> int:
        """Forget deleted devices the denylist no longer lists (every credential they held has expired)."""
        with self.transaction() as tx:
            return tx.connection.execute("DELETE FROM deleted_devices WHERE refused_until <= ?", (now,)).rowcount

    def purge_answers(self, older_than: int) -> int:
        with self.transaction() as tx:
            return tx.connection.execute("DELETE FROM answers WHERE created_at < ?", (older_than,)).rowcount

    def add_events(self, events: list[Event]) -> None:
        """Store events in a transaction of their own (refusals that change nothing else)."""
        with self.transaction() as tx:
            for event in events:
                tx.add_event(event)

    def purge_events(
        self, before: int, batch: int = EVENT_PURGE_BATCH, pause: float = EVENT_PURGE_PAUSE_SECONDS
    ) -> int:
        """Delete the events whose time is before `before` (Unix seconds); returns how many.

        In transactions of at most `batch` rows, the write lock released for `pause` seconds between
        them, so that claims waiting for it (in this process or another) get in: releasing alone is not
        enough, since neither a thread lock nor an flock hands over to a waiter.
        """
        cutoff = rfc3339(before)  # `time` is RFC 3339 UTC with milliseconds: it sorts as text
        purged = 0
        while True:
            with self.transaction() as tx:
                deleted = tx.connection.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE time < ? ORDER BY time LIMIT ?)",
                    (cutoff, batch),
                ).rowcount
            purged += deleted
            if deleted < batch:
                return purged
            time.sleep(pause)

    def events(
        self, tenant: str | None = None, event: str | None = None, limit: int = 50, device_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest `limit` events matching, oldest first."""
        return [body for _, body in self.events_page(tenant, event, device_id, None, limit)]

    def events_page(
        self, tenant: str | None, event: str | None, device_id: str | None, before: int | None, limit: int
    ) -> list[tuple[int, dict[str, Any]]]:
        """(sequence number, event) of the newest `limit` events matching, older than sequence `before`, oldest
        first: a device's, a tenant's and an event name's read by their index (migration 9)."""
        clauses: list[str] = []
        args: list[str | int] = []
        for column, value in (("device_id", device_id), ("tenant", tenant), ("event", event)):
            if value:
                clauses.append(f"{column} = ?")  # constants above, not input
                args.append(value)
        if before is not None:
            clauses.append("id < ?")
            args.append(before)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._reading() as db:
            rows = db.execute(f"SELECT id, body FROM events{where} ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [(int(r["id"]), json.loads(r["body"])) for r in reversed(rows)]

    def count(self, table: str) -> int:
        if table not in ("devices", "tenants", "provision_keys", "answers", "events", "device_certificates"):
            raise UsageError(f"unknown table {table}")
        with self._reading() as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
