"""Moving a data dir's SQLite database into PostgreSQL (`provbridge storage copy`), verified row for row.

With the bridge stopped: the SQLite database is brought to the latest schema, its write lock is held for the whole
copy (so nothing can change it meanwhile, and a bridge left running waits rather than writes), every row of every
table goes into an empty PostgreSQL database made by the same migrations, in one transaction, and then both are
read back in the same order and compared row for row. Either the target holds exactly the source's rows, or it
holds nothing (the transaction is rolled back) and the error says why.
"""

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.errors import StorageError, UsageError
from bridge.storage.database import Connection
from bridge.storage.store import Store, Transaction

# Every table, parents before children (foreign keys), and devices before the allowlist, so that the trigger of
# migration 11 (a device inserted while its hardware id is staged) finds nothing staged and changes nothing.
TABLES = (
    "tenants",
    "provision_keys",
    "devices",
    "device_certificates",
    "deleted_devices",
    "device_labels",
    "device_presence",
    "answers",
    "refresh_requests",
    "events",
    "allowlist_imports",
    "allowlist",
    "allowlist_import_skipped",
    "admin_tokens",
)
_INSERT_ROWS = 500  # rows per INSERT statement's parameters


@dataclass(frozen=True)
class Copied:
    rows: dict[str, int]  # table -> rows copied and found equal on both sides
    files: list[str] = field(default_factory=list)  # the data dir's files put into the database (`with_files`)


def copy_to_postgres(source: Path, url: str, with_files: Callable[[Transaction], list[str]] | None = None) -> Copied:
    """Copy the SQLite database at `source` into the empty PostgreSQL database at `url`; see the module's doc.
    `with_files`: also put the data dir's shared files there, in the same transaction (bridge/storage/sharedfiles.py
    `copy_files`, which checks them back)."""
    if not source.is_file():
        raise UsageError(f"no SQLite database at {source}: nothing to copy")
    origin = Store(source)  # brings it to the latest schema, as `serve` would
    target = Store(url)
    try:
        with origin.transaction() as held, target.transaction() as tx:  # both write locks, for the whole copy
            columns = {table: _columns(held.connection, table) for table in TABLES}
            filled = [table for table in TABLES if tx.connection.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()]
            if filled:
                raise UsageError(
                    f"the PostgreSQL database is not empty ({', '.join(filled)} have rows): copy into a new database"
                )
            for table in TABLES:
                _copy_table(held.connection, tx.connection, table, columns[table])
            # `events.id` is an identity column: new events continue after the copied ones.
            tx.connection.execute(
                "SELECT setval(pg_get_serial_sequence('events', 'id'), COALESCE((SELECT MAX(id) FROM events), 0) + 1,"
                " false)"
            )
            rows = {table: _verify(held.connection, tx.connection, table, columns[table]) for table in TABLES}
            files = with_files(tx) if with_files is not None else []
    finally:
        origin.close()
        target.close()
    return Copied(rows, files)


def _columns(db: Connection, table: str) -> list[str]:
    return [str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")]  # a name of TABLES, not input


def _copy_table(source: Connection, target: Connection, table: str, columns: list[str]) -> None:
    names = ", ".join(columns)
    marks = "(" + ", ".join("?" * len(columns)) + ")"
    for chunk in _chunks(source.execute(f"SELECT {names} FROM {table}"), _INSERT_ROWS):  # names from the catalogue
        values = ", ".join([marks] * len(chunk))
        target.execute(f"INSERT INTO {table} ({names}) VALUES {values}", [v for row in chunk for v in _row(row)])


def _verify(source: Connection, target: Connection, table: str, columns: list[str]) -> int:
    """The table's rows on both sides in one order (every column, NULLs first: text and bytes compare by code point
    and byte on both engines), digested; StorageError at the first difference."""
    order = ", ".join(f"{c} NULLS FIRST" for c in columns)
    sql = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}"  # names from the catalogue
    counts: list[int] = []
    digests: list[str] = []
    for db in (source, target):
        digest, count = hashlib.sha256(), 0
        for row in db.execute(sql):
            digest.update(repr(_row(row)).encode())
            count += 1
        counts.append(count)
        digests.append(digest.hexdigest())
    if counts[0] != counts[1] or digests[0] != digests[1]:
        raise StorageError(
            f"table {table} differs after the copy ({counts[0]} rows in SQLite, {counts[1]} in PostgreSQL):"
            " nothing was kept, the copy is rolled back"
        )
    return counts[0]


def _row(row: Any) -> tuple[Any, ...]:
    return tuple(bytes(v) if isinstance(v, memoryview | bytearray) else v for v in row)


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
