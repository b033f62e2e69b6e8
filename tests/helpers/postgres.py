"""The one PostgreSQL launcher: a throwaway server of its own on 127.0.0.1, in a temp dir, for the tests that
run the store on PostgreSQL. `create_database` gives each test a fresh database owned by `provbridge`, a role
without superuser rights that logs in with a password (scram-sha-256, over TCP only); the superuser is used
only through the server's unix socket, for admin work.

PostgreSQL tests are skipped only when the server binaries are missing and CI is not set; under CI (where
`make test` installs them, `make postgresql`) a missing PostgreSQL fails them.
"""

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.helpers.network import free_port
from tests.helpers.processes import kill_group
from tests.helpers.waiting import wait_for

ROLE = "provbridge"
SUPERUSER = "postgres"
# Debian keeps the server binaries out of PATH, one directory per major version (`pg_config --bindir` names
# the client package's version, which need not have a server).
BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",  # a test server's data may be lost in a machine crash; it is thrown away anyway
    "full_page_writes": "off",
    "max_connections": "200",  # pools of many bridge processes, several tests' worth
    "password_encryption": "'scram-sha-256'",
}
HBA = f"""\
local all {SUPERUSER} trust
host all all 127.0.0.1/32 scram-sha-256
"""


def postgres_bindir() -> Path | None:
    """The directory with initdb and postgres: Debian's, newest version first, else PATH's."""
    versions = sorted(glob.glob(BINDIR_GLOB), key=lambda d: [int(n) for n in re.findall(r"\d+", d)], reverse=True)
    for candidate in [*versions, *os.get_exec_path()]:
        if all(os.access(os.path.join(candidate, name), os.X_OK) for name in ("initdb", "postgres")):
            return Path(candidate)
    return None


def require_postgres() -> Path:
    bindir = postgres_bindir()
    problem = None
    if bindir is None:
        problem = "PostgreSQL is not installed"
    elif os.geteuid() == 0 and not _has_user(SUPERUSER):
        problem = f"running as root, the server needs a {SUPERUSER!r} user to run as, and there is none"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{problem} but CI is set: `make test` (make postgresql) installs it")
        pytest.skip(f"{problem} (`make postgresql`); under CI this fails instead")
    assert bindir is not None
    return bindir


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1:`port`, its data and socket in a temp dir of its own (removed by `stop`),
    its log in `<root>/postgresql.log` (kept, for the secret scan and for post-mortems). `start` after `stop`
    makes a new, empty server; `start` after `kill` recovers the old one."""

    def __init__(self, root: Path) -> None:
        self.bindir = require_postgres()
        root.mkdir(parents=True, exist_ok=True)
        self.log_file = root / "postgresql.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(24)
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        # initdb and postgres refuse to run as root: as root, they run as the postgres user.
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam(SUPERUSER)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    @property
    def admin_url(self) -> str:
        """The superuser, through the unix socket (libpq URL; for `psql` or `psycopg.connect`)."""
        assert self.dir is not None
        return f"postgresql://{SUPERUSER}@/postgres?host={self.dir}&port={self.port}"

    def url(self, database: str) -> str:
        """What the bridge is given: `provbridge` with its password, over TCP."""
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    def admin(self, database: str = "postgres") -> "psycopg.Connection[tuple[Any, ...]]":
        """A superuser connection in autocommit (CREATE/DROP DATABASE cannot run in a transaction)."""
        assert self.dir is not None
        return psycopg.connect(host=str(self.dir), port=self.port, user=SUPERUSER, dbname=database, autocommit=True)

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database owned by `provbridge`; its URL."""
        name = name or f"test_{secrets.token_hex(6)}"
        with self.admin() as conn:
            # template0: no faster or slower than template1 or a template of our own (measured: the cost is
            # creating some 300 files), and never "being accessed by other users", so a copy cannot fail.
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
                    sql.Identifier(name), sql.Identifier(ROLE)
                )
            )
        return self.url(name)

    def dump_rows(self, into: Path) -> list[Path]:
        """Every row of every test database, as COPY's text (bytea as hex), one file per database under `into`: what
        tests/secret_scan.py reads after the suite, as it reads the SQLite files (the server's own dir goes)."""
        into.mkdir(parents=True, exist_ok=True)
        with self.admin() as conn:
            names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'test%'")]
        dumps = []
        for name in names:
            path = into / f"{name}.rows"
            with self.admin(name) as db, path.open("wb") as out:
                tables = db.execute(
                    "SELECT schemaname, tablename FROM pg_tables"
                    " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
                ).fetchall()
                for schema, table in tables:
                    statement = sql.SQL("COPY {}.{} TO STDOUT").format(sql.Identifier(schema), sql.Identifier(table))
                    with db.cursor().copy(statement) as copy:
                        for chunk in copy:
                            out.write(bytes(chunk))
            dumps.append(path)
        return dumps

    def drop_database(self, name: str) -> None:
        """Drops it even while connections to it remain (a pool a test left open): they are ended."""
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def start(self) -> None:
        """Start it (a new server when there is none); return once it accepts connections."""
        try:
            fresh = self.dir is None
            if fresh:
                self._init()
            self._spawn()
            if fresh:
                self._first_start()
        except BaseException:
            self.stop()  # whatever it started before it failed
            raise

    def restart(self) -> None:
        """A fast shutdown (connections ended, a clean checkpoint), then a start on the same port and data."""
        self._shutdown()
        self._spawn()

    def kill(self) -> None:
        """SIGKILL for the postmaster and every process of its session, as in a crash: `start` then recovers."""
        self._kill_group()

    def stop(self) -> None:
        """A fast shutdown, SIGKILL if that hangs; then the data and socket dir are removed. Always safe to call."""
        try:
            self._shutdown()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> "PostgresServer":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- the server's processes ---

    def _init(self) -> None:
        # Not under the test's tmp dir: the postgres user may not be able to reach it, and a unix socket's path
        # must stay under about 100 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="provbridge-pg-"))
        if self._as:
            os.chown(self.dir, self._as["user"], self._as["group"])
        data = self.dir / "data"
        # --no-sync: the cluster is thrown away, like its fsync=off.
        self._run(
            "initdb", "-D", str(data), "-U", SUPERUSER, "--encoding=UTF8", "--locale=C", "-A", "trust", "--no-sync"
        )
        settings = {**SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.dir}'"}
        with open(data / "postgresql.conf", "a") as conf:  # later lines win over initdb's
            conf.write("".join(f"{key} = {value}\n" for key, value in settings.items()))
        (data / "pg_hba.conf").write_text(HBA)

    def _run(self, program: str, *args: str) -> None:
        with open(self.log_file, "ab") as log:
            done = subprocess.run(
                [str(self.bindir / program), *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, **self._as
            )
        if done.returncode != 0:
            raise AssertionError(f"{program} failed with {done.returncode}:\n{self.log()[-3000:]}")

    def _spawn(self) -> None:
        # postgres itself, as our child rather than daemonized by pg_ctl: it is stopped and killed by its own
        # handle, and reaped by us (a container's init may never reap an orphan). Its own session, so that
        # `kill` reaches every process of the server, and a ^C to pytest does not reach it.
        assert self.dir is not None and self.process is None
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.dir / "data")],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                **self._as,
            )
        if not wait_for(self._ready, timeout=60):
            raise AssertionError(f"PostgreSQL did not start:\n{self.log()[-3000:]}")

    def _ready(self) -> bool:
        # Line 8 of postmaster.pid says "ready" once it accepts connections (after any crash recovery); line 1
        # tells ours from a killed predecessor's.
        assert self.dir is not None and self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"PostgreSQL exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        try:
            lines = (self.dir / "data" / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[0] == str(self.process.pid) and lines[7].strip() == "ready"

    def _first_start(self) -> None:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(self.password))
            )

    def _shutdown(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # a fast shutdown (what `pg_ctl stop -m fast` sends)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        self._kill_group()  # a hung shutdown, or its stragglers

    def _kill_group(self) -> None:
        if self.process is None:
            return
        kill_group(self.process)  # the new postmaster refuses to start while an old child holds the shared memory
        self.process = None
