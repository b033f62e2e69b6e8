"""The seam under `Store`: what a database engine gives it, whichever engine it is.

`Store` (bridge/storage/store.py) holds every query; a `Database` runs them. Two implement it: `SqliteDatabase`
(bridge/storage/sqlite.py, the default: a file in the data dir) and `PostgresDatabase` (bridge/storage/postgres.py,
`storage.url = "postgresql://..."`: one database shared by bridges on several hosts). Both give the same promise:
one write transaction at a time, whichever process or host it comes from, so every read-then-write a claim or an
admin action makes (a one-time key's count, a re-claim, a request replayed) holds with any number of bridges.

Queries are written once, in SQLite's dialect with `?` parameters, in the portable subset both engines share; the
few places where the engines differ are the attributes of `Database` (`fixed_join`, `row_key`).
"""

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Cursor(Protocol):
    """The result of one statement: rows by index or by column name."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The part of sqlite3's connection `Store` uses; PostgreSQL's is adapted to it."""

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor: ...

    @property
    def in_transaction(self) -> bool: ...


class Database(Protocol):
    """One database, shared by the threads of a process (each gets its own connection)."""

    # The driver's errors (each leaves `Store` as StorageError) and its constraint violation.
    errors: tuple[type[Exception], ...]
    integrity_error: type[Exception]
    # A join that keeps its written order: SQLite plans `CROSS JOIN` so (PostgreSQL takes no ON after it).
    fixed_join: str
    # A column naming one row of any table, for deleting a large set a slice at a time.
    row_key: str
    # Seconds a write waits for the write lock before it fails (StorageError, which claims answer as retryable).
    lock_timeout: float

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for reads outside any transaction (each sees the last commit), or this thread's open
        write transaction's."""
        ...

    def snapshot(self) -> AbstractContextManager[Connection]:
        """A connection whose reads all see one snapshot of the database."""
        ...

    def writing(self, batch: bool = False) -> AbstractContextManager[Connection]:
        """A write transaction holding the database's one write lock (across processes and hosts): committed at
        the end of the block, rolled back if it raises. `batch`: it will hold many savepoints (group commit)."""
        ...

    def savepoint(self) -> AbstractContextManager[Connection]:
        """A savepoint of this thread's open write transaction: undone alone if the block raises."""
        ...

    def upgrade(self, db: Connection) -> None:
        """Bring the schema up to date, inside the caller's write transaction."""
        ...

    def schema_version(self, db: Connection) -> int: ...

    def checkpoint(self) -> None:
        """Move what a bulk writer wrote into the main store between its transactions, if the engine needs it."""
        ...

    def checkpoint_deferred(self) -> AbstractContextManager[None]:
        """Commits in the block leave checkpoints to `checkpoint`."""
        ...

    def raw_connection(self) -> Connection:
        """This thread's connection, for tests and tools; the bridge uses `Store`'s methods."""
        ...

    def close(self) -> None: ...
