"""The two storage engines under `Store` (bridge/storage/database.py): the same schema by the same numbered steps,
the same promises where they differ by nature, on a real PostgreSQL server (tests/helpers/postgres.py)."""

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from bridge.errors import StorageError, UsageError
from bridge.storage import migrations, pg_migrations
from bridge.storage.store import Store
from tests.helpers.postgres import PostgresServer


def _sqlite_schema(path: Path) -> tuple[dict[str, list[str]], set[str]]:
    with closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {
            t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")]  # names from the catalogue
            for t in tables
            if not t.startswith("sqlite_")
        }
        indexes = {
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")  # named ones
        }
    return columns, indexes


def _postgres_schema(url: str) -> tuple[dict[str, list[str]], set[str]]:
    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"
            " ORDER BY table_name, ordinal_position"
        ).fetchall()
        columns: dict[str, list[str]] = {}
        for table, column in rows:
            columns.setdefault(table, []).append(column)
        indexes = {
            r[0]
            for r in db.execute(  # the named ones: not those PostgreSQL makes for primary keys and UNIQUE
                "SELECT i.indexname FROM pg_indexes i WHERE i.schemaname = current_schema() AND NOT EXISTS"
                " (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
            )
        }
    columns.pop("schema_version")  # PostgreSQL's stand-in for SQLite's `PRAGMA user_version`
    return columns, indexes


def test_both_engines_have_the_same_steps_and_end_with_the_same_schema(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    assert [(m.version, m.what) for m in pg_migrations.MIGRATIONS] == [
        (m.version, m.what) for m in migrations.MIGRATIONS
    ]
    Store(tmp_path / "provbridge.db").close()
    url = postgres_server.create_database()
    Store(url).close()
    sqlite_columns, sqlite_indexes = _sqlite_schema(tmp_path / "provbridge.db")
    postgres_columns, postgres_indexes = _postgres_schema(url)
    assert postgres_columns == sqlite_columns  # every table, every column, in order
    assert postgres_indexes == sqlite_indexes
    with psycopg.connect(url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone() == (migrations.LATEST,)


def test_a_second_store_on_an_up_to_date_database_changes_nothing(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    first = Store(url)
    first.create_tenant("ten_1", "one", 1, "test")
    second = Store(url)  # a second bridge process: no migration runs again, the rows are there
    assert [t.name for t in second.tenants()] == ["one"]
    first.close()
    second.close()


def test_text_postgresql_cannot_hold_is_bad_input_not_a_storage_failure(postgres_server: PostgresServer) -> None:
    store = Store(postgres_server.create_database())
    with pytest.raises(UsageError, match="NUL"):
        store.tenant_id("a\x00b")
    with pytest.raises(UsageError, match="NUL"):
        store.create_tenant("ten_x", "a\x00b", 1, "test")
    assert store.tenants() == []
    store.close()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A server of the test's own, to restart."""
    with PostgresServer(tmp_path) as server:
        yield server


def test_a_server_restart_fails_the_transaction_in_flight_and_the_next_one_succeeds(own_server: PostgresServer) -> None:
    store = Store(own_server.create_database())
    store.create_tenant("ten_before", "before", 1, "test")
    with pytest.raises(StorageError), store.transaction() as tx:
        tx.connection.execute("INSERT INTO tenants VALUES ('ten_lost', 'lost', 1)")
        own_server.restart()  # the server goes away under the open transaction
        tx.connection.execute("SELECT 1")
    store.create_tenant("ten_after", "after", 2, "test")  # a fresh connection from the pool, no error first
    assert [t.name for t in store.tenants()] == ["after", "before"]  # nothing half-written
    store.close()


def test_a_write_waits_for_the_write_lock_then_fails_retryably(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    store = Store(url, lock_timeout=0.05)
    holder = Store(url)
    with holder.transaction(), pytest.raises(StorageError, match="lock timeout"):  # another bridge is writing
        store.create_tenant("ten_1", "one", 1, "test")
    store.create_tenant("ten_1", "one", 1, "test")  # the lock is free again
    assert [t.name for t in holder.tenants()] == ["one"]
    store.close()
    holder.close()


def test_a_snapshot_read_inside_a_write_leaves_the_write_whole(postgres_server: PostgresServer) -> None:
    store = Store(postgres_server.create_database())
    store.create_tenant("ten_1", "one", 1, "test")
    with store.transaction() as tx:
        tx.connection.execute("INSERT INTO tenants VALUES ('ten_2', 'two', 2)")
        assert store.allowlist_page("ten_1", None, 10) == []  # its own snapshot would end this transaction
        tx.connection.execute("INSERT INTO tenants VALUES ('ten_3', 'three', 3)")
    assert [t.name for t in store.tenants()] == ["one", "three", "two"]
    store.close()
