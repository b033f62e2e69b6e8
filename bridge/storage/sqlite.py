"""SQLite under `Store`: a file in the data dir, one connection per thread, one writer at a time.

Every write is one IMMEDIATE transaction, so the write lock is taken before the first read and key counts cannot
race. Writers queue on locks that wake the next one the moment the database is free: this process's threads on a
thread lock (with the busy timeout), other bridge processes on an flock of `<database>-writer.lock`. Left to SQLite,
a waiting writer polls with sleeps of 1, 2, 5, 10 ... ms (its busy handler): under load that costs more than the
transaction itself. Other writers (the admin CLI) still meet SQLite's own lock, with its timeout.
"""

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import cast

from bridge.errors import StorageError
from bridge.storage import migrations
from bridge.storage.database import Connection
from bridge.storage.filelock import locked

BUSY_TIMEOUT_SECONDS = 10.0  # how long a write waits for the database before it fails (retryable)


class SqliteDatabase:
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    integrity_error: type[Exception] = sqlite3.IntegrityError
    fixed_join = "CROSS JOIN"  # SQLite never reorders the loops of a CROSS JOIN: the driving index gives the order
    row_key = "rowid"

    def __init__(self, path: Path, lock_timeout: float = BUSY_TIMEOUT_SECONDS) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._writer_file = path.with_name(path.name + "-writer.lock")
        if not path.exists():
            # It holds key hashes and device records: owner-only, like the key files beside it.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.lock_timeout, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        try:
            yield cast(Connection, self._connection())
        except sqlite3.Error as exc:
            raise StorageError(f"database read failed: {exc}") from exc

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        with self.reading() as db:
            db.execute("BEGIN")  # a deferred transaction: its reads share one snapshot (WAL)
            try:
                yield db
            finally:
                db.execute("COMMIT")

    @contextmanager
    def writing(self, batch: bool = False) -> Iterator[Connection]:
        if batch:
            self._savepoint_journal_in_memory()
        with self._writer():
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"database unavailable: {exc}") from exc
            try:
                yield cast(Connection, conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"database write failed: {exc}") from exc
                raise

    def _savepoint_journal_in_memory(self) -> None:
        # A batch's savepoints keep the pages they change in a journal that SQLite moves to a temporary file past
        # 64 KiB: every batch then created one, wrote it page by page and deleted it, about a tenth of the claim
        # worker's CPU (docs/BENCHMARKS.md). In memory it is bounded by the pages of one batch. Read by SQLite at
        # BEGIN, so set before; on the batching connection only (the claim worker's), so that nothing else, a
        # migration's index build say, holds its temporary data in memory.
        if not getattr(self._local, "temp_in_memory", False):
            self._connection().execute("PRAGMA temp_store=MEMORY")
            self._local.temp_in_memory = True

    @contextmanager
    def savepoint(self) -> Iterator[Connection]:
        conn = self._connection()
        if not conn.in_transaction:
            # SQLite rolled the whole batch back (a full disk, an I/O error): a savepoint now would be a
            # transaction of its own, committed at its release, while the batch reports failure.
            raise StorageError("database write failed: the batch's transaction was rolled back")
        try:
            conn.execute("SAVEPOINT unit")
        except sqlite3.Error as exc:
            raise StorageError(f"database unavailable: {exc}") from exc
        try:
            yield cast(Connection, conn)
            conn.execute("RELEASE unit")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO unit")
                conn.execute("RELEASE unit")
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"database write failed: {exc}") from exc
            raise

    @contextmanager
    def _writer(self) -> Iterator[None]:
        if not self._write_lock.acquire(timeout=self.lock_timeout):
            raise StorageError("database unavailable: another write of this process did not finish")
        try:
            with ExitStack() as stack:
                try:
                    stack.enter_context(locked(self._writer_file))
                except OSError as exc:  # the lock file cannot be opened (permissions, no descriptors left)
                    raise StorageError(f"database unavailable: {exc}") from exc
                yield
        finally:
            self._write_lock.release()

    def schema_version(self, db: Connection) -> int:
        return migrations.version(cast(sqlite3.Connection, db))

    def upgrade(self, db: Connection) -> None:
        migrations.upgrade(cast(sqlite3.Connection, db))

    def checkpoint(self) -> None:
        """Copy what the WAL holds into the database file now, without the writer lock: PASSIVE, it waits for no
        one and no writer waits for it. A bulk writer (an import) calls it between its transactions, whose own
        commits skip the automatic checkpoint (`checkpoint_deferred`)."""
        with self.reading() as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @contextmanager
    def checkpoint_deferred(self) -> Iterator[None]:
        # SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages, and COMMIT runs with the writer
        # lock held: an import's slices (about 20 pages each) made that 10-25 ms of the lock every ~45 slices here,
        # over a median slice of 3 ms (bench/import_lock.py). Their commits skip it; `checkpoint` does it after.
        with self.reading() as db:
            pages = int(db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
            db.execute("PRAGMA wal_autocheckpoint = 0")
        try:
            yield
        finally:
            with self.reading() as db:
                db.execute(f"PRAGMA wal_autocheckpoint = {pages}")  # an int read back above, not input

    def raw_connection(self) -> Connection:
        return cast(Connection, self._connection())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            self._local.temp_in_memory = False


def write_probe(path: Path, timeout: float) -> str:
    """ "ok" when the database at `path` takes the write lock within `timeout` (then given back at once), else why
    not: a full disk, a read-only file or a writer stuck holding the lock shows here (the admin API's /readyz)."""
    if not path.is_file():
        return f"missing: {path}"
    try:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        return f"cannot open: {exc}"
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return "ok"
    except sqlite3.Error as exc:
        return f"not writable: {exc}"
    finally:
        db.close()
