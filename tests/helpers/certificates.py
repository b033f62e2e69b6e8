"""Device certificates for the broker tests: a device key, a CSR, the certificate the device CA signs for it
(`sign_device_certificate`, as the claim path does), written as PEM files for paho's `tls_set(certfile,
keyfile)`; and certificates `sign_device_certificate` never makes (another CA, no or a malformed scope)."""

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.tls.device_ca import DeviceCa, DeviceScope, sign_device_certificate
from broker.certificates import SCOPE_OID, utf8string


@dataclass(frozen=True)
class DeviceCertificate:
    device_id: str
    cert_file: Path
    key_file: Path
    not_after: datetime
    serial: int

    @property
    def files(self) -> tuple[Path, Path]:
        """(certificate, key): what `MqttClient(client_certificate=...)` takes."""
        return self.cert_file, self.key_file


def own_scope(device_id: str) -> DeviceScope:
    """The default profile's scope: the device's own topics."""
    return DeviceScope(publish=(f"devices/{device_id}/#",), subscribe=(f"devices/{device_id}/#",))


def _write(
    directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, device_id: str
) -> DeviceCertificate:
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{device_id}-{uuid.uuid4().hex[:8]}"
    cert_file, key_file = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return DeviceCertificate(device_id, cert_file, key_file, cert.not_valid_after_utc, cert.serial_number)


def issue(
    directory: Path, ca: DeviceCa, device_id: str, scope: DeviceScope | None = None, validity_seconds: int = 3600
) -> DeviceCertificate:
    """What a device gets on a certificate claim: its own key and CSR, signed by the device CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
        .sign(key, hashes.SHA256())
    )
    cert = sign_device_certificate(
        ca,
        csr,
        device_id=device_id,
        tenant="default",
        scope=scope or own_scope(device_id),
        not_before=datetime.now(UTC),
        validity_seconds=validity_seconds,
        serial=x509.random_serial_number(),
    )
    return _write(directory, cert, key, device_id)


def issue_raw(
    directory: Path,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    device_id: str,
    extensions: Iterable[tuple[x509.ExtensionType, bool]],
    not_after: datetime | None = None,
) -> DeviceCertificate:
    """A client certificate (clientAuth) for `device_id` with exactly `extensions`, signed by any issuer,
    valid for an hour unless `not_after` says otherwise."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(not_after or now + timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return _write(directory, builder.sign(issuer_key, hashes.SHA256()), key, device_id)


def scope_extension(value: bytes) -> tuple[x509.ExtensionType, bool]:
    """The scope extension with this raw value (a DER UTF8String when well formed), non-critical."""
    return x509.UnrecognizedExtension(SCOPE_OID, value), False


def scope_json(text: str) -> tuple[x509.ExtensionType, bool]:
    return scope_extension(utf8string(text))


def load_ca(cert_file: Path, key_file: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate and key from PEM files (the server CA of `provbridge tls init`)."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(cert_file.read_bytes()), key
