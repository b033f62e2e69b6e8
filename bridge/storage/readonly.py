"""The database opened read-only, for `provbridge doctor`: it creates nothing and writes nothing.

Every query the doctor needs is here, beside bridge/storage/store.py, so that no SQL lives outside the storage
modules. A damaged or foreign file surfaces as StorageError with SQLite's own reason. On PostgreSQL the doctor's
session is read-only (`default_transaction_read_only`), so nothing it runs can write either.
"""

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import cast

import psycopg

from bridge.errors import StorageError
from bridge.storage.database import Connection
from bridge.storage.postgres import PgConnection, where

# Columns that date the installation: the doctor's clock check compares the newest with the clock.
_TIMESTAMPS = (
    ("tenants", "created_at"),
    ("provision_keys", "created_at"),
    ("provision_keys", "revoked_at"),
    ("devices", "updated_at"),
    ("answers", "created_at"),
)


@dataclass(frozen=True)
class PatternedKey:
    id: str
    name: str
    pattern: str
    syntax: str | None  # 're2', or None: written for Python's re (or the database predates the column)


class ReadOnlyDatabase:
    """`with ReadOnlyDatabase(path) as db:` — mode=ro, so a missing database is not created (Store would)."""

    def __init__(self, location: Path | str) -> None:
        """`location`: the SQLite file, or the PostgreSQL database's URL (Settings.database)."""
        self.location = location
        self.postgres = isinstance(location, str)
        self._db: Connection | None = None
        self._close: Callable[[], None] = lambda: None

    def __enter__(self) -> "ReadOnlyDatabase":
        try:
            if isinstance(self.location, str):
                raw = psycopg.connect(
                    self.location, autocommit=True, connect_timeout=10, options="-c default_transaction_read_only=on"
                )
                self._db, self._close = PgConnection(raw), raw.close
            else:
                conn = sqlite3.connect(f"{self.location.resolve().as_uri()}?mode=ro", uri=True)
                self._db, self._close = cast(Connection, conn), conn.close
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to PostgreSQL at {where(str(self.location))}: {exc}") from None
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._close()

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        assert self._db is not None, "use ReadOnlyDatabase in a with block"
        try:
            return [tuple(row) for row in self._db.execute(sql, args)]
        except (sqlite3.Error, psycopg.Error) as exc:
            raise StorageError(str(exc)) from exc

    def integrity_findings(self) -> list[str]:
        """`PRAGMA integrity_check`: ["ok"], or the problems found. PostgreSQL checks its pages itself (and its
        amcheck extension needs its superuser): there, only that the database answers."""
        if self.postgres:
            self._rows("SELECT 1")
            return ["ok"]
        # The first row starts with a "*** in database main ***" banner: the finding is after it.
        return [str(row[0]).split("***")[-1].strip() for row in self._rows("PRAGMA integrity_check")]

    def tables(self) -> set[str]:
        if self.postgres:
            sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        else:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        return {str(row[0]) for row in self._rows(sql)}

    def _columns(self, table: str) -> set[str]:
        if self.postgres:
            rows = self._rows(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
                " AND table_name = ?",
                (table,),
            )
            return {str(row[0]) for row in rows}
        return {str(row[1]) for row in self._rows(f"PRAGMA table_info({table})")}  # a constant of this module

    def shared_files(self) -> dict[str, bytes | None]:
        """The files shared through the database (bridge/storage/sharedfiles.py); none before migration 12."""
        if "shared_files" not in self.tables():
            return {}
        rows = self._rows("SELECT name, data FROM shared_files")
        return {str(name): None if data is None else bytes(cast(bytes, data)) for name, data in rows}

    def device_count(self) -> int:
        return int(str(self._rows("SELECT COUNT(*) FROM devices")[0][0]))

    def devices_per_cloud_key(self) -> list[tuple[str, int]]:
        rows = self._rows("SELECT cloud_key_id, COUNT(*) FROM devices GROUP BY cloud_key_id")
        return [(str(kid), int(str(count))) for kid, count in rows]

    def profiles_in_use(self) -> list[str]:
        rows = self._rows(
            "SELECT profile FROM provision_keys WHERE status = 'active'"
            " UNION SELECT profile FROM devices WHERE status = 'active'"
        )
        return [str(row[0]) for row in rows]

    def patterned_keys(self) -> list[PatternedKey]:
        """Active keys with a hardware-id pattern, oldest first."""
        columns = self._columns("provision_keys")
        # No column: a database no bridge of this version has opened yet, so every pattern predates RE2.
        syntax = "pattern_syntax" if "pattern_syntax" in columns else "NULL"
        rows = self._rows(
            f"SELECT id, name, hardware_id_pattern, {syntax} FROM provision_keys"
            " WHERE status = 'active' AND hardware_id_pattern IS NOT NULL ORDER BY created_at"
        )
        return [PatternedKey(str(i), str(n), str(p), None if s is None else str(s)) for i, n, p, s in rows]

    def certificate_holders(self) -> tuple[int, int]:
        """(active keys that issue certificates, active devices holding one): (0, 0) before the column existed."""
        columns = self._columns("provision_keys")
        if "credential_type" not in columns:
            return 0, 0
        where = "status = 'active' AND credential_type = 'certificate'"
        keys = int(str(self._rows(f"SELECT COUNT(*) FROM provision_keys WHERE {where}")[0][0]))
        return keys, int(str(self._rows(f"SELECT COUNT(*) FROM devices WHERE {where}")[0][0]))

    def hardware_ids_of_key(self, key_id: str) -> Iterator[str]:
        """The hardware ids of the devices a key created."""
        return (str(row[0]) for row in self._rows("SELECT hardware_id FROM devices WHERE key_id = ?", (key_id,)))

    def newest_records(self) -> list[tuple[str, float]]:
        """(table.column, unix time) of the newest value of each dated column, where there is one."""
        found: list[tuple[str, float]] = []
        for table, column in _TIMESTAMPS:  # names from _TIMESTAMPS, not input
            value = self._rows(f"SELECT MAX({column}) FROM {table}")[0][0]
            if value is not None:
                found.append((f"{table}.{column}", float(str(value))))
        newest_event = self._rows("SELECT MAX(time) FROM events")[0][0]
        if newest_event is not None:
            found.append(("events.time", datetime.fromisoformat(str(newest_event)).timestamp()))
        return found
