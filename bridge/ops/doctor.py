"""`provbridge doctor`: can this installation serve? One line per check: ok, or what is wrong and what to do.
A warning (`WARN`) says what will hurt without failing the doctor.

The checks run in order and each one that others depend on gates them (no database check without an
initialised data dir, nothing without a configuration that loads). The doctor only reads: it opens
the database read-only (SQLite may still create its -wal and -shm files, 0600 like the database) and
creates no other file, so it is safe next to a running bridge.

    config        the settings load (file, PROVBRIDGE_* variables), every profile is a valid topic filter,
                  the TLS settings are consistent with the files (what `serve` would refuse)
    data dir      exists and is initialised
    key files     private keys and secrets are 0600 (no group or other access) and parse
    active keys   the active cloud and token keys load; jwks.json and cloud_public.pem match them
    database      SQLite's integrity check is ok and the bridge's tables are there
    references    every device's cloud key is on disk; every profile keys and devices use is configured
    patterns      every active key's hardware-id pattern runs in RE2; one written for Python's `re` (before
                  RE2) is not read otherwise by RE2, as far as its devices and a few built examples show
    broker        a TCP connection (and TLS handshake when the bridge uses TLS) to where the bridge connects
    broker tls    the TLS listener devices are told about, with the CA devices pin
    mirror        with the dynamic-security opt-in (`broker.mosquitto_auth = "dynsec"`): how many devices
                  Mosquitto holds; a warning past the size where a claim costs Mosquitto over 10 ms of CPU
    clock         the system clock is not before the newest record in the database or key directory
"""

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.claims import hardware_pattern
from bridge.config import DEFAULT_CONFIG_FILE, Settings, load_settings
from bridge.errors import (
    CheckFailed,
    CheckWarning,
    ConfigError,
    InvalidPattern,
    MirrorError,
    NotInitialised,
    StorageError,
)
from bridge.mosquitto import dynsec
from bridge.mosquitto.files import ops_hashes_file
from bridge.storage import keyfiles, postgres, sharedfiles
from bridge.storage.keyfiles import KeyRing
from bridge.storage.readonly import ReadOnlyDatabase
from bridge.tls import certificates as tls
from bridge.tls.device_ca import DeviceCaFiles, load_device_ca
from bridge.tokens import fill_scope
from provwire import crypto, topics
from provwire.models import rfc3339

Status = Literal["ok", "warn", "fail", "skipped"]

CONNECT_TIMEOUT_SECONDS = 3.0
# File systems stamp mtimes from a coarse clock; a record a moment "ahead" of time.time() is no finding.
CLOCK_TOLERANCE_SECONDS = 5
# How long Python's `re` may take over a legacy pattern's probes (bridge/claims/hardware_pattern.py) before the
# doctor gives up on comparing it: a sound pattern takes milliseconds.
PYTHON_MATCH_TIMEOUT_SECONDS = 10.0
CHECKS = (
    "config",
    "data dir",
    "key files",
    "active keys",
    "database",
    "shared keys",
    "references",
    "patterns",
    "broker",
    "broker tls",
    "mirror",
    "clock",
)
BRIDGE_TABLES = ("tenants", "provision_keys", "devices", "answers", "events", "refresh_requests")
_SAMPLE_DEVICE_ID = "dev_" + "a" * 26  # to fill `{device_id}` when checking profiles


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str

    def line(self) -> str:
        if self.status in ("fail", "warn"):
            return f"{self.name}: {self.status.upper()}: {self.detail}"
        return f"{self.name}: {self.status} ({self.detail})"


@dataclass(frozen=True)
class Report:
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks],
        }


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass
class _Run:
    """The checks so far, and what the passed ones established for the later ones."""

    checks: list[Check] = field(default_factory=list)
    settings: Settings | None = None
    ring: KeyRing | None = None

    def run(self, name: str, check: Callable[[], str], blocked_by: str | None = None) -> bool:
        if blocked_by is not None:
            self.checks.append(Check(name, "skipped", blocked_by))
            return False
        try:
            detail = check()
        except CheckFailed as exc:
            self.checks.append(Check(name, "fail", _one_line(str(exc))))
            return False
        except CheckWarning as exc:
            self.checks.append(Check(name, "warn", _one_line(str(exc))))
            return True
        except Exception as exc:  # a diagnostic tool reports what it did not foresee instead of crashing
            self.checks.append(Check(name, "fail", _one_line(f"unexpected {type(exc).__name__}: {exc}")))
            return False
        self.checks.append(Check(name, "ok", _one_line(detail)))
        return True


def run_checks(config_file: Path | None, data_dir: Path | None, now: float | None = None) -> Report:
    """Every check, in order; `data_dir` overrides the configured one (like `--data-dir`)."""
    now = time.time() if now is None else now
    r = _Run()

    def config() -> str:
        r.settings = check_config(config_file, data_dir)
        return f"{_config_source(config_file)}; profiles {', '.join(sorted(r.settings.profiles))}"

    if not r.run("config", config):
        for name in CHECKS[1:]:
            r.run(name, lambda: "", blocked_by="the configuration does not load")
        return Report(r.checks)
    settings = r.settings
    assert settings is not None

    initialised = r.run("data dir", lambda: check_data_dir(settings.data_dir))
    not_init = None if initialised else "the data dir is not initialised"
    r.run("key files", lambda: check_secret_files(settings), not_init)

    def active_keys() -> str:
        r.ring, detail = check_active_keys(settings.data_dir)
        return detail

    keys_ok = r.run("active keys", active_keys, not_init)
    database_ok = r.run("database", lambda: check_database(settings.database), not_init)
    r.run(
        "shared keys",
        lambda: check_shared_keys(settings),
        not_init or (None if database_ok else "needs the database") or _not_shared(settings),
    )
    blocked = not_init or (None if keys_ok and database_ok else "needs the active keys and the database")
    r.run("references", lambda: check_references(settings, r.ring), blocked)
    r.run(
        "patterns",
        lambda: check_patterns(settings.database),
        not_init or (None if database_ok else "needs the database"),
    )
    endpoint = tls.bridge_endpoint(settings)
    r.run("broker", lambda: check_listener(endpoint.host, endpoint.port, endpoint.tls, endpoint.ca_file))
    r.run("broker tls", lambda: check_tls_listener(settings), _tls_not_separate(settings))
    r.run("mirror", lambda: check_mirror(settings), _not_mirroring(settings))
    r.run("clock", lambda: check_clock(settings, now, database_ok), not_init)
    return Report(r.checks)


# --- the checks: each returns what it found, or raises CheckFailed -------------------------------


def _config_source(config_file: Path | None) -> str:
    if config_file is not None:
        return str(config_file)
    return str(DEFAULT_CONFIG_FILE) if DEFAULT_CONFIG_FILE.is_file() else "built-in defaults and environment"


def check_config(config_file: Path | None, data_dir: Path | None) -> Settings:
    try:
        settings = load_settings(config_file)
        if data_dir is not None:
            settings = settings.model_copy(update={"data_dir": data_dir})
        tls.resolve(settings)  # the TLS settings `serve` would refuse
    except ConfigError as exc:
        raise CheckFailed(f"{exc}: fix the configuration file or the PROVBRIDGE_* variable") from exc
    for name, profile in settings.profiles.items():
        for topic_filter in (*profile.publish, *profile.subscribe):
            filled = fill_scope([topic_filter], _SAMPLE_DEVICE_ID, "tenant")[0]
            if not topics.is_valid_filter(filled):
                raise CheckFailed(
                    f"profile {name!r}: {topic_filter!r} is not a valid MQTT topic filter, so its devices' tokens"
                    f" would be useless: fix [profiles.{name}] ('#' only as the last level, '+' as a whole level)"
                )
    return settings


def check_data_dir(data_dir: Path) -> str:
    if not data_dir.is_dir():
        raise CheckFailed(f"{data_dir} does not exist or is not a directory: run `provbridge init` (or fix data_dir)")
    if not keyfiles.is_initialised(data_dir):
        raise CheckFailed(f"{data_dir} is not initialised (no keys/active.json): run `provbridge init`")
    return str(data_dir)


def _secret_files(settings: Settings) -> list[tuple[Path, bool]]:
    """(file, required) for every file holding a private key, a secret or secret digests."""
    data_dir, tls_files = settings.data_dir, tls.TlsFiles.of(settings.data_dir)
    files = [(p, True) for p in sorted(keyfiles.keys_dir(data_dir).glob("*.pem"))]
    files += [(settings.bridge_secret_file, True)]
    if settings.storage.url is None:  # the SQLite database: on PostgreSQL the server's own files hold the rows
        files += [(settings.database_file, True)]
        files += [(Path(f"{settings.database_file}-{suffix}"), False) for suffix in ("wal", "shm")]
    files += [(keyfiles.ops_users_file(data_dir), False), (ops_hashes_file(data_dir), False)]
    files += [(tls_files.ca_key, False), (tls_files.server_key, False)]
    files += [(DeviceCaFiles.of(data_dir).key, False)]
    return files


def _private_key_problem(path: Path) -> str | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        return f"{path} does not parse as a PEM private key ({exc}): restore it from a backup"
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        return f"{path} is not a P-256 private key: restore it from a backup"
    return None


def _content_problem(path: Path, settings: Settings) -> str | None:
    if path.suffix in (".pem", ".key"):
        return _private_key_problem(path)
    if path == settings.bridge_secret_file:
        return None if path.read_text().strip() else f"{path} is empty: restore it, or the bridge cannot log in"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError as exc:
            return f"{path} is not JSON ({exc}): restore it from a backup"
    return None  # the database: its own check


def check_secret_files(settings: Settings) -> str:
    problems: list[str] = []
    checked = 0
    for path, required in _secret_files(settings):
        if not path.exists():
            if required:
                problems.append(f"{path} is missing: restore it from a backup (or `provbridge init` a new data dir)")
            continue
        checked += 1
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            problems.append(f"{path} has mode {mode:04o} (group or others may read it): run `chmod 600 {path}`")
        problem = _content_problem(path, settings)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{checked} files, owner-only and readable"


def check_active_keys(data_dir: Path) -> tuple[KeyRing, str]:
    try:
        ring = keyfiles.load_keys(data_dir)
    except (NotInitialised, ValueError, KeyError, OSError) as exc:
        raise CheckFailed(
            f"the key ring does not load ({exc}): restore {keyfiles.keys_dir(data_dir)} from a backup"
        ) from exc
    rewrite = "`provbridge keys rotate --token` rewrites it (tokens already issued stay valid)"
    jwks_file = keyfiles.jwks_file(data_dir)
    try:
        kids = keyfiles.published_token_kids(data_dir)
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"{jwks_file} does not load ({exc}): brokers cannot verify device tokens; {rewrite}") from exc
    if ring.active_token not in kids:
        raise CheckFailed(
            f"{jwks_file} lacks the active token key {ring.active_token}: every new device token is refused; {rewrite}"
        )
    public_file = keyfiles.cloud_public_file(data_dir)
    try:
        public = keyfiles.published_cloud_key(data_dir)
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"{public_file} does not load ({exc}): {rewrite}") from exc
    if public != crypto.sec1(ring.cloud_key.public_key()):
        raise CheckFailed(
            f"{public_file} is not the active cloud key {ring.active_cloud}: firmware built from it would get"
            f" answers sealed with another key; {rewrite}"
        )
    return ring, f"cloud {ring.active_cloud}, token {ring.active_token}; jwks.json and cloud_public.pem match"


def check_database(database: Path | str) -> str:
    """The database opens read-only, is the bridge's and (SQLite) passes its integrity check. PostgreSQL checks its own
    pages (its amcheck extension needs its superuser): there, only that it answers with the bridge's tables."""
    if isinstance(database, str):
        name, restore = f"PostgreSQL at {postgres.where(database)}", "restore the database from a backup"
    else:
        if not database.is_file():
            raise CheckFailed(f"{database} is missing: restore it from a backup (every device and key is in it)")
        name = str(database)
        restore = f"stop the bridge and restore {database} from a backup (`sqlite3 {database} .recover` may save rows)"
    try:
        with ReadOnlyDatabase(database) as db:
            findings = db.integrity_findings()
            if findings != ["ok"]:
                raise CheckFailed(f"integrity_check found {len(findings)} problem(s), first: {findings[0]}: {restore}")
            missing = [t for t in BRIDGE_TABLES if t not in db.tables()]
            if missing:
                raise CheckFailed(f"it lacks the tables {', '.join(missing)}: not the bridge's database? {restore}")
            devices = db.device_count()
    except StorageError as exc:
        raise CheckFailed(f"{name} cannot be read ({exc}): {restore}") from exc
    return f"{name}, {devices} devices" if db.postgres else f"integrity ok, {devices} devices"


def _not_shared(settings: Settings) -> str | None:
    return None if sharedfiles.is_shared(settings) else "SQLite: the data dir's key files are the only ones"


def check_shared_keys(settings: Settings) -> str:
    """PostgreSQL: the data dir's key files and bridge secret are the database's (bridge/storage/sharedfiles.py)."""
    with ReadOnlyDatabase(settings.database) as db:
        stored = db.shared_files()
    if not any(data is not None for data in stored.values()):
        raise CheckWarning(
            "the database holds no key files yet: `provbridge serve` puts this data dir's there when it starts"
        )
    try:
        aead = sharedfiles.host_key(settings)
        shared = {name: sharedfiles.unseal(aead, name, data) for name, data in stored.items() if data is not None}
    except NotInitialised as exc:
        raise CheckFailed(str(exc)) from exc
    local = sharedfiles.local_files(settings)
    differ = sorted(name for name in set(shared) | set(local) if shared.get(name) != local.get(name))
    if differ:
        raise CheckWarning(
            f"this data dir differs from the database in {', '.join(differ)}: a running bridge takes the database's"
            f" within storage.key_sync_seconds ({settings.storage.key_sync_seconds:g} s), `provbridge serve` when it"
            " starts"
        )
    return f"{len(shared)} files, the same as the database's, opened with {settings.storage_key_file}"


def check_references(settings: Settings, ring: KeyRing | None) -> str:
    assert ring is not None
    problems: list[str] = []
    with ReadOnlyDatabase(settings.database) as db:
        cloud_kids = db.devices_per_cloud_key()
        profiles = db.profiles_in_use()
        certificate_keys, certificate_devices = db.certificate_holders()
    for kid, count in cloud_kids:
        if kid not in ring.cloud:
            problems.append(
                f"{count} device(s) were provisioned with cloud key {kid}, which is not in"
                f" {keyfiles.keys_dir(settings.data_dir)}: they cannot refresh tokens; restore cloud-{kid}.pem"
            )
    for profile in profiles:
        if profile not in settings.profiles:
            problems.append(
                f"profile {profile!r} is used by keys or devices but not configured: their tokens get the default"
                f" scope; add [profiles.{profile}]"
            )
    if certificate_keys or certificate_devices:
        try:
            load_device_ca(settings.data_dir)
        except (NotInitialised, ConfigError) as exc:
            problems.append(
                f"{certificate_keys} key(s) and {certificate_devices} device(s) use certificates, but the device CA"
                f" does not load ({exc}): their claims and renewals fail; restore device-ca.pem and device-ca.key"
                f" in {DeviceCaFiles.of(settings.data_dir).key.parent}"
            )
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{len(cloud_kids)} cloud key(s) in use, all on disk; every profile in use is configured"


def check_patterns(database: Path | str) -> str:
    with ReadOnlyDatabase(database) as db:
        keys = db.patterned_keys()
        problems: list[str] = []
        for key in keys:
            if key.syntax == "re2":
                found = _refusal(key.pattern)
            else:
                found = hardware_pattern.differences(key.pattern, python_matches, db.hardware_ids_of_key(key.id))
            if found:
                problems.append(f"key {key.id} ({key.name}), pattern {key.pattern!r}: {'; '.join(found)}")
    if problems:
        raise CheckFailed(
            "hardware-id patterns are matched by RE2 (linear time; before, by Python's re), and RE2 does not match"
            f" these as they were meant: {' | '.join(problems)}: create a key whose pattern says the same in RE2"
            " syntax (docs/SECURITY.md), then revoke the old one (until then its claims are matched by RE2 as shown,"
            " or refused when RE2 cannot run the pattern)"
        )
    legacy = sum(1 for key in keys if key.syntax != "re2")
    return (
        f"{len(keys)} active key(s) with a hardware-id pattern, all run by RE2 as meant ({legacy} written before RE2)"
    )


def _refusal(pattern: str) -> list[str]:
    try:
        hardware_pattern.compile_pattern(pattern)
    except InvalidPattern as exc:
        return [str(exc)]
    return []


# Python's matcher, run on the doctor's behalf in a child process it can kill.
_PYTHON_MATCHER = """
import json, re, sys, warnings
warnings.simplefilter("ignore")
job = json.load(sys.stdin)
pattern = re.compile(job["pattern"])
json.dump([pattern.fullmatch(text) is not None for text in job["texts"]], sys.stdout)
"""


def python_matches(pattern: str, texts: list[str]) -> list[bool] | None:
    """Whether Python's `re` fully matches each text, or None when it did not answer within
    PYTHON_MATCH_TIMEOUT_SECONDS: a pattern written for it may backtrack for ever (why RE2 runs them now),
    and the doctor must finish all the same, so the matching runs in a child process that is killed then."""
    job = json.dumps({"pattern": pattern, "texts": texts})
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PYTHON_MATCHER],
            input=job,
            capture_output=True,
            text=True,
            timeout=PYTHON_MATCH_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:  # Python's re cannot compile it either
        return None
    answers: list[bool] = json.loads(done.stdout)
    return answers


def check_listener(host: str, port: int, use_tls: bool, ca_file: Path | None) -> str:
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS) as sock:
            if not use_tls:
                return f"{where} accepts connections"
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            with context.wrap_socket(sock, server_hostname=host) as tls_sock:
                return f"{where} accepts connections, {tls_sock.version()} with a certificate the CA vouches for"
    except ssl.SSLError as exc:
        raise CheckFailed(
            f"TLS handshake with {where} failed ({exc}): check `provbridge tls show`; renew with"
            " `provbridge tls init --force` and restart the broker"
        ) from exc
    except OSError as exc:
        raise CheckFailed(
            f"nothing accepts connections on {where} ({exc}): start `provbridge serve` (embedded broker) or the"
            " external broker, or fix broker.host / broker.port"
        ) from exc


def _tls_not_separate(settings: Settings) -> str | None:
    """Why the TLS listener needs no check of its own, or None when it does."""
    if not tls.tls_offered(settings):
        return "no TLS listener: broker.tls_listen, or no certificate in <data_dir>/tls"
    endpoint = tls.bridge_endpoint(settings)
    if endpoint.tls and endpoint.port == settings.broker.tls_port:
        return "the broker check above used it"
    return None


def check_tls_listener(settings: Settings) -> str:
    endpoint = tls.bridge_endpoint(settings)
    ca_file = settings.broker.ca_file or tls.TlsFiles.of(settings.data_dir).ca_cert
    return check_listener(endpoint.host, settings.broker.tls_port, True, ca_file if ca_file.is_file() else None)


def _not_mirroring(settings: Settings) -> str | None:
    if settings.broker.mode != "external":
        return "the embedded broker verifies tokens itself"
    if not dynsec.uses_dynsec(settings) or settings.broker.mosquitto_auth != "dynsec":
        return "nothing is mirrored: Mosquitto verifies tokens with the provbridge_jwt plugin"
    return None


def check_mirror(settings: Settings) -> str:
    try:
        mirrored = dynsec.count_mirrored_devices(settings)
    except MirrorError as exc:
        raise CheckFailed(f"cannot count the devices mirrored in Mosquitto: {exc}") from exc
    warning = dynsec.mirrored_fleet_warning(mirrored)
    if warning is not None:
        raise CheckWarning(warning)
    return f"{mirrored} devices mirrored into dynamic security (a warning past {dynsec.MIRRORED_FLEET_WARNING})"


def check_clock(settings: Settings, now: float, database_ok: bool) -> str:
    data_dir = settings.data_dir
    files = [*keyfiles.keys_dir(data_dir).iterdir(), keyfiles.jwks_file(data_dir), settings.bridge_secret_file]
    records = [(str(p), p.stat().st_mtime) for p in files if p.is_file()]
    if database_ok:  # a damaged database has no trustworthy times; its own check says so
        with ReadOnlyDatabase(settings.database) as db:
            records += db.newest_records()
    if not records:
        return f"{rfc3339(now)}; nothing to compare it with"
    what, newest = max(records, key=lambda record: record[1])
    if newest > now + CLOCK_TOLERANCE_SECONDS:
        raise CheckFailed(
            f"the system clock ({rfc3339(now)}) is {int(newest - now)} s before {what} ({rfc3339(newest)}): set it"
            " right (NTP) before serving; key expiry, tokens and the refresh window all depend on it"
        )
    return f"{rfc3339(now)}, not before the newest record ({what}, {rfc3339(newest)})"
