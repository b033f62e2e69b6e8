"""The device CA: X.509 client certificates for devices, with their topic scope inside.

A device sends a PKCS#10 CSR for its P-256 key; the bridge signs it with the device CA. The broker
(Mosquitto: `require_certificate`, `use_identity_as_username`) takes the certificate's CN, the device id,
as the MQTT username, and the provbridge plugin reads the device's scope from the certificate itself.

Files, under <data_dir>/tls/:

    device-ca.pem   the device CA certificate: public, the broker's `cafile` for device certificates
    device-ca.key   its private key (0600, PKCS#8 PEM, P-256): needed online, at every claim

The device CA is not the server CA of `bridge.tls.certificates`, on purpose:

* a device certificate must never be able to act as a server certificate. Devices trust the server CA
  to tell them which broker is real, and many embedded TLS stacks do not check extendedKeyUsage: were
  device certificates signed by that CA, any device's key and certificate could impersonate the broker
  to every other device;
* rotating one must not touch the other: a new server CA means re-flashing devices' trust anchor, a
  new device CA means re-issuing device certificates, and neither should force the other;
* the server CA's key can stay offline between renewals, the device CA's key cannot.

Pure functions over data (`new_device_ca`, `parse_csr`, `sign_device_certificate`, `scope_of`, `chain_pem`,
`verify_device_certificate`); file I/O only in `create_device_ca` and `load_device_ca`.
"""

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.errors import ConfigError, InvalidCertificate, InvalidCsr, NotInitialised, UsageError
from bridge.storage import keyfiles
from bridge.storage.filelock import locked
from bridge.tls.certificates import key_usage, self_signed_ca
from broker.certificates import SCOPE_OID, DeviceScope, utf8string
from broker.certificates import scope_of as scope_of  # re-exported; in broker/ so the broker can read scopes
from provwire import crypto, topics

CA_VALIDITY = timedelta(days=10 * 365)
# Devices and brokers with a clock a little behind must not see a certificate "from the future".
CLOCK_SKEW = timedelta(seconds=60)
MIN_VALIDITY_SECONDS = 60
# There is no CRL: a certificate is good until it expires (unless the plugin's denylist refuses its CN),
# so at most about a year, the CA/Browser Forum limit, bounds what a leaked device key is worth.
MAX_VALIDITY_SECONDS = 397 * 24 * 3600
MAX_CSR_BYTES = 4096
# X.509's upper bound for CN and OU (RFC 5280, ub-common-name, ub-organizational-unit-name).
MAX_NAME_CHARS = 64

# RFC 7468's strict form: one block, base64 lines, nothing but whitespace around it.
_PEM_CSR = re.compile(
    rb"\s*-----BEGIN CERTIFICATE REQUEST-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END CERTIFICATE REQUEST-----\s*"
)


@dataclass(frozen=True)
class DeviceCa:
    """The device CA's certificate and private key. The key is kept out of repr() so it is never logged."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)


@dataclass(frozen=True)
class DeviceCaFiles:
    cert: Path
    key: Path

    @classmethod
    def of(cls, data_dir: Path) -> "DeviceCaFiles":
        directory = data_dir / "tls"
        return cls(directory / "device-ca.pem", directory / "device-ca.key")


# --- the CA -----------------------------------------------------------------------------------


def new_device_ca(now: datetime) -> DeviceCa:
    """A device CA (EC P-256) that signs device certificates only: CA:true, path length 0."""
    key = ec.generate_private_key(ec.SECP256R1())
    # The key's kid in the name keeps two installations' device CAs apart, and tells which key it is.
    name = f"provbridge device CA {crypto.key_id(key.public_key())}"
    return DeviceCa(self_signed_ca(key, name, now - CLOCK_SKEW, now + CA_VALIDITY), key)


def create_device_ca(data_dir: Path, now: datetime) -> DeviceCa:
    """The device CA of `data_dir`: created when device-ca.pem is missing, else the one on disk, never replaced.

    Replacing it would cut off every device holding a certificate it signed, so that is never done here.
    """
    files = DeviceCaFiles.of(data_dir)
    # Two processes starting at once must not each create a CA, one then signing with a CA nobody trusts.
    with locked(files.cert.with_name("device-ca.lock")):
        if files.cert.exists():
            return load_device_ca(data_dir)
        # device-ca.key without device-ca.pem is an interrupted create: no broker trusts that CA yet.
        ca = new_device_ca(now)
        # Key first, certificate second: a certificate on disk always has its key beside it.
        keyfiles.write_private(
            files.key,
            ca.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        keyfiles.write_public(files.cert, ca.certificate.public_bytes(serialization.Encoding.PEM))
        return ca


def load_device_ca(data_dir: Path) -> DeviceCa:
    """The device CA on disk, checked: a P-256 key that belongs to the certificate (NotInitialised if none)."""
    files = DeviceCaFiles.of(data_dir)
    if not files.cert.exists():
        raise NotInitialised(f"no device CA in {files.cert.parent} ({files.cert.name} missing)")
    if not files.key.exists():
        raise ConfigError(f"{files.key} is missing: it is needed to sign device certificates; restore it")
    try:
        certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{files.cert} is not a PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{files.key} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{files.key} is not a P-256 private key")
    if certificate.public_key() != key.public_key():
        raise ConfigError(f"{files.key} does not belong to {files.cert}")
    return DeviceCa(certificate, key)


# --- CSRs -------------------------------------------------------------------------------------


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A device's PKCS#10 CSR, PEM or DER, for a P-256 key it proves it holds (InvalidCsr otherwise).

    Only the key and its proof of possession are used: the subject and any requested extensions are
    ignored, the bridge decides what the certificate says (`sign_device_certificate`).
    """
    if not data:
        raise InvalidCsr("CSR is empty")
    if len(data) > MAX_CSR_BYTES:
        raise InvalidCsr(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    der = _der_of(data)
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise InvalidCsr("CSR is not a PKCS#10 request (PEM or DER)") from exc
    _device_key(csr)
    return csr


def _der_of(data: bytes) -> bytes:
    if not data.lstrip().startswith(b"-----BEGIN"):
        return data
    match = _PEM_CSR.fullmatch(data)
    if match is None:
        # cryptography's own PEM loader skips text around the block: such a CSR is refused here instead.
        if _PEM_CSR.match(data) is not None:
            raise InvalidCsr("CSR PEM has data after its END line")
        raise InvalidCsr("CSR PEM is not one CERTIFICATE REQUEST block")
    try:
        return base64.b64decode(re.sub(rb"\s", b"", match.group(1)), validate=True)
    except binascii.Error as exc:
        raise InvalidCsr("CSR PEM body is not base64") from exc


def _device_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's key, when it is P-256 and the CSR's self-signature verifies with it (InvalidCsr otherwise)."""
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise InvalidCsr("CSR key is of an unsupported type, not P-256") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidCsr(f"CSR key is {type(key).__name__.removesuffix('PublicKey')}, not P-256")
    if not isinstance(key.curve, ec.SECP256R1):
        raise InvalidCsr(f"CSR key is on {key.curve.name}, not P-256")
    if not crypto.csr_signature_valid(csr):  # remembered: the claim's parse has usually checked it already
        raise InvalidCsr("CSR signature does not verify: no proof of possession of the key")
    return key


# --- device certificates ------------------------------------------------------------------------


def sign_device_certificate(
    ca: DeviceCa,
    csr: x509.CertificateSigningRequest,
    *,
    device_id: str,
    tenant: str,
    scope: DeviceScope,
    not_before: datetime,
    validity_seconds: int,
    serial: int,
) -> x509.Certificate:
    """A client certificate (clientAuth only) for the CSR's key: CN = device_id, O = provbridge, OU = tenant.

    Nothing but the key comes from the CSR. `serial` is the caller's (`x509.random_serial_number()`), so
    this stays a function of its arguments. The certificate never outlives the CA.
    """
    if not MIN_VALIDITY_SECONDS <= validity_seconds <= MAX_VALIDITY_SECONDS:
        raise UsageError(
            f"validity_seconds must be {MIN_VALIDITY_SECONDS} to {MAX_VALIDITY_SECONDS} (397 days),"
            f" not {validity_seconds}"
        )
    for what, value in (("device_id", device_id), ("tenant", tenant)):
        if not 1 <= len(value) <= MAX_NAME_CHARS:
            raise UsageError(f"{what} must be 1 to {MAX_NAME_CHARS} characters in a certificate")
    for topic_filter in (*scope.publish, *scope.subscribe):
        if not topics.is_valid_filter(topic_filter):
            raise UsageError(f"{topic_filter!r} is not a topic filter")
    key = _device_key(csr)  # again: a CSR that did not come through parse_csr is never signed
    not_after = min(not_before + timedelta(seconds=validity_seconds), ca.certificate.not_valid_after_utc)
    if not_after <= not_before:
        raise ConfigError(f"the device CA expired on {ca.certificate.not_valid_after_utc}: it must be replaced")
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "provbridge"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, tenant),
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(not_before - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.UnrecognizedExtension(SCOPE_OID, _scope_value(scope)), critical=False)
        # RFC 6979: the signature needs no randomness at signing time, and the test vectors are reproducible.
        .sign(ca.key, hashes.SHA256(), ecdsa_deterministic=True)
    )


def _scope_value(scope: DeviceScope) -> bytes:
    # A UTF8String of compact JSON, the token's `acl` claim format: the plugin (C) unwraps it with OpenSSL's
    # d2i_ASN1_UTF8STRING and parses it with cJSON, which it links already for tokens; an ASN.1 structure of
    # its own would need a hand-written DER parser there.
    return utf8string(
        json.dumps(
            {"pub": list(scope.publish), "sub": list(scope.subscribe)}, separators=(",", ":"), ensure_ascii=False
        )
    )


def chain_pem(cert: x509.Certificate, ca: DeviceCa) -> str:
    """The device certificate, then the CA's, PEM: what the device presents in its TLS handshake."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, ca.certificate)).decode("ascii")


def verify_device_certificate(ca_cert: x509.Certificate, cert: x509.Certificate, now: datetime) -> None:
    """Whether `cert` is a device certificate of this CA, valid at `now` (InvalidCertificate if not).

    What the broker's TLS layer checks: issuer, signature, both validity windows, clientAuth.
    """
    if cert.issuer != ca_cert.subject:
        raise InvalidCertificate("certificate was not issued by this device CA")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InvalidCertificate("certificate signature does not verify with the device CA") from exc
    for what, checked in (("certificate", cert), ("device CA", ca_cert)):
        if now < checked.not_valid_before_utc:
            raise InvalidCertificate(f"{what} is not valid before {checked.not_valid_before_utc}")
        if now > checked.not_valid_after_utc:
            raise InvalidCertificate(f"{what} expired on {checked.not_valid_after_utc}")
    try:
        client = ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        client = False  # stricter than RFC 5280 (no EKU: any use): every device certificate states its use
    if not client:
        raise InvalidCertificate("certificate is not for client authentication")


class DeviceCaSource:
    """The device CA of a data directory, read from disk at its first use and kept: claims and refreshes of
    token devices never need it, and a CA created after the bridge started (`provbridge key create
    --credential certificate`) is found at the first certificate claim."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._ca: DeviceCa | None = None

    def get(self) -> DeviceCa:
        """The device CA (NotInitialised when there is none, ConfigError when its files are unusable)."""
        if self._ca is None:
            self._ca = load_device_ca(self.data_dir)
        return self._ca
