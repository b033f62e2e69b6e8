"""Device certificates as the broker reads them: who the device is (CN) and its topic scope (an extension).

A device provisioned with the certificate credential type holds an X.509 client certificate signed by the
device CA (bridge/tls/device_ca.py signs them): CN = device id, OU = tenant, O = provbridge, and a
non-critical extension, `SCOPE_OID`, whose value is a DER UTF8String of compact JSON
`{"pub": [filters], "sub": [filters]}` (the token's `acl` claim, in the certificate).

The TLS layer has verified the chain to the device CA, the validity window and clientAuth before anything
here runs; this module reads what the certificate grants. Everything that is not exactly that shape is
refused, never read leniently: the extension missing or present twice, a value that is not a minimal DER
UTF8String of strict UTF-8, not JSON, a member twice (parsers disagree on which copy wins: cJSON, in the
Mosquitto plugin, keeps the first, Python the last), other members, or filters that are not topic filters.
The provbridge_jwt plugin (bridge/mosquitto/jwt/provbridge_jwt.c) applies the same rules, with the same
reasons; tests/test_jwt_plugin_differential.py compares them.

Here and not in bridge/tls so that the broker, which imports nothing of the bridge, can use it.
"""

import json
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.errors import ConnectRefused, InvalidCertificate
from provwire import topics

# The device's scope, as a non-critical extension: a verifier that does not know it (OpenSSL in the
# TLS handshake) must still accept the certificate, and only our plugin acts on it. The OID is under
# the 2.25 arc (ITU-T X.667: a UUID as an OID, no registration), UUID 0d842bce-9a96-4637-9e2a-69df30c38cc4.
SCOPE_OID = x509.ObjectIdentifier("2.25.17966235642987300532048389404304313540")
# The device ids the bridge issues (as the plugin's is_device_id): a certificate CN must be one.
DEVICE_ID_RE = re.compile(r"dev_[a-z2-7]{26}")
_UTF8STRING_TAG = 0x0C

NO_SCOPE = "certificate has no scope extension"
NOT_A_FILTER = "scope extension holds a string that is not a topic filter"


@dataclass(frozen=True)
class DeviceScope:
    """The topic filters a device may publish to and subscribe to, already filled in (`fill_scope`)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True)
class CertificateDevice:
    """What a verified device certificate grants: the device, its scope, and until when (notAfter, unix seconds)."""

    device_id: str
    scope: DeviceScope
    not_after: int
    serial: str  # lowercase hex, as the denylist lists it (broker/denylist.py)


def is_device_id(value: str) -> bool:
    return DEVICE_ID_RE.fullmatch(value) is not None


def utf8string(text: str) -> bytes:
    """`text` as a DER UTF8String (minimal length). Written by hand: cryptography has no stable DER API
    for a bare value (hazmat.asn1 is 47+ and unstable)."""
    body = text.encode("utf-8")
    size = len(body)
    if size < 0x80:
        length = bytes([size])
    else:
        digits = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(digits)]) + digits
    return bytes([_UTF8STRING_TAG]) + length + body


def _text_of_utf8string(der: bytes) -> str:
    if len(der) < 2 or der[0] != _UTF8STRING_TAG:
        raise InvalidCertificate("scope extension is not a DER UTF8String")
    start = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    try:
        text = der[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCertificate("scope extension is not a DER UTF8String") from exc
    if utf8string(text) != der:  # a wrong or non-minimal length, or bytes after the value
        raise InvalidCertificate("scope extension is not a DER UTF8String")
    return text


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # JSON parsers disagree on which copy of a member wins (cJSON the first, Python the last).
    if len({name for name, _ in pairs}) != len(pairs):
        raise InvalidCertificate("scope extension has a member twice")
    return dict(pairs)


def scope_of_value(der: bytes) -> DeviceScope:
    """The scope in the extension's value (the DER inside its OCTET STRING); InvalidCertificate if malformed."""
    text = _text_of_utf8string(der)
    try:
        members = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except (ValueError, RecursionError) as exc:  # nesting beyond Python's stack is no scope either
        raise InvalidCertificate("scope extension is not JSON") from exc
    if not (
        isinstance(members, dict)
        and members.keys() == {"pub", "sub"}
        and all(isinstance(filters, list) and all(isinstance(f, str) for f in filters) for filters in members.values())
    ):
        raise InvalidCertificate('scope extension is not {"pub": [strings], "sub": [strings]}')
    return DeviceScope(publish=tuple(members["pub"]), subscribe=tuple(members["sub"]))


def scope_of(cert: x509.Certificate) -> DeviceScope | None:
    """The scope a device certificate carries; None when it has none; InvalidCertificate when it is malformed."""
    try:
        extension = cert.extensions.get_extension_for_oid(SCOPE_OID)
    except x509.ExtensionNotFound:
        return None
    except x509.DuplicateExtension as exc:
        raise InvalidCertificate("certificate has the scope extension twice") from exc
    value = extension.value
    assert isinstance(value, x509.UnrecognizedExtension)  # cryptography knows no class for a private OID
    return scope_of_value(value.value)


def checked_scope(scope: DeviceScope | None) -> DeviceScope:
    """A scope the broker can enforce: present, and every string a topic filter (InvalidCertificate if not).

    Fail closed: a certificate without a scope grants nothing, so it is refused rather than let in deaf.
    """
    if scope is None:
        raise InvalidCertificate(NO_SCOPE)
    if not all(topics.is_valid_filter(f) for f in (*scope.publish, *scope.subscribe)):
        raise InvalidCertificate(NOT_A_FILTER)
    return scope


def certificate_device(der: bytes, *, username: str | None, client_id: str, now: datetime) -> CertificateDevice:
    """The device a CONNECT over a verified client certificate (`der`) is, or ConnectRefused saying why.

    CN = username = client id = a device id; the scope extension well formed; notAfter still ahead (a
    session outliving it is ended by the grant's expiry). The denylist is the caller's (broker/auth.py).
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise ConnectRefused("client certificate is unreadable") from exc
    common_name = names[0].value if len(names) == 1 else None
    if not isinstance(common_name, str) or not is_device_id(common_name):
        raise ConnectRefused("certificate CN is not one device id")
    if username != common_name:
        raise ConnectRefused("username must equal the certificate's CN (the device id)")
    if client_id != common_name:
        raise ConnectRefused("client id must equal the device id")
    try:
        scope = checked_scope(scope_of(cert))
    except InvalidCertificate as exc:
        raise ConnectRefused(str(exc)) from exc
    not_after = int(cert.not_valid_after_utc.timestamp())
    if now.timestamp() >= not_after:
        raise ConnectRefused("certificate expired")
    return CertificateDevice(common_name, scope, not_after, format(cert.serial_number, "x"))
