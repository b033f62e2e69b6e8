"""TLS for the broker: a private CA, the broker's server certificate, and who uses which port.

Files, under <data_dir>/tls/ (the names are a contract: `provbridge mosquitto-config` reads them too):

    ca.pem      the private CA certificate: public, devices pin it (burn it into firmware)
    ca.key      the CA private key (0600): only needed to issue or renew server certificates
    server.pem  the broker's certificate, signed by the CA
    server.key  its private key (0600)

Three layers, kept apart so each is testable on its own:

1. pure generation (`new_ca`, `new_server_certificate`, `subject_alt_names`): no I/O;
2. files (`ensure_tls`, `tls_status`): create, keep or renew the files, idempotently;
3. runtime rules (`tls_offered`, `resolve`, `bridge_endpoint`, `device_endpoint`): from settings
   to "does the broker listen on TLS", "how does the bridge connect", "what are devices told".
"""

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.config import Settings
from bridge.errors import ConfigError, NotInitialised, UsageError
from bridge.storage import keyfiles

log = logging.getLogger("provbridge.tls")

# The CA outlives the devices that pin it: replacing it means re-flashing every device's trust.
CA_VALIDITY = timedelta(days=20 * 365)
# The server certificate is renewed in place (`provbridge tls init --force`) under the same CA,
# invisibly to devices; about a year keeps a leaked key's damage bounded. 397 days is also the most
# that clients enforcing the CA/Browser Forum limit accept.
SERVER_VALIDITY = timedelta(days=397)
# Devices with a slow or freshly set clock must not see a certificate "from the future".
BACKDATE = timedelta(minutes=5)
RENEW_WARNING = timedelta(days=30)

# Always in the server certificate: a client on the broker's own host may use any of these.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME_RE = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?")


# --- 1. pure generation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key. The key is kept out of repr() so it is never logged."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)


def general_name(name: str) -> x509.GeneralName:
    """A SAN entry: an IP address when `name` is one, else a DNS name (UsageError if neither)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > 253 or _DNS_NAME_RE.fullmatch(name) is None:
        raise UsageError(f"{name!r} is neither an IP address nor a DNS name (use the ASCII/punycode form)")
    return x509.DNSName(name.rstrip(".").lower())


def _merge(names: Iterable[str]) -> list[str]:
    """Names without duplicates (127.0.0.1 and a differently written same address count once), in order."""
    seen: set[x509.GeneralName] = set()
    merged = []
    for name in names:
        entry = general_name(name)
        if entry not in seen:
            seen.add(entry)
            merged.append(name)
    return merged


def _is_unspecified(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False


def subject_alt_names(settings: Settings, extra: Iterable[str] = ()) -> list[str]:
    """The names the server certificate covers: loopback, broker.host, broker.advertise_host, `extra`.

    A listen-everywhere host (0.0.0.0, ::) names no address a client can dial, so it is left out.
    """
    broker = settings.broker
    candidates = [*LOOPBACK_NAMES, broker.host, broker.advertise_host or "", *extra]
    return _merge(name.strip() for name in candidates if name.strip() and not _is_unspecified(name.strip()))


def new_ca(now: datetime, validity: timedelta = CA_VALIDITY) -> Issued:
    """A private CA (EC P-256) that may sign server certificates only: CA:true, path length 0."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix keeps two installations' CAs apart in a trust store that looks CAs up by name.
    suffix = x509.random_serial_number().to_bytes(20, "big")[-4:].hex()
    return Issued(self_signed_ca(key, f"provbridge CA {suffix}", now - BACKDATE, now + validity), key)


def self_signed_ca(
    key: ec.EllipticCurvePrivateKey, common_name: str, not_before: datetime, not_after: datetime
) -> x509.Certificate:
    """A CA certificate for `key` that may sign end-entity certificates only: CA:true, path length 0."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "provbridge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def new_server_certificate(
    ca: Issued, names: Sequence[str], now: datetime, validity: timedelta = SERVER_VALIDITY
) -> Issued:
    """A TLS server certificate (EC P-256, serverAuth) for `names`, signed by `ca`, never outliving it."""
    if not names:
        raise UsageError("a server certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + validity, ca.certificate.not_valid_after_utc)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([general_name(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(certificate, key)


def key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    """The keyUsage extension with only the named bits set (shared by the server and device CAs)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def san_names(certificate: x509.Certificate) -> list[str]:
    """The certificate's SANs as strings (DNS names and IP addresses)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as colon-separated hex (what `openssl x509 -fingerprint` prints)."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_key(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return certificate.public_key() == key.public_key()


# --- 2. files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    directory: Path

    @classmethod
    def of(cls, data_dir: Path) -> "TlsFiles":
        return cls(data_dir / "tls")

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def device_ca_cert(self) -> Path:
        """The device CA (bridge/tls/device_ca.py): the certificate listener trusts it, and only it."""
        return self.directory / "device-ca.pem"


@dataclass(frozen=True)
class TlsInitResult:
    """What `ensure_tls` did. `missing_names`: asked-for SANs the kept certificate lacks (renew to add)."""

    ca_created: bool
    server_created: bool
    ca_file: Path
    ca_fingerprint: str
    server_names: list[str]
    server_expires: datetime
    missing_names: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.ca_created or self.server_created


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate") from exc


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key")
    return key


def _ca_certificate(files: TlsFiles) -> x509.Certificate | None:
    # ca.key without ca.pem is an interrupted init: nobody can trust that CA yet, so it is replaced.
    return _load_certificate(files.ca_cert) if files.ca_cert.exists() else None


def _ca_signer(files: TlsFiles, certificate: x509.Certificate) -> Issued:
    """The CA with its key, needed only to issue: ca.key may live offline the rest of the time."""
    if not files.ca_key.exists():
        raise ConfigError(
            f"{files.ca_key} is missing (kept offline?): it is needed to issue a server certificate;"
            " put it back, or start over with --new-ca (devices must then be given the new ca.pem)"
        )
    ca = Issued(certificate, _load_key(files.ca_key))
    if not _same_key(ca.certificate, ca.key):
        raise ConfigError(f"{files.ca_key} does not belong to {files.ca_cert}")
    return ca


def _current_server(files: TlsFiles, ca_cert: x509.Certificate, force: bool) -> x509.Certificate | None:
    """The existing server certificate, when it is complete, matches its key and was issued by the CA."""
    if not (files.server_cert.exists() and files.server_key.exists()):
        return None
    certificate = _load_certificate(files.server_cert)
    if not _same_key(certificate, _load_key(files.server_key)):
        return None  # an interrupted renewal: nothing can have used this pair
    if not issued_by(certificate, ca_cert):
        if force:
            return None
        raise ConfigError(f"{files.server_cert} was not issued by {files.ca_cert}: re-issue it with --force")
    return certificate


def _names_on_disk(files: TlsFiles) -> list[str]:
    try:
        return san_names(_load_certificate(files.server_cert))
    except (OSError, ConfigError):
        return []


def _write(files: TlsFiles, issued: Issued, cert_path: Path, key_path: Path) -> None:
    # Key first, certificate second: a certificate on disk always has its key beside it.
    keyfiles.write_private(key_path, key_pem(issued.key))
    keyfiles.write_public(cert_path, certificate_pem(issued.certificate))


def ensure_tls(
    settings: Settings,
    extra_names: Sequence[str] = (),
    *,
    force: bool = False,
    replace_ca: bool = False,
    now: datetime | None = None,
) -> TlsInitResult:
    """Create what is missing of <data_dir>/tls; keep what is there.

    `force` re-issues the server certificate and key under the existing CA (renewal: devices notice
    nothing). `replace_ca` also replaces the CA, and with it every device's trust anchor.
    """
    if not keyfiles.is_initialised(settings.data_dir):
        raise NotInitialised(f"{settings.data_dir} is not initialised: run `provbridge init --tls`")
    now = now or datetime.now(UTC)
    names = subject_alt_names(settings, extra_names)
    files = TlsFiles.of(settings.data_dir)
    files.directory.mkdir(mode=0o700, exist_ok=True)

    ca_cert = None if replace_ca else _ca_certificate(files)
    if ca_cert is None and not replace_ca and files.server_cert.exists():
        # The CA is gone but its certificate still serves devices: a silent new CA would cut them all off.
        raise ConfigError(
            f"{files.server_cert} exists but its CA ({files.ca_cert}) does not: restore it,"
            " or start over with --new-ca (devices must then be given the new ca.pem)"
        )
    created_ca: Issued | None = None
    if ca_cert is None:
        created_ca = new_ca(now)
        _write(files, created_ca, files.ca_cert, files.ca_key)
        ca_cert = created_ca.certificate

    current = None if created_ca is not None else _current_server(files, ca_cert, force)
    server = None if force else current
    if server is None:
        signer = created_ca or _ca_signer(files, ca_cert)
        # A renewal keeps the names the current certificate has: `--force` alone renews it as it is.
        # (To drop a name, delete server.pem and server.key, then run `tls init`.)
        issued = new_server_certificate(signer, _merge([*names, *_names_on_disk(files)]), now)
        _write(files, issued, files.server_cert, files.server_key)
        server = issued.certificate
    have = {general_name(n) for n in san_names(server)}
    return TlsInitResult(
        ca_created=created_ca is not None,
        server_created=server is not current,
        ca_file=files.ca_cert,
        ca_fingerprint=fingerprint(ca_cert),
        server_names=san_names(server),
        server_expires=server.not_valid_after_utc,
        missing_names=[n for n in names if general_name(n) not in have],
    )


@dataclass(frozen=True)
class TlsStatus:
    """What `provbridge tls show` reports."""

    directory: Path
    ca_fingerprint: str
    ca_subject: str
    ca_expires: datetime
    ca_key_present: bool
    server_names: list[str]
    server_expires: datetime
    server_issued_by_ca: bool


def tls_status(data_dir: Path) -> TlsStatus:
    files = TlsFiles.of(data_dir)
    missing = [p.name for p in (files.ca_cert, files.server_cert, files.server_key) if not p.exists()]
    if missing:
        raise NotInitialised(
            f"no TLS files in {files.directory} ({', '.join(missing)} missing): run `provbridge tls init`"
        )
    ca, server = _load_certificate(files.ca_cert), _load_certificate(files.server_cert)
    return TlsStatus(
        directory=files.directory,
        ca_fingerprint=fingerprint(ca),
        ca_subject=ca.subject.rfc4514_string(),
        ca_expires=ca.not_valid_after_utc,
        ca_key_present=files.ca_key.exists(),
        server_names=san_names(server),
        server_expires=server.not_valid_after_utc,
        server_issued_by_ca=issued_by(server, ca),
    )


# --- 3. runtime rules -----------------------------------------------------------------------


def tls_offered(settings: Settings) -> bool:
    """Whether the broker listens on TLS at broker.tls_port.

    `on`/`off` say so; `auto` means "when the server certificate and key exist". In external mode the
    setting describes the external broker (`provbridge mosquitto-config` adds a TLS listener when the
    files exist, which is what `auto` assumes).
    """
    mode = settings.broker.tls_listen
    if mode != "auto":
        return mode == "on"
    files = TlsFiles.of(settings.data_dir)
    return files.server_cert.is_file() and files.server_key.is_file()


def certificate_listener_enabled(settings: Settings) -> bool:
    """Whether the broker listens at broker.certificate_port for devices with a device-CA client certificate.

    `on`/`off` say so; `auto` means "when the TLS listener is on (`tls_offered`: its server certificate is
    the one this listener presents) and the device CA exists". In external mode it describes the external
    broker, as `tls_offered` does (`provbridge mosquitto-config` adds the listener under the same rule).
    """
    broker = settings.broker
    if broker.certificate_listen != "auto":
        return broker.certificate_listen == "on"
    # Mosquitto's opt-in dynsec mode has no plugin to read certificates: `mosquitto-config` adds no listener.
    if broker.mode == "external" and broker.dynsec and broker.mosquitto_auth == "dynsec":
        return False
    return tls_offered(settings) and TlsFiles.of(settings.data_dir).device_ca_cert.is_file()


def _check_certificate_listener(settings: Settings) -> None:
    """A certificate listener needs the server certificate, the device CA, and a port of its own."""
    broker = settings.broker
    if not certificate_listener_enabled(settings):
        return
    files = TlsFiles.of(settings.data_dir)
    if not tls_offered(settings):
        raise ConfigError("broker.certificate_listen is on but TLS is off: it presents the TLS listener's certificate")
    for path in (files.server_cert, files.server_key, files.device_ca_cert):
        if not path.is_file():
            raise ConfigError(f"broker.certificate_listen is on but {path} is missing")
    if broker.certificate_port in (broker.port, broker.tls_port):
        raise ConfigError(f"broker.certificate_port {broker.certificate_port} is also the plain or TLS port")


def resolve(settings: Settings, now: datetime | None = None) -> Settings:
    """Settings with `tls_listen = "auto"` pinned to on/off, checked. Call once at start-up.

    Pinned so that what the broker listens on and what every claim tells devices cannot drift apart
    if the files appear (`provbridge tls init`) while the service runs: that takes a restart.
    """
    broker = settings.broker
    offered = tls_offered(settings)
    if broker.mode == "embedded":
        listeners = embedded_listeners(settings)  # refuses settings that leave no listener
        if broker.tls and not offered:
            raise ConfigError(
                "broker.tls = true but the embedded broker does not listen on TLS: run `provbridge tls init`"
            )
        if listeners.port == listeners.tls_port:
            raise ConfigError(f"broker.port and broker.tls_port are both {broker.port}")
        if listeners.cert_file is not None and listeners.key_file is not None:
            for path in (listeners.cert_file, listeners.key_file):
                if not path.is_file():
                    raise ConfigError(f"broker.tls_listen is on but {path} is missing: run `provbridge tls init`")
            _warn_on_expiry(_load_certificate(listeners.cert_file), now or datetime.now(UTC))
        _check_certificate_listener(settings)
    certificates = certificate_listener_enabled(settings)
    pinned = broker.model_copy(
        update={"tls_listen": "on" if offered else "off", "certificate_listen": "on" if certificates else "off"}
    )
    return settings.model_copy(update={"broker": pinned})


def _warn_on_expiry(certificate: x509.Certificate, now: datetime) -> None:
    expires = certificate.not_valid_after_utc
    renew = "run `provbridge tls init --force` and restart"
    if expires <= now:
        log.error("the broker's TLS certificate expired on %s, devices refuse it: %s", expires.date(), renew)
    elif expires - now <= RENEW_WARNING:
        log.warning("the broker's TLS certificate expires on %s: %s", expires.date(), renew)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool
    ca_file: Path | None = None  # None with tls: the system trust store


def bridge_endpoint(settings: Settings) -> Endpoint:
    """Where and how the bridge itself connects.

    Plain `host:port` by default (in embedded mode that is loopback inside one host; a listen-everywhere
    host becomes loopback). TLS when
    `broker.tls` is set, or when the embedded broker has no plain listener; then to `tls_port` if the
    broker offers TLS there, else to `port` (an external broker that is TLS on its main port).
    The CA is `broker.ca_file`, else the private CA's ca.pem when it exists, else the system's.
    """
    broker = settings.broker
    embedded = broker.mode == "embedded"
    host = broker.host
    if embedded and _is_unspecified(host):
        # Listening everywhere: the bridge, in the same process, uses loopback, a name the certificate has.
        host = "::1" if ":" in host else "127.0.0.1"
    if not (broker.tls or (embedded and not broker.plain_listen)):
        return Endpoint(host, broker.port, False)
    ca_file = broker.ca_file
    private_ca = TlsFiles.of(settings.data_dir).ca_cert
    if ca_file is None and private_ca.is_file():
        ca_file = private_ca
    return Endpoint(host, broker.tls_port if tls_offered(settings) else broker.port, True, ca_file)


def device_endpoint(settings: Settings) -> Endpoint:
    """What devices are told in their sealed credentials (`mqtt.host`, `mqtt.port`, `mqtt.tls`).

    Whenever the broker offers TLS, devices get TLS: `advertise_port` or `tls_port`, `tls: true`, even
    if a plain listener exists beside it (that one is for the bridge and legacy clients). Otherwise
    `advertise_port` or `port`, with `tls` = `broker.tls` (an external broker that is TLS on its port).
    """
    broker = settings.broker
    host = broker.advertise_host or broker.host
    if tls_offered(settings):
        return Endpoint(host, broker.advertise_port or broker.tls_port, True)
    return Endpoint(host, broker.advertise_port or broker.port, broker.tls)


@dataclass(frozen=True)
class Listeners:
    """The embedded broker's listeners: `port` (TLS itself when `tls_port` is None and a cert is set)."""

    port: int
    tls_port: int | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    certificate_port: int | None = None  # devices with a client certificate of `device_ca_file`
    device_ca_file: Path | None = None

    def describe(self, host: str) -> str:
        port = self.certificate_port
        certificates = "" if port is None else f", device certificates on {host}:{port}"
        if self.cert_file is None:
            return f"{host}:{self.port}"
        if self.tls_port is None:
            return f"{host}:{self.port} (TLS only){certificates}"
        return f"{host}:{self.port}, TLS on {host}:{self.tls_port}{certificates}"


def embedded_listeners(settings: Settings) -> Listeners:
    """Plain `port`, plus TLS `tls_port` when TLS is offered; TLS `tls_port` alone when plain_listen is off;
    and `certificate_port` when `certificate_listener_enabled`."""
    broker = settings.broker
    if not tls_offered(settings):
        if not broker.plain_listen:
            raise ConfigError("broker.plain_listen = false leaves no listener: TLS is off (run `provbridge tls init`)")
        return Listeners(broker.port)
    files = TlsFiles.of(settings.data_dir)
    certificates = certificate_listener_enabled(settings)
    certificate_port = broker.certificate_port if certificates else None
    device_ca = files.device_ca_cert if certificates else None
    if not broker.plain_listen:
        return Listeners(broker.tls_port, None, files.server_cert, files.server_key, certificate_port, device_ca)
    return Listeners(broker.port, broker.tls_port, files.server_cert, files.server_key, certificate_port, device_ca)
