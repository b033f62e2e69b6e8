"""The database schema, versioned: `PRAGMA user_version` counts the MIGRATIONS a database has had.

`Store` runs `upgrade` inside a write transaction each time it opens a database, so a database made
by any earlier version is brought up to date in place, and a new one is made by the same steps. A
step never edits an earlier one: a change to the schema is a new step at the end.
"""

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from bridge.config import TOKEN_TTL_CAP_SECONDS
from bridge.errors import StorageError

# The tables as the first release made them. Databases made before versioning (user_version 0) have
# them already: IF NOT EXISTS makes step 1 a no-op there.
TABLES_V1 = """
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS provision_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('key', 'code')),
    key_hash BLOB NOT NULL UNIQUE,
    profile TEXT NOT NULL,
    hardware_id_pattern TEXT,
    expires_at INTEGER,
    max_registrations INTEGER,
    registrations INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL,
    groups_ TEXT NOT NULL,
    reclaim_policy TEXT NOT NULL CHECK (reclaim_policy IN ('reject', 'rotate')),
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    hardware_id TEXT NOT NULL,
    name TEXT,
    public_key BLOB NOT NULL,
    cloud_key_id TEXT NOT NULL,
    api_key_hash BLOB NOT NULL,
    labels TEXT NOT NULL,
    groups_ TEXT NOT NULL,
    profile TEXT NOT NULL,
    hardware TEXT,
    network TEXT,
    agent_version TEXT,
    key_id TEXT NOT NULL REFERENCES provision_keys(id),
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (tenant_id, hardware_id)
);
CREATE TABLE IF NOT EXISTS answers (
    client_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    claim_digest BLOB NOT NULL,
    answer BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (client_id, request_id)
);
CREATE INDEX IF NOT EXISTS answers_created ON answers (created_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    tenant TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS refresh_requests (
    device_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (device_id, request_id)
);
CREATE INDEX IF NOT EXISTS refresh_requests_expiry ON refresh_requests (expires_at);
"""


def _create_tables(db: sqlite3.Connection) -> None:
    for statement in TABLES_V1.split(";"):  # not executescript: it would commit the upgrade's transaction
        if statement.strip():
            db.execute(statement)


def _add_pattern_syntax(db: sqlite3.Connection) -> None:
    # 're2' for patterns written since RE2 runs them; NULL for those written for Python's re (doctor compares them).
    columns = {row[1] for row in db.execute("PRAGMA table_info(provision_keys)")}
    if "pattern_syntax" not in columns:  # development databases of this version may have it already
        db.execute("ALTER TABLE provision_keys ADD COLUMN pattern_syntax TEXT")


def _add_certificates(db: sqlite3.Connection) -> None:
    # The certificate credential type (issue 11): which keys issue certificates, with what validity, which
    # devices hold one, and every certificate signed, by serial.
    for table, column, definition in (
        ("provision_keys", "credential_type", "TEXT NOT NULL DEFAULT 'token'"),
        ("provision_keys", "certificate_validity_seconds", "INTEGER"),
        ("devices", "credential_type", "TEXT NOT NULL DEFAULT 'token'"),
    ):
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")  # constants above, not input
    db.execute(
        "CREATE TABLE device_certificates ("
        " serial TEXT PRIMARY KEY,"
        " device_id TEXT NOT NULL REFERENCES devices(id),"
        " request_id TEXT NOT NULL,"
        " not_before INTEGER NOT NULL,"
        " not_after INTEGER NOT NULL,"
        " issued_at INTEGER NOT NULL)"
    )
    db.execute("CREATE INDEX device_certificates_device ON device_certificates (device_id, issued_at)")


def _add_list_indexes(db: sqlite3.Connection) -> None:
    # Issue 12: device lists page by (created_at, id), newest first, filtered by tenant or status; an API
    # key is looked up by its hash. Each query `Store.devices_page` and `Store.device_by_api_key` run has one.
    db.execute("CREATE INDEX devices_created ON devices (created_at, id)")
    db.execute("CREATE INDEX devices_tenant_created ON devices (tenant_id, created_at, id)")
    db.execute("CREATE INDEX devices_status_created ON devices (status, created_at, id)")
    db.execute("CREATE INDEX devices_hardware_id ON devices (hardware_id)")
    db.execute("CREATE INDEX devices_api_key ON devices (api_key_hash)")


def _add_credential_lifecycle(db: sqlite3.Connection) -> None:
    # Issue 12: tokens stay honest through reinstatement, reset and deletion. A device's credential generation
    # (tokens carry it as `gen`, certificates record it), until when the denylist must list what it held
    # before (`refused_until`), whether a reset awaits its claim, and the deleted devices still listed.
    for column, definition in (
        ("credential_generation", "INTEGER NOT NULL DEFAULT 0"),
        ("refused_until", "INTEGER"),
        ("reset_pending", "INTEGER NOT NULL DEFAULT 0"),
    ):
        db.execute(f"ALTER TABLE devices ADD COLUMN {column} {definition}")  # constants above, not input
    db.execute("ALTER TABLE device_certificates ADD COLUMN generation INTEGER NOT NULL DEFAULT 0")
    # A device revoked before this version is listed as it was: from its revocation (updated_at) for the
    # token lifetime cap, or until its last certificate expires if that is later.
    db.execute(
        "UPDATE devices SET refused_until = MAX(updated_at + ?, COALESCE("
        " (SELECT MAX(c.not_after) FROM device_certificates c WHERE c.device_id = devices.id), 0))"
        " WHERE status = 'revoked'",
        (TOKEN_TTL_CAP_SECONDS,),
    )
    db.execute("CREATE INDEX devices_refused_until ON devices (refused_until) WHERE refused_until IS NOT NULL")
    db.execute(
        "CREATE TABLE deleted_devices ("
        " id TEXT PRIMARY KEY,"
        " tenant_id TEXT NOT NULL,"
        " hardware_id TEXT NOT NULL,"
        " deleted_at INTEGER NOT NULL,"
        " refused_until INTEGER NOT NULL)"
    )
    db.execute("CREATE INDEX deleted_devices_refused_until ON deleted_devices (refused_until)")


def _add_allowlist(db: sqlite3.Connection) -> None:
    # Issue 12: pre-provisioned hardware ids. An entry may carry a name and labels for the device, and an
    # admin-made device id and API key (hash). Rows of a CSV import stay invisible to claims until their import
    # is `done`, so the import is all-or-nothing as claims see it while it writes in short transactions.
    db.execute("ALTER TABLE provision_keys ADD COLUMN preprovisioned_only INTEGER NOT NULL DEFAULT 0")
    db.execute(
        "CREATE TABLE allowlist_imports ("
        " id TEXT PRIMARY KEY,"
        " tenant_id TEXT NOT NULL REFERENCES tenants(id),"
        " entries INTEGER NOT NULL,"
        " status TEXT NOT NULL CHECK (status IN ('staging', 'done')),"
        " created_at INTEGER NOT NULL)"
    )
    db.execute(
        "CREATE TABLE allowlist ("
        " tenant_id TEXT NOT NULL REFERENCES tenants(id),"
        " hardware_id TEXT NOT NULL,"
        " device_id TEXT,"
        " api_key_hash BLOB,"
        " name TEXT,"
        " labels TEXT NOT NULL,"
        " import_id TEXT REFERENCES allowlist_imports(id),"
        " created_at INTEGER NOT NULL,"
        " PRIMARY KEY (tenant_id, hardware_id))"
    )
    db.execute("CREATE UNIQUE INDEX allowlist_device_id ON allowlist (device_id) WHERE device_id IS NOT NULL")
    db.execute("CREATE INDEX allowlist_import ON allowlist (import_id) WHERE import_id IS NOT NULL")
    db.execute("CREATE INDEX allowlist_tenant_created ON allowlist (tenant_id, created_at, hardware_id)")
    db.execute("CREATE INDEX allowlist_imports_status ON allowlist_imports (status, created_at)")


def _add_admin_tokens(db: sqlite3.Connection) -> None:
    # Issue 12: tokens of the admin HTTP API, stored as SHA-256; scoped to a tenant or all (tenant_id NULL).
    db.execute(
        "CREATE TABLE admin_tokens ("
        " id TEXT PRIMARY KEY,"
        " name TEXT NOT NULL,"
        " token_hash BLOB NOT NULL UNIQUE,"
        " scopes TEXT NOT NULL,"
        " tenant_id TEXT REFERENCES tenants(id),"
        " created_at INTEGER NOT NULL,"
        " revoked_at INTEGER)"
    )


def _add_presence(db: sqlite3.Connection) -> None:
    # Issue 12: whether each device is connected, from its broker's connection events, apart from the device
    # row so that a reconnect storm's batched writes never rewrite devices (or their indexes).
    db.execute(
        "CREATE TABLE device_presence ("
        " device_id TEXT PRIMARY KEY,"
        " online INTEGER NOT NULL,"
        " last_seen INTEGER NOT NULL)"
    )
    db.execute("CREATE INDEX device_presence_online ON device_presence (online, device_id)")


def _add_dashboard_indexes(db: sqlite3.Connection) -> None:
    # Issue 12: what the dashboard filters on reads an index. A device's labels, one row each, ordered as a device
    # list is (newest first), so a page of devices with a label costs the same on a fleet of any size; a device's
    # events, a tenant's and an event name's by their own index rather than a scan of every event; keys a page at a
    # time (bulk codes make many).
    db.execute(
        "CREATE TABLE device_labels ("
        " key TEXT NOT NULL,"
        " value TEXT NOT NULL,"
        " created_at INTEGER NOT NULL,"
        " device_id TEXT NOT NULL,"
        " PRIMARY KEY (key, value, created_at, device_id)) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO device_labels (key, value, created_at, device_id)"
        " SELECT l.key, l.value, d.created_at, d.id FROM devices d, json_each(d.labels) l"
    )
    db.execute("ALTER TABLE events ADD COLUMN device_id TEXT")
    db.execute("UPDATE events SET device_id = json_extract(body, '$.device_id')")
    db.execute("CREATE INDEX events_device ON events (device_id, id) WHERE device_id IS NOT NULL")
    db.execute("CREATE INDEX events_tenant ON events (tenant, id)")
    db.execute("CREATE INDEX events_event ON events (event, id)")
    # Presence in page order: a device's creation time beside its presence, so the online (or offline) devices
    # are listed a page at a time rather than all sorted.
    db.execute("ALTER TABLE device_presence ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE device_presence SET created_at = (SELECT created_at FROM devices WHERE id = device_id)")
    db.execute("DROP INDEX device_presence_online")
    db.execute("CREATE INDEX device_presence_page ON device_presence (online, created_at, device_id)")
    db.execute("CREATE INDEX provision_keys_created ON provision_keys (created_at, id)")
    db.execute("CREATE INDEX provision_keys_tenant_created ON provision_keys (tenant_id, created_at, id)")


def _add_presence_by_tenant(db: sqlite3.Connection) -> None:
    # A tenant's online (or offline) devices a page at a time: with only (online, created_at, device_id), a page of
    # one tenant's devices read every other tenant's presence rows in between. A device never changes tenant.
    db.execute("ALTER TABLE device_presence ADD COLUMN tenant_id TEXT")
    db.execute("UPDATE device_presence SET tenant_id = (SELECT tenant_id FROM devices WHERE id = device_id)")
    db.execute("CREATE INDEX device_presence_tenant_page ON device_presence (tenant_id, online, created_at, device_id)")


def _rework_allowlist_imports(db: sqlite3.Connection) -> None:
    # Issue 12 review: an import's last transaction changes one row (its status) whatever the import's size, so it
    # no longer looks for staged rows whose hardware id became a device meanwhile. A claim with an ordinary key does
    # not see staged rows and creates its device; this trigger, in that claim's own transaction, moves the staged row
    # to allowlist_import_skipped (and counts it on the import), so the entry never shows beside the device and the
    # import reports it. Its cost: about 1.5 us a device created, measured as the claim worker writes (a savepoint
    # of its batch, foreign keys on): the WHEN is one probe of the allowlist's primary key, which the claim's own
    # allowlist lookup has just read. (Outside a savepoint a trigger costs more, ~8 us: it needs a statement journal.)
    # An import being removed is marked first (aborted_at): it can then be neither finished half-removed nor staged
    # into, and the trigger leaves it alone while its rows go.
    # Written to be repeatable (IF NOT EXISTS, columns looked for): a database put back to an earlier version
    # number with this step's schema kept, as tests of earlier steps do, is brought up again.
    columns = {row[1] for row in db.execute("PRAGMA table_info(allowlist_imports)")}
    for column, definition in (("skipped", "INTEGER NOT NULL DEFAULT 0"), ("aborted_at", "INTEGER")):
        if column not in columns:
            db.execute(f"ALTER TABLE allowlist_imports ADD COLUMN {column} {definition}")  # constants, not input
    db.execute(
        "CREATE TABLE IF NOT EXISTS allowlist_import_skipped ("
        " import_id TEXT NOT NULL REFERENCES allowlist_imports(id),"
        " hardware_id TEXT NOT NULL,"
        " PRIMARY KEY (import_id, hardware_id)) WITHOUT ROWID"
    )
    # Lists no longer walk past staged rows (a page during a 1M-row import read every row staged so far, up to
    # 2.8 s here): entries added one at a time are listed from their own partial index, those of finished imports
    # import by import from (import_id, hardware_id), as every entry of an import has the import's created_at (so
    # it was before this step too), so staged rows sit in no index a list reads and cost one index fewer to write.
    db.execute("DROP INDEX IF EXISTS allowlist_tenant_created")
    db.execute("DROP INDEX IF EXISTS allowlist_import")
    db.execute(
        "CREATE INDEX IF NOT EXISTS allowlist_added_created ON allowlist (tenant_id, created_at, hardware_id)"
        " WHERE import_id IS NULL"
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS allowlist_import_entries ON allowlist (import_id, hardware_id)"
        " WHERE import_id IS NOT NULL"
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS allowlist_imports_tenant ON allowlist_imports (tenant_id, status, created_at)"
    )
    db.execute(
        "CREATE TRIGGER IF NOT EXISTS allowlist_staged_entry_taken AFTER INSERT ON devices"
        " WHEN EXISTS (SELECT 1 FROM allowlist a JOIN allowlist_imports i ON i.id = a.import_id"
        "  WHERE a.tenant_id = NEW.tenant_id AND a.hardware_id = NEW.hardware_id"
        "  AND i.status = 'staging' AND i.aborted_at IS NULL)"
        " BEGIN"
        "  INSERT INTO allowlist_import_skipped (import_id, hardware_id) SELECT import_id, hardware_id FROM allowlist"
        "   WHERE tenant_id = NEW.tenant_id AND hardware_id = NEW.hardware_id;"
        "  UPDATE allowlist_imports SET skipped = skipped + 1 WHERE id ="
        "   (SELECT import_id FROM allowlist WHERE tenant_id = NEW.tenant_id AND hardware_id = NEW.hardware_id);"
        "  DELETE FROM allowlist WHERE tenant_id = NEW.tenant_id AND hardware_id = NEW.hardware_id;"
        " END"
    )


def _add_shared_files(db: sqlite3.Connection) -> None:
    # The data dir's key files and bridge secret, encrypted, shared by the bridges of several hosts on PostgreSQL
    # (bridge/storage/sharedfiles.py). On SQLite, one host's database, it stays empty: the files are the truth.
    db.execute(
        "CREATE TABLE IF NOT EXISTS shared_files (name TEXT PRIMARY KEY, data BLOB, updated_at INTEGER NOT NULL)"
    )


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    apply: Callable[[sqlite3.Connection], None]


MIGRATIONS = (
    Migration(1, "the tables of the first release", _create_tables),
    Migration(
        2, "provision_keys.pattern_syntax: the engine a hardware-id pattern was written for", _add_pattern_syntax
    ),
    Migration(3, "the certificate credential type: key and device columns, device_certificates", _add_certificates),
    Migration(4, "indexes for device lists by page, tenant, status, hardware id and API key", _add_list_indexes),
    Migration(
        5,
        "credential generations, refused_until, reset_pending; certificates' generation; deleted_devices",
        _add_credential_lifecycle,
    ),
    Migration(6, "the allowlist of pre-provisioned hardware ids, its imports, keys that admit only it", _add_allowlist),
    Migration(7, "admin_tokens: the admin HTTP API's tokens (SHA-256), scopes and tenant", _add_admin_tokens),
    Migration(8, "device_presence: online and last seen, from the brokers' connection events", _add_presence),
    Migration(
        9, "device_labels, events.device_id, indexes for key pages and the dashboard's filters", _add_dashboard_indexes
    ),
    Migration(
        10, "device_presence.tenant_id: a tenant's devices by presence, a page at a time", _add_presence_by_tenant
    ),
    Migration(
        11,
        "allowlist imports: finished by one row, entries taken by a device meanwhile skipped and reported,"
        " aborts marked, list indexes without staged rows",
        _rework_allowlist_imports,
    ),
    Migration(
        12, "shared_files: key files and the bridge secret, encrypted, for bridges on several hosts", _add_shared_files
    ),
)
LATEST = MIGRATIONS[-1].version


def version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def upgrade(db: sqlite3.Connection) -> list[int]:
    """Apply the steps `db` has not had, inside the caller's transaction; returns their versions."""
    current = version(db)
    if current > LATEST:
        raise StorageError(
            f"the database is at schema version {current}, newer than this provbridge knows ({LATEST}):"
            " it was written by a newer version; run that one, or restore a backup made before the upgrade"
        )
    applied = []
    for step in MIGRATIONS:
        if step.version > current:
            step.apply(db)
            db.execute(f"PRAGMA user_version = {step.version}")  # an int from MIGRATIONS, not input
            applied.append(step.version)
    return applied
