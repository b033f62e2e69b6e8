"""`provbridge mosquitto-config`: the files of an external Mosquitto, from the settings and data dir.

The content is decided by the pure functions of `bridge.mosquitto.conf`; this module gathers their
inputs (bridge secret, ops accounts, TLS files) and writes the results:

    OUTDIR/mosquitto.conf          start Mosquitto with `mosquitto -c OUTDIR/mosquitto.conf`
    OUTDIR/dynamic-security.json   0600: password hashes (Mosquitto rewrites it on every change)
    OUTDIR/provisioning.acl
    OUTDIR/ca.pem, server.pem, server.key (0600)   copies of <data_dir>/tls/*, when TLS is on
    OUTDIR/device-ca.pem           copy of <data_dir>/tls/device-ca.pem, with the device-certificate listener
    OUTDIR/mosquitto.db            Mosquitto's persistence, once it ran

With `broker.mosquitto_auth = "jwt"` mosquitto.conf also loads the provbridge_jwt plugin (built from
bridge/mosquitto/jwt when needed), which verifies device tokens against <data_dir>/jwks.json and
<data_dir>/denylist.json: the bridge mirrors nothing.

Ops accounts: `ops_users.json` keeps only a SHA-256 of each ops password, from which no PBKDF2 hash
can be made. So `provbridge ops-user create` also records the password's dynamic-security hash in
`<data_dir>/mosquitto_ops_users.json` (0600) and, in external mode, adds the account to the running
Mosquitto through the bridge account. Ops users made before this file existed are reported as
missing: re-create them.
"""

import glob
import json
import os
import pwd
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bridge.config import Settings
from bridge.errors import ConfigError, MirrorError, NotInitialised
from bridge.mosquitto import conf as mc
from bridge.mosquitto import dynsec
from bridge.mosquitto import jwt as mosquitto_jwt
from bridge.storage import keyfiles
from bridge.tls import certificates as tls
from broker.auth import JWKS_FILE_NAME
from broker.denylist import DENYLIST_FILE_NAME
from broker.errors import BrokerConfigError

OPS_HASHES_FILE = "mosquitto_ops_users.json"
# Where distributions put the plugin: Debian/Ubuntu (multiarch), then the eclipse-mosquitto image.
PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)
FALLBACK_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"


# --- ops accounts' dynamic-security hashes --------------------------------------------------


def ops_hashes_file(data_dir: Path) -> Path:
    return data_dir / OPS_HASHES_FILE


def read_ops_hashes(data_dir: Path) -> dict[str, mc.PasswordHash]:
    path = ops_hashes_file(data_dir)
    if not path.exists():
        return {}
    users = json.loads(path.read_text())["users"]
    return {str(name): mc.PasswordHash.from_json(value) for name, value in users.items()}


def _write_ops_hashes(data_dir: Path, users: dict[str, mc.PasswordHash]) -> None:
    document = {"users": {name: users[name].to_json() for name in sorted(users)}}
    keyfiles.write_private(ops_hashes_file(data_dir), json.dumps(document, indent=2).encode() + b"\n")


def ops_user_created(settings: Settings, name: str, password: str) -> str:
    """Record the new ops account for Mosquitto; in external mode add it to the running one too.

    Returns a line for the operator saying where the account works on Mosquitto.
    """
    users = read_ops_hashes(settings.data_dir)
    users[name] = mc.hash_password(password)
    _write_ops_hashes(settings.data_dir, users)
    if not dynsec.uses_dynsec(settings):
        return ""
    try:
        dynsec.put_ops_user_on_mosquitto(settings, name, password)
    except MirrorError as exc:
        return f"not added to Mosquitto now ({exc}); re-run `provbridge mosquitto-config` and restart it"
    return "added to the running Mosquitto"


def ops_user_deleted(settings: Settings, name: str) -> str:
    users = read_ops_hashes(settings.data_dir)
    if users.pop(name, None) is not None:
        _write_ops_hashes(settings.data_dir, users)
    if not dynsec.uses_dynsec(settings):
        return ""
    try:
        dynsec.delete_ops_user_on_mosquitto(settings, name)
    except MirrorError as exc:
        return f"not removed from Mosquitto now ({exc}); re-run `provbridge mosquitto-config` and restart it"
    return "removed from the running Mosquitto"


# --- the config files -----------------------------------------------------------------------


def find_dynsec_plugin() -> str | None:
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


@dataclass
class GeneratedConfig:
    outdir: Path
    conf_file: Path
    plugin: str
    plugin_found: bool
    listeners: list[str]
    ops_users: list[str]
    ops_missing: list[str]  # in ops_users.json but with no dynamic-security hash: re-create them
    devices_kept: int  # mirrored device clients carried over from an existing dynamic-security.json
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _copy_tls(settings: Settings, outdir: Path, broker_dir: str) -> mc.TlsListener | None:
    if not tls.tls_offered(settings):
        return None
    files = tls.TlsFiles.of(settings.data_dir)
    for path in (files.server_cert, files.server_key, files.ca_cert):
        if not path.is_file():
            raise ConfigError(f"TLS is on but {path} is missing: run `provbridge tls init` first")
    # Copied, so that OUTDIR is all Mosquitto needs to see (a container mounts just that directory).
    shutil.copyfile(files.ca_cert, outdir / "ca.pem")
    shutil.copyfile(files.server_cert, outdir / "server.pem")
    keyfiles.write_private(outdir / "server.key", files.server_key.read_bytes())
    return mc.TlsListener(
        port=settings.broker.tls_port,
        cafile=f"{broker_dir}/ca.pem",
        certfile=f"{broker_dir}/server.pem",
        keyfile=f"{broker_dir}/server.key",
    )


def _copy_device_ca(
    settings: Settings, outdir: Path, broker_dir: str, tls_listener: mc.TlsListener | None
) -> mc.CertificateListener | None:
    """The device-certificate listener (`certificate_listener_enabled`), with the TLS listener's certificate."""
    if not tls.certificate_listener_enabled(settings):
        return None
    broker = settings.broker
    if broker.mosquitto_auth != "jwt":
        raise ConfigError(
            'broker.certificate_listen is on but broker.mosquitto_auth is "dynsec": device certificates are'
            ' read by the provbridge_jwt plugin (broker.mosquitto_auth = "jwt")'
        )
    device_ca = tls.TlsFiles.of(settings.data_dir).device_ca_cert
    if tls_listener is None or not device_ca.is_file():
        raise ConfigError(f"broker.certificate_listen is on but TLS is off or {device_ca} is missing")
    if broker.certificate_port in (broker.port, broker.tls_port):
        raise ConfigError(f"broker.certificate_port {broker.certificate_port} is also the plain or TLS port")
    shutil.copyfile(device_ca, outdir / "device-ca.pem")
    return mc.CertificateListener(
        port=broker.certificate_port,
        cafile=f"{broker_dir}/device-ca.pem",  # the device CA only: a server-CA certificate is no device's
        certfile=tls_listener.certfile,
        keyfile=tls_listener.keyfile,
    )


def write_mosquitto_config(
    settings: Settings,
    outdir: Path,
    *,
    broker_dir: str | None = None,
    user: str | None = None,
    plugin: str | None = None,
    bind: str | None = None,
) -> GeneratedConfig:
    """Write a working Mosquitto configuration for these settings into `outdir`.

    `broker_dir`: where Mosquitto sees `outdir` (default: its absolute path). `user`: whom Mosquitto
    runs as when started as root (default: whoever runs this, who owns the files; as root with
    another user the files are handed to that user). `bind`: the listen address (default broker.host).
    Re-running keeps the device clients the bridge mirrored since; stop Mosquitto first, since it
    rewrites dynamic-security.json from memory on every change.
    """
    if not keyfiles.is_initialised(settings.data_dir):
        raise NotInitialised(f"{settings.data_dir} is not initialised: run `provbridge init` first")
    outdir = outdir.absolute()
    outdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    seen_dir = (broker_dir or str(outdir)).rstrip("/") or "/"
    found = find_dynsec_plugin()
    plugin_path = plugin or found or FALLBACK_PLUGIN
    broker = settings.broker

    ops_sha = keyfiles.read_ops_users(settings.data_dir)
    ops_hashes = read_ops_hashes(settings.data_dir)
    accounts = mc.DynsecAccounts(
        prefix=settings.topic_prefix,
        bridge_username=broker.username,
        bridge_password=mc.hash_password(keyfiles.read_secret(settings.bridge_secret_file)),
        provision_password=mc.hash_password(mc.PROVISION_PASSWORD),
        ops_users={name: ops_hashes[name] for name in ops_sha if name in ops_hashes},
        allow_anonymous=broker.allow_anonymous_provisioning,
    )
    state = mc.dynsec_config(accounts)
    dynsec_path = outdir / mc.DYNSEC_FILE
    devices_kept = 0
    if dynsec_path.exists():
        try:
            existing = json.loads(dynsec_path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{dynsec_path} is not JSON ({exc}): move it away to start afresh") from exc
        state = mc.carry_over_devices(state, existing)
        devices_kept = sum(1 for c in state["clients"] if mc.is_device_client(c))

    tls_listener = _copy_tls(settings, outdir, seen_dir)
    plain_port = broker.port if broker.plain_listen or tls_listener is None else None
    certificates = _copy_device_ca(settings, outdir, seen_dir, tls_listener)
    jwt = _jwt_plugin(settings) if broker.mosquitto_auth == "jwt" else None
    conf = mc.ConfSettings(
        bind=bind or broker.host,
        port=plain_port,
        tls=tls_listener,
        broker_dir=seen_dir,
        plugin=plugin_path,
        allow_anonymous=broker.allow_anonymous_provisioning,
        user=user or _current_user(),
        jwt=jwt,
        certificates=certificates,
        max_packet_size=broker.max_packet_bytes,
    )
    conf_path = outdir / mc.CONF_FILE
    acl_path = outdir / mc.ACL_FILE
    keyfiles.write_private(dynsec_path, json.dumps(state, indent=2).encode() + b"\n")
    keyfiles.write_public(acl_path, mc.acl_file_text(settings.topic_prefix).encode())
    keyfiles.write_public(conf_path, mc.mosquitto_conf_text(conf).encode())

    files = [conf_path, dynsec_path, acl_path]
    if tls_listener is not None:
        files += [outdir / "ca.pem", outdir / "server.pem", outdir / "server.key"]
    if certificates is not None:
        files.append(outdir / "device-ca.pem")
    result = GeneratedConfig(
        outdir=outdir,
        conf_file=conf_path,
        plugin=plugin_path,
        plugin_found=plugin is not None or found is not None,
        listeners=[f"mqtt {conf.bind}:{plain_port}"] if plain_port is not None else [],
        ops_users=sorted(accounts.ops_users),
        ops_missing=sorted(set(ops_sha) - set(ops_hashes)),
        devices_kept=devices_kept,
        files=files,
    )
    if tls_listener is not None:
        result.listeners.append(f"mqtts {conf.bind}:{tls_listener.port}")
    if certificates is not None:
        result.listeners.append(f"mqtts {conf.bind}:{certificates.port} (device certificates)")
    if user and user != _current_user():
        _hand_over(outdir, files, user, result)
    if jwt is not None:
        result.notes.append(
            f"device tokens are verified in Mosquitto by {jwt.plugin}, which reads {jwt.jwks_file} and "
            f"{jwt.denylist_file}: Mosquitto must see them at those paths"
        )
    if not result.plugin_found:
        result.notes.append(f"dynamic-security plugin not found here; the config names {plugin_path} (--plugin)")
    return result


def _jwt_plugin(settings: Settings) -> mc.JwtPlugin:
    """The provbridge_jwt plugin lines: built here when needed, reading the data dir's JWKS and denylist."""
    data_dir = settings.data_dir.absolute()
    if mosquitto_jwt.is_device_id(settings.broker.username):
        raise ConfigError("broker.username looks like a device id: the jwt plugin would take it for a device")
    publish_rate, publish_burst = _publish_limit(settings)
    try:
        plugin = mosquitto_jwt.find_or_build_plugin()
    except BrokerConfigError as exc:
        raise ConfigError(
            f"{exc}. Mosquitto verifies device tokens with this plugin by default (broker.mosquitto_auth ="
            ' "jwt"); a small fleet (under 150 devices holding a token) may instead opt in to mirroring every'
            ' token into dynamic security: broker.mosquitto_auth = "dynsec" (README, External Mosquitto)'
        ) from exc
    return mc.JwtPlugin(
        plugin=str(plugin),
        jwks_file=str(data_dir / JWKS_FILE_NAME),
        denylist_file=str(data_dir / DENYLIST_FILE_NAME),
        audience=settings.token.audience,
        issuer=settings.token.issuer,
        bridge_username=settings.broker.username,
        publish_rate=publish_rate,
        publish_burst=publish_burst,
        topic_prefix=settings.topic_prefix,  # device presence, published by the plugin
    )


# The jwt plugin's per-client-id publish limit, as a multiple of the bridge's own (claims.rate_client_*):
# looser, so that a client beyond the bridge's limit is still answered rate_limited before Mosquitto
# starts dropping its publishes. Off when the bridge's limit is.
PUBLISH_LIMIT_FACTOR = 2


def _publish_limit(settings: Settings) -> tuple[float, int]:
    """(publishes a second, burst) per client id in the jwt plugin; (0, 0): no limit there."""
    claims = settings.claims
    if not claims.rate_limits or claims.rate_client_per_second <= 0:
        return 0.0, 0
    return PUBLISH_LIMIT_FACTOR * claims.rate_client_per_second, PUBLISH_LIMIT_FACTOR * claims.rate_client_burst


def _hand_over(outdir: Path, files: list[Path], user: str, result: GeneratedConfig) -> None:
    """Give the files to the user Mosquitto runs as, when we may (as root, and the user exists here)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        result.notes.append(f"no user {user!r} here: make {outdir} and its files owned by it where Mosquitto runs")
        return
    if os.geteuid() != 0:
        result.notes.append(f"not root: chown -R {user} {outdir} before starting Mosquitto")
        return
    for path in [outdir, *files]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
