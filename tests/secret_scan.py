"""The whole-suite secret scan: no raw secret in anything the test suite left behind (issue 5).

`make test` runs pytest with `--basetemp=build/test-tmp`, then `python -m tests.secret_scan build/test-tmp`.
Every file under that directory is scanned: the pytest process's own log (every record from DEBUG up,
written by tests/conftest.py; the claim workers' records arrive there too), the logs of the processes the
tests start (`provbridge serve`, Mosquitto, the standalone broker, the demo, the CLI), every SQLite
database (each cell of each table, and the raw bytes of the file and its `-wal`, which keep deleted rows
and old page versions), every row of the PostgreSQL test databases (dumped as `*.rows` files when the suite's
server stops, tests/helpers/postgres.py), and every other file (key rings, JWKS, Mosquitto configuration and
dynamic-security files, deny lists, Mosquitto's persistence, ...).

Files that exist to hold a secret (PEM or `.key` files of private keys, `bridge.secret`, the simulator's
`vault.key` and encrypted `credentials.vault`) are not scanned; what they hold is looked for everywhere else.

Two nets:

- formats (bridge/claims/identifiers.py, bridge/tokens.py, PKCS#8): `pk_` provisioning keys (any presented key, a
  guessed one included), `PROV-XXXX-XXXX` codes, `dk_` API keys, `op_` ops passwords, `pba_` admin API tokens,
  JWTs, PEM private keys and base64 P-256 private-key DER without its PEM armour;
- exact values found on disk: the scalar of every private key in a key file (hex, base64, base64url; raw
  32 bytes in database cells), `bridge.secret`, vault keys, and each provisioned device's ECDH secret and
  device key, derived from its database row and its data dir's cloud key.

Hashes, key ids, public keys, request ids and hardware ids match neither. One line per finding: where,
which kind, and the secret's first 6 characters, never more. Exit 0 when clean, 1 on a finding, 2 when
there is nothing to scan (a wrong directory must not pass).

One exception, printed as a note: Mosquitto's persistence file holds the claims queued for the bridge's
persistent session, and a claim carries its provisioning key by protocol (PROTOCOL.md); that is what
lets a claim survive a bridge or broker restart (docs/RELIABILITY.md F1, F4). Any other secret there fails.
"""

import argparse
import base64
import bisect
import mmap
import re
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provwire import crypto

SQLITE_MAGIC = b"SQLite format 3\x00"
MOSQUITTO_MAGIC = b"\x00\xb5\x00mosquitto db"
PREFIX_CHARS = 6  # what a finding shows of the secret

# Secret formats, as bytes patterns: the same patterns run on raw files and on database cells. Each
# starts with a literal, so that the regex engine can skip ahead.
PATTERNS: dict[str, re.Pattern[bytes]] = {
    "provisioning key": re.compile(rb"pk_[A-Za-z0-9_-]{8,}"),
    "human code": re.compile(rb"(?i:prov)-[0-9A-Za-z]{4}-[0-9A-Za-z]{4}"),
    "API key": re.compile(rb"dk_[A-Za-z0-9_-]{8,}"),
    "ops password": re.compile(rb"op_[A-Za-z0-9_-]{20,}"),
    "admin API token": re.compile(rb"pba_[A-Za-z0-9_-]{20,}"),
    # header.payload.signature, both JSON objects ('{"' is "eyJ" in base64url); the signature may be empty.
    "token (JWT)": re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    "private key (PEM)": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    # The DER that starts every P-256 private key, in base64: PKCS#8 (what keyfiles writes) and SEC1.
    "private key (DER)": re.compile(rb"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg|MHcCAQEEI[A-Za-z0-9+/]{8}"),
}
# In text, these must be words of their own (not `stop_...`, `improv-...`); in binary files (database
# pages, where a row's values sit side by side) they need not be.
WORD_ONLY = {"provisioning key", "human code", "API key", "ops password", "admin API token"}

# Where a 32-byte secret would sit as a word of its own: hex, unpadded base64url (bridge.secret's
# form), padded standard base64. Each lies inside a run of RUN's alphabet, and a run's edges are word
# edges for all three, so only runs are searched.
RUN = re.compile(rb"[A-Za-z0-9+/_=-]{43,}")
WORDS = (
    re.compile(rb"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])"),
    re.compile(rb"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"),
    re.compile(rb"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}="),
)

RAW_SECRET_FILES = {"bridge.secret", "vault.key", "credentials.vault"}
KEY_FILE_SUFFIXES = {".pem", ".key"}
PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n[A-Za-z0-9+/=\r\n]*?-----END \1-----")
CLAIM_CONTENT = {"provisioning key", "human code"}


@dataclass(frozen=True)
class Finding:
    path: str
    where: str  # "line 12", "table events, column body, rowid 5", "byte 4096"
    kind: str
    prefix: str
    count: int = 1

    def __str__(self) -> str:
        times = f" ({self.count} times)" if self.count > 1 else ""
        return f"{self.path}: {self.where}: {self.kind} {self.prefix}...{times}"


@dataclass
class Registry:
    """Exact secret values: text forms for the word scan, raw 32-byte values for database cells."""

    words: dict[bytes, str] = field(default_factory=dict)
    raw: dict[bytes, str] = field(default_factory=dict)

    def add_bytes(self, value: bytes, kind: str) -> None:
        self.raw[value] = kind
        for form in (value.hex(), value.hex().upper(), base64.b64encode(value).decode()):
            self.words[form.encode()] = kind
        self.words[base64.urlsafe_b64encode(value).rstrip(b"=")] = kind

    def add_text(self, value: str, kind: str) -> None:
        self.words[value.encode()] = kind


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    allowed: list[Finding] = field(default_factory=list)  # the documented exception, shown as notes
    files: int = 0
    logs: int = 0
    databases: int = 0
    cells: int = 0
    key_files: int = 0
    notes: list[str] = field(default_factory=list)


def _show(secret: bytes) -> str:
    head = secret[:PREFIX_CHARS]
    return head.decode("ascii") if head.isascii() else secret[: PREFIX_CHARS // 2].hex()


def _alnum(data: bytes | mmap.mmap, at: int) -> bool:
    return 0 <= at < len(data) and data[at : at + 1].isalnum()


def _in_word(data: bytes | mmap.mmap, at: int) -> bool:
    """A character a secret cannot follow: a letter, a digit, or `_` / `-`, which continue a base64url word
    (a public key's coordinate such as `...Kz_pk_u44q...` holds `pk_` by chance, one JWK in tens of thousands)."""
    return _alnum(data, at) or (0 <= at < len(data) and data[at : at + 1] in (b"_", b"-"))


class Match(NamedTuple):
    offset: int
    kind: str
    secret: bytes


def matches(data: bytes | mmap.mmap, registry: Registry, text: bool = True) -> Iterator[Match]:
    """(offset, kind, secret) of every secret in `data`, by format and by exact value."""
    for kind, pattern in PATTERNS.items():
        for m in pattern.finditer(data):
            if text and kind in WORD_ONLY and (_in_word(data, m.start() - 1) or _alnum(data, m.end())):
                continue
            yield Match(m.start(), kind, m.group())
    if registry.words:
        for run in RUN.finditer(data):
            text = run.group()
            for word in WORDS:
                for m in word.finditer(text):
                    kind = registry.words.get(m.group())
                    if kind is not None:
                        yield Match(run.start() + m.start(), kind, m.group())


def _grouped(path: str, hits: Iterable[tuple[str, str, bytes]]) -> list[Finding]:
    """One finding per (kind, secret) in a file: where it first appeared, and how often it did."""
    first: dict[tuple[str, bytes], str] = {}
    counts: dict[tuple[str, bytes], int] = {}
    for where, kind, secret in hits:
        first.setdefault((kind, secret), where)
        counts[(kind, secret)] = counts.get((kind, secret), 0) + 1
    return [Finding(path, first[k], k[0], _show(k[1]), counts[k]) for k in first]


# --- what holds secrets on purpose ------------------------------------------------------------


def is_key_file(path: Path) -> bool:
    """A file whose job is to hold a secret (damaged key files included): not scanned, but learnt from."""
    name = path.name.removesuffix(".tmp")  # keyfiles.write_private writes <name>.tmp first
    if name in RAW_SECRET_FILES:
        return True
    if Path(name).suffix not in KEY_FILE_SUFFIXES or path.stat().st_size > 1 << 20:
        return False
    return b"PRIVATE KEY-----" in path.read_bytes()


def _scalar(key: object) -> bytes | None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    return None


def learn(path: Path, registry: Registry) -> None:
    """Add what a key file holds to the registry."""
    name = path.name.removesuffix(".tmp")
    data = path.read_bytes()
    if name == "bridge.secret":
        registry.add_text(data.decode("ascii", "replace").strip(), "bridge.secret")
        return
    if name == "vault.key":
        registry.add_bytes(data, "simulator vault key")
        return
    for m in PEM_BLOCK.finditer(data):
        if b"PRIVATE KEY" not in m.group(1):
            continue
        try:
            scalar = _scalar(serialization.load_pem_private_key(m.group(), password=None))
        except (ValueError, TypeError):  # damaged on purpose by a test: its PEM format is still caught
            continue
        if scalar is not None:
            registry.add_bytes(scalar, "private key (scalar)")


def _cloud_keys(data_dir: Path) -> dict[str, ec.EllipticCurvePrivateKey]:
    keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    for pem in sorted((data_dir / "keys").glob("cloud-*.pem")):
        try:
            key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
        except (ValueError, TypeError):
            continue
        if isinstance(key, ec.EllipticCurvePrivateKey):
            keys[pem.stem.removeprefix("cloud-")] = key
    return keys


def learn_device_keys(database: Path, registry: Registry) -> None:
    """Each device's ECDH secret and device key (never stored nor sent), from its row and its cloud key."""
    cloud = _cloud_keys(database.parent)
    if not cloud:
        return
    try:
        with _Snapshot(database) as db:
            rows = db.execute("SELECT public_key, cloud_key_id FROM devices").fetchall()
    except sqlite3.Error:
        return  # not a bridge database, or a damaged one: the cell scan reports what it can read
    for public_key, kid in rows:
        if kid not in cloud or not isinstance(public_key, bytes):
            continue
        try:
            shared = crypto.shared_secret(cloud[kid], crypto.public_key_from_sec1(public_key))
        except ValueError:
            continue
        registry.add_bytes(shared, "device ECDH secret")
        registry.add_bytes(crypto.derive_device_key(shared), "device key")


# --- scanning ---------------------------------------------------------------------------------


class _Snapshot:
    """A private copy of a database and its -wal, opened read-only: the copy replays the WAL, and the
    original (a test may have damaged it on purpose, or left it open) is not touched."""

    def __init__(self, database: Path) -> None:
        self.database = database

    def __enter__(self) -> sqlite3.Connection:
        self.dir = tempfile.TemporaryDirectory(prefix="secret-scan-")
        copy = Path(self.dir.name) / "copy.db"
        shutil.copyfile(self.database, copy)
        wal = self.database.with_name(self.database.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, copy.with_name("copy.db-wal"))
        self.db = sqlite3.connect(copy)
        self.db.execute("PRAGMA query_only = ON")
        return self.db

    def __exit__(self, *_exc: object) -> None:
        self.db.close()
        self.dir.cleanup()


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def scan_cells(database: Path, rel: str, registry: Registry, report: Report) -> set[bytes]:
    """Every cell of every table: text as UTF-8, blobs raw. Returns the secrets found."""
    hits: list[tuple[str, str, bytes]] = []
    try:
        with _Snapshot(database) as db:
            tables = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
            for table, sql in tables:
                # A WITHOUT ROWID table (device_labels) has none: its rows are numbered as read instead.
                numbered = "ROW_NUMBER() OVER ()" if "WITHOUT ROWID" in (sql or "").upper() else "rowid"
                cursor = db.execute(f"SELECT {numbered}, * FROM {_quoted(table)}")  # names from the schema
                columns = [d[0] for d in cursor.description][1:]
                for rowid, *values in cursor:
                    report.cells += len(values)
                    hits += _row_hits(table, rowid, columns, values, registry)
    except sqlite3.Error as exc:  # damaged on purpose by a test (doctor): its raw bytes are still scanned
        report.notes.append(f"{rel}: cells not readable ({exc}); its raw bytes were scanned")
    report.findings += _grouped(rel, hits)
    return {secret for _, _, secret in hits}


def _row_hits(
    table: str, rowid: object, columns: list[str], values: list[object], registry: Registry
) -> list[tuple[str, str, bytes]]:
    """The row's text and blob cells scanned as one, NUL-separated (a word edge for every pattern)."""
    parts: list[bytes] = []
    names: list[str] = []
    hits: list[tuple[str, str, bytes]] = []
    for column, value in zip(columns, values, strict=True):
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogatepass")
        if not isinstance(value, bytes):
            continue
        if value in registry.raw:
            hits.append((f"table {table}, column {column}, rowid {rowid}", registry.raw[value] + " (raw)", value))
        parts.append(value)
        names.append(column)
    starts: list[int] = []
    offset = 0
    for part in parts:
        starts.append(offset)
        offset += len(part) + 1
    for at, kind, secret in matches(b"\x00".join(parts), registry):
        column = names[bisect.bisect_right(starts, at) - 1]
        hits.append((f"table {table}, column {column}, rowid {rowid}", kind, secret))
    return hits


def scan_bytes(path: Path, rel: str, registry: Registry, skip: set[bytes]) -> list[Finding]:
    """A file's raw bytes: line numbers for text, byte offsets for binary files."""
    if path.stat().st_size == 0:
        return []
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        binary = b"\x00" in data[:4096]
        found = sorted(hit for hit in matches(data, registry, text=not binary) if hit.secret not in skip)
        hits: list[tuple[str, str, bytes]] = []
        line, counted = 1, 0
        for offset, kind, secret in found:
            if binary:
                hits.append((f"byte {offset}", kind, secret))
                continue
            line += data[counted:offset].count(b"\n")  # in order: each stretch is counted once
            counted = offset
            hits.append((f"line {line}", kind, secret))
    return _grouped(rel, hits)


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(len(SQLITE_MAGIC))


def scan(root: Path) -> Report:
    report = Report()
    registry = Registry()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    targets: list[Path] = []
    for path in files:
        if is_key_file(path):
            report.key_files += 1
            learn(path, registry)
        else:
            targets.append(path)
    databases = {p for p in targets if _head(p) == SQLITE_MAGIC}
    for database in sorted(databases):
        learn_device_keys(database, registry)  # before any file is scanned: they are looked for everywhere
    for path in targets:
        rel = str(path.relative_to(root))
        report.files += 1
        skip: set[bytes] = set()
        if path in databases:
            report.databases += 1
            skip = scan_cells(path, rel, registry, report)  # a cell's secret is not reported again for its page
        elif path.suffix == ".log":
            report.logs += 1
        findings = scan_bytes(path, rel, registry, skip)
        if _head(path).startswith(MOSQUITTO_MAGIC):
            report.allowed += [f for f in findings if f.kind in CLAIM_CONTENT]
            findings = [f for f in findings if f.kind not in CLAIM_CONTENT]
        report.findings += findings
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.secret_scan", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the test session's basetemp (pytest --basetemp)")
    parser.add_argument("--max-lines", type=int, default=200, help="findings printed at most (default 200)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"secret scan: {args.root} is not a directory", file=sys.stderr)
        return 2
    report = scan(args.root)
    for note in report.notes:
        print(f"secret scan: note: {note}")
    for finding in report.allowed:
        print(f"secret scan: note: queued claims in Mosquitto's persistence (by protocol): {finding}")
    for finding in report.findings[: args.max_lines]:
        print(f"secret scan: LEAK {finding}")
    if len(report.findings) > args.max_lines:
        print(f"secret scan: ... and {len(report.findings) - args.max_lines} more")
    summary = (
        f"{report.files} files ({report.logs} logs, {report.databases} databases, {report.cells} cells) "
        f"scanned for the secrets of {report.key_files} key files and every secret format"
    )
    if report.databases == 0 or report.logs == 0:
        print(f"secret scan: nothing to scan in {args.root}: {summary}", file=sys.stderr)
        return 2
    if report.findings:
        print(f"secret scan: FAILED: {len(report.findings)} finding(s) in {summary}")
        return 1
    print(f"secret scan: clean: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
