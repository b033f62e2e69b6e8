"""`provbridge storage copy`: a data dir's SQLite database moved into PostgreSQL row for row, and a bridge on it
carries on where the SQLite one stopped (README "Storage: SQLite or PostgreSQL")."""

import json
import shutil
import time
from contextlib import closing

import pytest

from bridge.config import Settings, StorageSettings
from bridge.ops import admin, allowlist, lifecycle
from bridge.storage import sharedfiles
from bridge.storage.copy import TABLES
from bridge.storage.store import Store
from provwire.models import ClaimOk
from tests.helpers.bridge import serving_bridge
from tests.helpers.cli import cli_run
from tests.helpers.devices import Device
from tests.helpers.postgres import PostgresServer


def _everything(store: Store) -> dict[str, list[tuple[object, ...]]]:
    db = store.connection()
    return {
        table: sorted((tuple(row) for row in db.execute(f"SELECT * FROM {table}")), key=repr)  # names of TABLES
        for table in TABLES
    }


def test_a_sqlite_data_dir_moves_into_postgresql_and_the_bridge_carries_on(
    initialised: tuple[Settings, str], postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, first_key = initialised
    with serving_bridge(settings, first_key) as bridge:
        kept = Device(bridge)
        with kept:
            request_id = "0f" * 16
            claimed = kept.claim(first_key, request_id)
        assert isinstance(claimed, ClaimOk)
        for _ in range(3):
            with Device(bridge) as device:
                assert isinstance(device.claim(first_key), ClaimOk)
        bridge.create_key(name="line-7", labels={"line": "7"}, max_registrations=5)
        admin.create_codes(bridge.store, settings, admin.KeySpec("default", "batch"), 3, int(time.time()))
        allowlist.add_entry(bridge.store, "default", allowlist.NewEntry("SN-LISTED"), False, int(time.time()))
        doomed = bridge.store.devices(limit=1)[0].id
        lifecycle.delete_device(settings, bridge.store, doomed, int(time.time()))
    # The bridge is stopped: copy.
    url = postgres_server.create_database()
    code, out, err = cli_run(capsys, settings, "storage", "copy", "--to", url, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert url.split("@")[0] not in out  # the password is not shown
    sqlite_store, postgres_store = Store(settings.database_file), Store(url)
    with closing(sqlite_store), closing(postgres_store):
        before, after = _everything(sqlite_store), _everything(postgres_store)
        assert after == before  # every row of every table, as it was
        assert report["rows"] == {table: len(rows) for table, rows in before.items()}
        assert report["rows"]["devices"] == 3 and report["rows"]["deleted_devices"] == 1
        assert report["rows"]["events"] > 0

    # The key files and the bridge secret went too, sealed with a storage key made for it: another host given that
    # key (and not the data dir) joins with `init` and has the same keys.
    assert set(report["files"]) == set(sharedfiles.local_files(settings))
    assert {"keys/active.json", "bridge.secret"} <= set(report["files"])
    other = settings.model_copy(
        update={"data_dir": settings.data_dir.parent / "other-host", "storage": StorageSettings(url=url)}
    )
    other.data_dir.mkdir()
    shutil.copy(settings.storage_key_file, other.storage_key_file)
    assert admin.init_data_dir(other).joined
    assert sharedfiles.local_files(other) == sharedfiles.local_files(settings)

    # Copying again into the same database is refused, and changes nothing.
    code, _, err = cli_run(capsys, settings, "storage", "copy", "--to", url)
    assert code == 2 and "not empty" in err
    code, _, err = cli_run(capsys, settings, "storage", "copy", "--to", "mysql://nowhere/db")
    assert code == 2 and "postgresql://" in err

    # The bridge on PostgreSQL with the same data dir: the copied answer replays, new devices come after.
    on_postgres = settings.model_copy(update={"storage": StorageSettings(url=url)})
    with serving_bridge(on_postgres, first_key) as bridge, Device(bridge, kept.hardware_id) as same:
        same.private_key = kept.private_key  # the same device sends the same claim again
        again = same.claim(first_key, request_id)
        assert isinstance(again, ClaimOk) and again.device_id == claimed.device_id
        with Device(bridge) as device:
            assert isinstance(device.claim(first_key), ClaimOk)
        assert bridge.store.count("devices") == 4
        newest = bridge.store.events_page(None, None, None, None, 1)[0][0]
        assert newest > max(row[0] for row in before["events"])  # event ids continue after the copied ones
