"""What storage tests do to the database beside the bridge, on either engine (SQLite or PostgreSQL): hold its write
lock, watch the statements a store runs, read everything it holds as bytes.

Tests of the `both_backends` modules (tests/conftest.py) use these rather than sqlite3 directly, so that the same
test asserts the same behaviour on both engines.
"""

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager

import psycopg
import pytest

from bridge.config import Settings
from bridge.storage import postgres
from bridge.storage.postgres import PostgresDatabase
from bridge.storage.sqlite import SqliteDatabase
from bridge.storage.store import Store

# The statement that opens a write transaction, as each engine's trace shows it.
SQLITE_BEGIN = "BEGIN IMMEDIATE"
POSTGRES_BEGIN_PREFIX = "BEGIN; SET LOCAL lock_timeout"


def on_postgres(settings: Settings) -> bool:
    return settings.storage.url is not None


def sqlite_only(settings: Settings, why: str) -> None:
    """Skip the PostgreSQL run of a test of something only SQLite has (`why` says what)."""
    if on_postgres(settings):
        pytest.skip(f"SQLite only: {why}")


def sqlite_store_only(store: Store, why: str) -> None:
    """`sqlite_only` for a test that has a store but no settings."""
    if isinstance(store.location, str):
        pytest.skip(f"SQLite only: {why}")


def is_write_begin(statement: str) -> bool:
    return statement == SQLITE_BEGIN or statement.startswith(POSTGRES_BEGIN_PREFIX)


@contextmanager
def holding_the_write_lock(settings: Settings) -> Iterator[None]:
    """Another writer holds the database's write lock for the block (a connection of its own)."""
    url = settings.storage.url
    if url is None:
        with closing(sqlite3.connect(settings.database_file, timeout=0)) as blocker:
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                blocker.rollback()
    else:
        with psycopg.connect(url, autocommit=True) as blocker:
            blocker.execute(f"BEGIN; SELECT pg_advisory_xact_lock({postgres.WRITER_LOCK})")
            try:
                yield
            finally:
                blocker.execute("ROLLBACK")


def impatient(store: Store, seconds: float = 0.05) -> None:
    """The store's writes give up after `seconds` waiting for the write lock (StorageError)."""
    database = store._db
    database.lock_timeout = seconds
    if isinstance(database, SqliteDatabase):  # this thread's connection exists already: its busy timeout too
        store.connection().execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")


@contextmanager
def traced(store: Store) -> Iterator[list[str]]:
    """Every statement the store runs on this thread during the block, in order (PostgreSQL: on any thread)."""
    statements: list[str] = []
    database = store._db
    if isinstance(database, PostgresDatabase):
        database.trace = statements.append
        try:
            yield statements
        finally:
            database.trace = None
    else:
        connection = store.connection()
        connection.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        try:
            yield statements
        finally:
            connection.set_trace_callback(None)  # type: ignore[attr-defined]


def postgres_plan(store: Store, sql: str) -> list[str]:
    """PostgreSQL's generic plan of `sql` (as the store runs it, `?` parameters) with sequential scans and sorts
    priced out: a `Seq Scan` or a `Sort` left in it means no index can serve the query (in its order)."""
    database = store._db
    assert isinstance(database, PostgresDatabase)
    numbered = iter(range(1, sql.count("?") + 1))
    prepared = re.sub(r"\?", lambda _: f"${next(numbered)}", sql.replace("%", "%%"))
    with psycopg.connect(database.url, autocommit=True) as db:
        db.execute("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET enable_sort = off")
        db.execute(f"PREPARE q AS {prepared}")  # a statement the store ran, not input
        nulls = ", ".join(["NULL"] * sql.count("?"))
        rows = db.execute(f"EXPLAIN EXECUTE q({nulls})" if nulls else "EXPLAIN EXECUTE q").fetchall()
    return [str(row[0]) for row in rows]


def sorts_or_scans(plan: list[str], tables: tuple[str, ...]) -> list[str]:
    """The lines of a `postgres_plan` that sort (a Sort node; an Incremental Sort orders only the rows that tie on
    an index's columns, SQLite's "TEMP B-TREE FOR RIGHT PART") or scan one of `tables` whole."""
    return [
        line
        for line in plan
        if line.strip().lstrip("-> ").startswith("Sort  (") or any(f"Seq Scan on {t} " in line for t in tables)
    ]


def database_bytes(settings: Settings) -> bytes:
    """Everything the database holds, as bytes to search for a secret: SQLite's files, or every row of every table
    of the PostgreSQL database (COPY's text form: bytea as hex, text as it is)."""
    url = settings.storage.url
    if url is None:
        files = [settings.database_file, settings.database_file.with_name(settings.database_file.name + "-wal")]
        return b"".join(path.read_bytes() for path in files if path.is_file())
    dump = bytearray()
    with psycopg.connect(url, autocommit=True) as db:
        tables = db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
        for (table,) in tables:
            with db.cursor().copy(f'COPY "{table}" TO STDOUT') as copy:  # names from the catalogue
                for chunk in copy:
                    dump += bytes(chunk)
    return bytes(dump)
