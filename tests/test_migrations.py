"""The schema is versioned: a database made by an earlier release opens and is upgraded in place.

`tests/fixtures/provbridge-3d2a41d.db` was made by the release before versioning (commit 3d2a41d):
`provbridge init`, a key `line-7` with the hardware-id pattern `SN-\\d+` (written for Python's re), and
two devices claimed with it.
"""

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from bridge.claims.provisioning import Provisioner
from bridge.config import TOKEN_TTL_CAP_SECONDS, Settings
from bridge.errors import CheckFailed, StorageError
from bridge.ops import admin, doctor
from bridge.storage import keyfiles, migrations
from bridge.storage.store import Store
from provwire import crypto, topics
from provwire.models import Claim, ClaimOk, to_json
from tests.helpers.bridge import make_settings

FIXTURE = Path(__file__).parent / "fixtures" / "provbridge-3d2a41d.db"


@pytest.fixture
def old_database(tmp_path: Path) -> Settings:
    """A data dir with the old release's database and a fresh key ring (the fixture carries no keys)."""
    settings = make_settings(tmp_path / "data")
    settings.data_dir.mkdir(mode=0o700)
    shutil.copy(FIXTURE, settings.database_file)
    keyfiles.create_keys(settings.data_dir)
    return settings


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_the_fixture_is_from_before_versioning() -> None:
    assert _user_version(FIXTURE) == 0


def test_a_database_of_the_first_release_is_upgraded_in_place_and_keeps_its_rows(old_database: Settings) -> None:
    store = Store(old_database.database_file)
    try:
        assert migrations.version(store.connection()) == migrations.LATEST
        keys = {k.name: k for k in store.keys(None)}
        assert set(keys) == {"first-key", "line-7"}
        assert keys["line-7"].hardware_id_pattern == r"SN-\d+" and keys["line-7"].registrations == 2
        assert keys["line-7"].labels == {"site": "ber"}
        assert sorted(d.hardware_id for d in store.devices(None, limit=10)) == ["SN-0", "SN-1"]
        row = store.connection().execute("SELECT pattern_syntax FROM provision_keys WHERE name = 'line-7'").fetchone()
        assert row[0] is None  # written for Python's re: the doctor compares it with RE2

        # The upgraded database takes new keys and claims as a new one would.
        _, raw = admin.create_key(store, old_database, admin.KeySpec("default", "after-upgrade"), int(time.time()))
        device = crypto.generate_private_key()
        claim = Claim(
            request_id="r-after-upgrade-1",
            provision_key=raw,
            hardware_id="SN-2",
            public_key=crypto.b64encode(crypto.sec1(device.public_key())),
        )
        provisioner = Provisioner(old_database, store, keyfiles.load_keys(old_database.data_dir))
        outcome = provisioner.handle(topics.claim_topic("prov/v1", "c-after-upgrade"), to_json(claim))
        assert ClaimOk.model_validate_json(outcome.answer or b"").created
    finally:
        store.close()
    assert _user_version(old_database.database_file) == migrations.LATEST


def test_the_doctor_names_the_old_releases_pattern_before_and_after_the_upgrade(old_database: Settings) -> None:
    # Read-only, before any bridge opened it: no pattern_syntax column, so every pattern is Python's.
    with pytest.raises(CheckFailed, match=r"key key_\w+ \(line-7\).*'SN-٣' matched before"):
        doctor.check_patterns(old_database.database_file)
    Store(old_database.database_file).close()
    with pytest.raises(CheckFailed, match=r"\(line-7\)"):
        doctor.check_patterns(old_database.database_file)


def test_opening_an_upgraded_database_again_changes_nothing(old_database: Settings) -> None:
    Store(old_database.database_file).close()
    before = old_database.database_file.read_bytes()
    Store(old_database.database_file).close()  # up to date: no write transaction at all
    assert _user_version(old_database.database_file) == migrations.LATEST
    assert old_database.database_file.read_bytes() == before


def test_a_database_from_a_newer_release_is_refused_with_the_reason(old_database: Settings) -> None:
    with sqlite3.connect(old_database.database_file) as db:
        db.execute(f"PRAGMA user_version = {migrations.LATEST + 1}")
    with pytest.raises(StorageError, match="newer than this provbridge knows"):
        Store(old_database.database_file)
    assert _user_version(old_database.database_file) == migrations.LATEST + 1


def test_a_new_database_is_made_by_the_same_steps(tmp_path: Path) -> None:
    store = Store(tmp_path / "new.db")
    try:
        assert migrations.version(store.connection()) == migrations.LATEST
        columns = [row["name"] for row in store.connection().execute("PRAGMA table_info(provision_keys)")]
        assert columns[-4:] == [
            "pattern_syntax",
            "credential_type",
            "certificate_validity_seconds",
            "preprovisioned_only",
        ]
        tables = {row[0] for row in store.connection().execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"device_certificates", "deleted_devices", "allowlist", "allowlist_imports"} <= tables
    finally:
        store.close()


def test_an_upgraded_database_keeps_its_keys_and_devices_issuing_tokens(old_database: Settings) -> None:
    store = Store(old_database.database_file)
    try:
        keys = store.keys()
        assert keys and {k.credential_type for k in keys} == {"token"}
        assert {k.certificate_validity_seconds for k in keys} == {None}
        assert {d.credential_type for d in store.devices()} <= {"token"}
    finally:
        store.close()


def test_a_device_revoked_before_the_upgrade_stays_on_the_denylist_as_long_as_it_was(old_database: Settings) -> None:
    """Step 5 gives devices a refused_until: for one revoked before it, its revocation time plus the token cap,
    as the denylist listed it then (from `updated_at`)."""
    revoked_at = int(time.time()) - 60
    with sqlite3.connect(old_database.database_file) as db:
        db.execute("UPDATE devices SET status = 'revoked', updated_at = ? WHERE hardware_id = 'SN-0'", (revoked_at,))
        device_id = db.execute("SELECT id FROM devices WHERE hardware_id = 'SN-0'").fetchone()[0]
    store = Store(old_database.database_file)
    try:
        refused = store.refused_credentials(int(time.time()))
        assert [(r.device_id, r.until, r.generation) for r in refused] == [
            (device_id, revoked_at + TOKEN_TTL_CAP_SECONDS, None)
        ]
        assert store.device(device_id).credential_generation == 0
    finally:
        store.close()


def test_step_10_gives_presence_rows_recorded_before_it_their_devices_tenant(old_database: Settings) -> None:
    store = Store(old_database.database_file)
    devices = store.devices(None, limit=10)
    store.record_presence([(d.id, True, 1_700_000_000) for d in devices])
    store.close()
    with sqlite3.connect(old_database.database_file) as db:  # back to step 9's schema, rows kept
        db.execute("DROP INDEX device_presence_tenant_page")
        db.execute("ALTER TABLE device_presence DROP COLUMN tenant_id")
        db.execute("PRAGMA user_version = 9")
    store = Store(old_database.database_file)
    try:
        rows = store.connection().execute("SELECT device_id, tenant_id FROM device_presence").fetchall()
        assert sorted((r[0], r[1]) for r in rows) == sorted((d.id, d.tenant_id) for d in devices)
        assert len(rows) == 2
    finally:
        store.close()


def test_step_11_keeps_finished_imports_visible_and_a_staging_one_invisible(tmp_path: Path) -> None:
    """A database at step 10 with the allowlist in every state: after step 11, entries added by hand and those of a
    finished import admit claims and are listed; those of an import still staging when the old version stopped are
    neither, as before."""
    path = tmp_path / "v10.db"
    with sqlite3.connect(path) as db:
        for step in migrations.MIGRATIONS[:10]:
            step.apply(db)
            db.execute(f"PRAGMA user_version = {step.version}")
        db.execute("INSERT INTO tenants (id, name, created_at) VALUES ('ten_1', 'acme', 1)")
        db.executemany(
            "INSERT INTO allowlist_imports (id, tenant_id, entries, status, created_at) VALUES (?, 'ten_1', ?, ?, ?)",
            [("imp_done", 2, "done", 100), ("imp_staging", 1, "staging", 200)],
        )
        db.executemany(
            "INSERT INTO allowlist (tenant_id, hardware_id, labels, import_id, created_at)"
            " VALUES ('ten_1', ?, '{}', ?, ?)",
            [("hw-a", "imp_done", 100), ("hw-b", "imp_done", 100), ("hw-c", "imp_staging", 200), ("hw-d", None, 300)],
        )
    store = Store(path)
    try:
        assert migrations.version(store.connection()) == migrations.LATEST
        with store.transaction() as tx:
            visible = {hw for hw in ("hw-a", "hw-b", "hw-c", "hw-d") if tx.allowlist_entry("ten_1", hw) is not None}
        assert visible == {"hw-a", "hw-b", "hw-d"}
        listed = [entry.hardware_id for entry in store.allowlist_page("ten_1", None, 10)]
        assert listed[0] == "hw-d" and sorted(listed) == ["hw-a", "hw-b", "hw-d"]
    finally:
        store.close()
