"""PostgreSQL under `Store` (`storage.url = "postgresql://..."`): one database shared by bridges on several hosts.

psycopg 3 with its connection pool. Each read and each write transaction borrows a connection; a claim worker's
batch keeps one for the batch. Connections are checked as they leave the pool, so after PostgreSQL restarts the
first claims meet a fresh connection rather than a dead one.

One writer at a time, as on SQLite: every write transaction takes one transaction-scoped advisory lock
(`WRITER_LOCK`) before its first read. That is what every read-then-write of the claim path and the admin actions
relies on (a one-time key's count, a re-claim, a replayed request, the dynsec janitor's decisions), and it holds for
every process on every host that shares the database. Reads take no lock. The cost is that writes from all bridges
queue on one lock: docs/SCALING.md measures how long a claim holds it and what that allows.

Queries arrive in SQLite's dialect with `?` parameters (bridge/storage/database.py); `PgConnection` turns them into
psycopg's `%s`, and rows answer by index and by column name as sqlite3.Row does.
"""

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from typing import Any, cast

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from bridge.errors import StorageError, UsageError
from bridge.storage import pg_migrations
from bridge.storage.database import Connection, Cursor

# The advisory lock every write transaction holds: any 64-bit number no other application on the database uses.
WRITER_LOCK = 0x70726F7662726467  # "provbrdg"
LOCK_TIMEOUT_SECONDS = 10  # how long a write waits for the lock before it fails (retryable), as on SQLite
CONNECT_TIMEOUT_SECONDS = 10
POOL_SIZE = 8  # connections per process: its claim worker, presence recorder, janitor and API threads


def where(url: str) -> str:
    """The URL's host, port and database, never its password: what messages may say."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable postgresql:// URL"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


@functools.lru_cache(maxsize=4096)
def _placeholders(sql: str) -> str:
    # `?` is never anything but a parameter in our SQL (no literal question marks); `%` is psycopg's escape.
    return sql.replace("%", "%%").replace("?", "%s")


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[tuple[Any, ...]]:
    index: dict[str, int] = {}
    for position, name in enumerate(names):
        index.setdefault(name, position)  # the first of two same-named columns, as sqlite3.Row

    class Row(tuple[Any, ...]):
        """A row by index or by column name, as sqlite3.Row."""

        __slots__ = ()

        def __getitem__(self, key: Any) -> Any:
            return tuple.__getitem__(self, index[key] if isinstance(key, str) else key)

        def keys(self) -> list[str]:
            return list(names)

    return Row


def _rows(cursor: "psycopg.Cursor[Any]") -> Callable[[Sequence[Any]], Any]:
    # The names straight from the result: `cursor.description` builds a Column object per column per statement,
    # which cost a claim more than its rows.
    result = cursor.pgresult
    if result is None or not result.nfields:
        return tuple
    return _row_class(tuple((result.fname(i) or b"").decode() for i in range(result.nfields)))


class PgConnection:
    """A psycopg connection with the interface of sqlite3's that `Store` uses."""

    def __init__(self, raw: "psycopg.Connection[Any]", trace: Callable[[str], None] | None = None) -> None:
        self.raw = raw
        self.trace = trace  # tests: told every statement, as sqlite3's set_trace_callback

    def command(self, sql: str) -> None:
        """Run `sql` as it is (no parameters: several statements may go in one round trip)."""
        if self.trace is not None:
            self.trace(sql)
        self.raw.execute(sql)

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        if self.trace is not None:
            self.trace(sql)
        try:
            return cast(Cursor, self.raw.execute(_placeholders(sql), tuple(parameters)))
        except psycopg.DataError as exc:
            raise _refusal(exc) from None

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor:
        if self.trace is not None:
            self.trace(sql)
        cursor = self.raw.cursor()
        try:
            cursor.executemany(_placeholders(sql), [tuple(p) for p in parameters])
        except psycopg.DataError as exc:
            raise _refusal(exc) from None
        return cast(Cursor, cursor)

    @property
    def in_transaction(self) -> bool:
        # ACTIVE: statements of a batch's pipeline are in flight, inside its transaction.
        status = self.raw.info.transaction_status
        return status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR, pq.TransactionStatus.ACTIVE)


def _refusal(exc: psycopg.DataError) -> Exception:
    # PostgreSQL's text cannot hold U+0000 (SQLite's can): psycopg refuses such a parameter before sending anything.
    # No stored text has one, so it is the caller's bad input (an API query of "a%00b"), not the database's fault.
    if "NUL" in str(exc):
        return UsageError("text with a NUL character (U+0000) is not accepted")
    return exc


class PostgresDatabase:
    errors: tuple[type[Exception], ...] = (psycopg.Error, PoolTimeout)
    integrity_error: type[Exception] = psycopg.IntegrityError
    fixed_join = "JOIN"  # PostgreSQL plans joins itself and takes no ON after CROSS JOIN
    row_key = "ctid"

    def __init__(self, url: str, lock_timeout: float = LOCK_TIMEOUT_SECONDS, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.lock_timeout = lock_timeout
        self.trace: Callable[[str], None] | None = None  # tests: see PgConnection.trace
        self._where = where(url)
        self._local = threading.local()
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "row_factory": _rows, "application_name": "provbridge"},
            check=ConnectionPool.check_connection,
            open=False,
            name="provbridge",
            timeout=CONNECT_TIMEOUT_SECONDS,
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
        except (PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            raise StorageError(f"cannot connect to PostgreSQL at {self._where}: {_reason(exc)}") from None

    @contextmanager
    def _borrowed(self, failure: str) -> Iterator[PgConnection]:
        """This thread's open write transaction's connection, or one from the pool for the block."""
        current: PgConnection | None = getattr(self._local, "conn", None)
        if current is not None:
            yield current
            return
        try:
            with self._pool.connection() as raw:
                yield PgConnection(raw, self.trace)
        except (psycopg.Error, PoolTimeout) as exc:
            raise StorageError(f"{failure}: {_reason(exc)}") from exc

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self._borrowed("database read failed") as conn:
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        if getattr(self._local, "conn", None) is not None:  # inside this thread's write: nothing else writes meanwhile
            with self._borrowed("database read failed") as conn:
                yield conn
            return
        with self._borrowed("database read failed") as conn:
            conn.command("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield conn
            finally:
                conn.command("ROLLBACK")

    @contextmanager
    def writing(self, batch: bool = False) -> Iterator[Connection]:
        try:
            with self._pool.connection() as raw:
                conn = PgConnection(raw, self.trace)
                try:
                    # One round trip: no parameters, so psycopg sends the statements as one simple query. How long
                    # to wait for the lock is said each time, for this transaction only (SET LOCAL).
                    waiting = f"SET LOCAL lock_timeout = '{int(self.lock_timeout * 1000)}ms'"  # a number
                    conn.command(f"BEGIN; {waiting}; SELECT pg_advisory_xact_lock({WRITER_LOCK})")
                except psycopg.Error as exc:
                    _rollback(raw)
                    raise StorageError(f"database unavailable: {_reason(exc)}") from exc
                self._local.conn = conn
                try:
                    # A batch (the claim worker's group commit) in pipeline mode: what needs no answer (writes,
                    # savepoints) goes out without waiting for one, so a claim costs the round trips of its reads
                    # rather than of all its statements (docs/SCALING.md: 15-30 % less lock time per claim). A
                    # statement that fails is reported at the next one whose answer is read, maybe in a later claim
                    # of the batch: the batch then fails whole and every claim in it is answered retry, as when its
                    # COMMIT fails. No statement of a claim is expected to fail: all writes run under the lock.
                    with raw.pipeline() if batch else nullcontext():
                        yield conn
                    if raw.info.transaction_status != pq.TransactionStatus.INTRANS:
                        # A failed statement aborted the transaction and nothing undid it: COMMIT would roll it
                        # back and report success.
                        raise StorageError("database write failed: the transaction was aborted by an earlier error")
                    conn.command("COMMIT")
                except BaseException as exc:
                    _rollback(raw)
                    if isinstance(exc, psycopg.Error):
                        raise StorageError(f"database write failed: {_reason(exc)}") from exc
                    raise
                finally:
                    self._local.conn = None
        except PoolTimeout as exc:
            raise StorageError(f"database unavailable: {_reason(exc)}") from exc

    @contextmanager
    def savepoint(self) -> Iterator[Connection]:
        conn: PgConnection | None = getattr(self._local, "conn", None)
        if conn is None or not conn.in_transaction:
            raise StorageError("database write failed: the batch's transaction was rolled back")
        try:
            conn.command("SAVEPOINT unit")
        except psycopg.Error as exc:
            raise StorageError(f"database unavailable: {_reason(exc)}") from exc
        try:
            yield conn
            conn.command("RELEASE unit")
        except BaseException as exc:
            if not conn.raw.closed:
                with suppress(psycopg.Error):  # the connection is gone: the batch's commit fails and says so
                    conn.command("ROLLBACK TO unit")  # one statement each: a pipeline takes no more
                    conn.command("RELEASE unit")
            if isinstance(exc, psycopg.Error):
                raise StorageError(f"database write failed: {_reason(exc)}") from exc
            raise

    def schema_version(self, db: Connection) -> int:
        return pg_migrations.version(db)

    def upgrade(self, db: Connection) -> None:
        pg_migrations.upgrade(db)

    def checkpoint(self) -> None:
        """Nothing to do: PostgreSQL checkpoints on its own, outside any transaction of ours."""

    @contextmanager
    def checkpoint_deferred(self) -> Iterator[None]:
        yield

    def raw_connection(self) -> Connection:
        conn: PgConnection | None = getattr(self._local, "tool_conn", None)
        if conn is None or conn.raw.closed:
            try:
                conn = PgConnection(psycopg.connect(self.url, autocommit=True, row_factory=_rows, connect_timeout=10))
            except psycopg.Error as exc:
                raise StorageError(f"cannot connect to PostgreSQL at {self._where}: {_reason(exc)}") from None
            self._local.tool_conn = conn
        return conn

    def close(self) -> None:
        conn: PgConnection | None = getattr(self._local, "tool_conn", None)
        if conn is not None:
            conn.raw.close()
            self._local.tool_conn = None
        self._pool.close()


def _rollback(raw: "psycopg.Connection[Any]") -> None:
    if not raw.closed and raw.info.transaction_status != pq.TransactionStatus.IDLE:
        with suppress(psycopg.Error):  # the connection broke: the pool discards it
            raw.execute("ROLLBACK")


def _reason(exc: BaseException) -> str:
    # psycopg's messages name host, port, user and database, never the password; keep the first line.
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def write_probe(url: str, timeout: float) -> str:
    """ "ok" when the database takes the writer lock within `timeout` (given back at once), else why not."""
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)))
    except psycopg.Error as exc:
        return f"cannot connect to {where(url)}: {_reason(exc)}"
    try:
        conn.execute(f"SET lock_timeout = '{int(timeout * 1000)}ms'")  # a number, not input
        conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITER_LOCK})")
        conn.execute("ROLLBACK")
        return "ok"
    except psycopg.Error as exc:
        return f"not writable: {_reason(exc)}"
    finally:
        conn.close()
