"""Issue 11 item 3, device certificates: the device CA, CSRs, signing, the scope extension, verification.

Real keys and certificates (cryptography), the real `openssl verify` when the binary is there; no mocks.
"""

import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, SignatureAlgorithmOID

from bridge.errors import ConfigError, InvalidCertificate, InvalidCsr, NotInitialised, UsageError
from bridge.tls.device_ca import (
    SCOPE_OID,
    DeviceCa,
    DeviceCaFiles,
    DeviceScope,
    chain_pem,
    create_device_ca,
    load_device_ca,
    new_device_ca,
    parse_csr,
    scope_of,
    sign_device_certificate,
    verify_device_certificate,
)
from provwire import crypto

NOW = datetime.now(UTC).replace(microsecond=0)  # X.509 times have whole seconds
DEVICE_ID = "dev_jbotvaaqmgtvezq4bk6zwul3eu"
SCOPE = DeviceScope(publish=(f"devices/{DEVICE_ID}/#",), subscribe=(f"devices/{DEVICE_ID}/#", "fleet/+/config"))
DAY = 24 * 3600


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> DeviceCa:
    return new_device_ca(NOW)


def build_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    common_name: str = "device",
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def p256_csr(
    common_name: str = "device", extensions: Iterable[tuple[x509.ExtensionType, bool]] = ()
) -> x509.CertificateSigningRequest:
    return build_csr(ec.generate_private_key(ec.SECP256R1()), common_name, extensions)


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def sign(ca: DeviceCa, csr: x509.CertificateSigningRequest, **overrides: object) -> x509.Certificate:
    arguments: dict[str, object] = {
        "device_id": DEVICE_ID,
        "tenant": "acme",
        "scope": SCOPE,
        "not_before": NOW,
        "validity_seconds": 30 * DAY,
        "serial": x509.random_serial_number(),
        **overrides,
    }
    return sign_device_certificate(ca, csr, **arguments)  # type: ignore[arg-type]


def raw_certificate(
    ca: DeviceCa, extensions: Iterable[tuple[x509.ExtensionType, bool]], not_after: datetime | None = None
) -> x509.Certificate:
    """A certificate signed by `ca` with exactly `extensions`: what sign_device_certificate never makes."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=1))
        .not_valid_after(not_after or NOW + timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(ca.key, hashes.SHA256())


def utf8string(text: str) -> bytes:
    """DER UTF8String, short form (X.690 8.1.3.4): tag 0x0C, one length byte, the UTF-8 bytes."""
    body = text.encode()
    assert len(body) < 0x80
    return bytes([0x0C, len(body)]) + body


def files_in(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- the CA -----------------------------------------------------------------------------------


def test_device_ca_is_created_once_with_its_extensions_and_loads_back_identical(tmp_path: Path) -> None:
    created = create_device_ca(tmp_path, NOW)
    files = DeviceCaFiles.of(tmp_path)
    assert (files.cert, files.key) == (tmp_path / "tls" / "device-ca.pem", tmp_path / "tls" / "device-ca.key")

    # The key: the owner's only, PKCS#8 PEM, P-256; the certificate public; the directory closed.
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert files.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert not stat.S_IMODE(files.cert.stat().st_mode) & 0o022
    assert stat.S_IMODE(files.cert.parent.stat().st_mode) == 0o700
    assert isinstance(created.key.curve, ec.SECP256R1)

    cert = created.certificate
    kid = crypto.key_id(created.key.public_key())
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"provbridge device CA {kid}"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert cert.not_valid_before_utc == NOW - timedelta(seconds=60)
    assert cert.not_valid_after_utc == NOW + timedelta(days=3650)
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256

    loaded = load_device_ca(tmp_path)
    assert loaded.certificate == cert
    assert loaded.key.private_numbers() == created.key.private_numbers()
    assert "key=" not in repr(loaded)  # never logged

    # Present: kept as it is, whatever time it is now.
    before = files_in(tmp_path)
    again = create_device_ca(tmp_path, NOW + timedelta(days=1))
    assert again.certificate == cert and again.key.private_numbers() == created.key.private_numbers()
    assert files_in(tmp_path) == before


def test_a_key_without_its_certificate_is_an_interrupted_create_and_is_replaced(tmp_path: Path) -> None:
    create_device_ca(tmp_path, NOW)
    files = DeviceCaFiles.of(tmp_path)
    lonely = files.key.read_bytes()
    files.cert.unlink()
    replaced = create_device_ca(tmp_path, NOW)
    assert files.key.read_bytes() != lonely
    assert load_device_ca(tmp_path).certificate == replaced.certificate


def test_loading_refuses_missing_or_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(NotInitialised, match="no device CA"):
        load_device_ca(tmp_path)
    create_device_ca(tmp_path, NOW)
    files = DeviceCaFiles.of(tmp_path)
    own_key = files.key.read_bytes()

    other = create_device_ca(tmp_path / "other", NOW)
    files.key.write_bytes(DeviceCaFiles.of(tmp_path / "other").key.read_bytes())
    with pytest.raises(ConfigError, match="does not belong"):
        load_device_ca(tmp_path)
    files.key.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match="not a P-256 private key"):
        load_device_ca(tmp_path)
    files.key.write_bytes(own_key)
    files.cert.write_bytes(b"not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_device_ca(tmp_path)
    files.key.unlink()
    with pytest.raises(ConfigError, match="is missing"):
        load_device_ca(tmp_path)
    assert load_device_ca(tmp_path / "other").certificate == other.certificate


# --- signing ----------------------------------------------------------------------------------


def test_a_certificate_says_what_the_bridge_decides_and_nothing_the_csr_asks(ca: DeviceCa) -> None:
    # The CSR asks for another name, a CA, a server's names and usages: it gets none of it.
    greedy = p256_csr(
        common_name="someone-else",
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.SubjectAlternativeName([x509.DNSName("broker.example.com")]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    csr = parse_csr(pem(greedy))
    serial = x509.random_serial_number()
    cert = sign(ca, csr, serial=serial)

    assert cert.subject == x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "provbridge"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "acme"),
            x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID),
        ]
    )
    assert cert.issuer == ca.certificate.subject
    assert cert.public_key() == csr.public_key()
    assert cert.serial_number == serial
    assert cert.not_valid_before_utc == NOW - timedelta(seconds=60)
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256

    extensions = {e.oid: e for e in cert.extensions}
    assert set(extensions) == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        SCOPE_OID,
    }
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert not extensions[SCOPE_OID].critical  # the TLS layer must accept what it does not know
    assert scope_of(cert) == SCOPE

    verify_device_certificate(ca.certificate, cert, NOW)
    # And cryptography's strict RFC 5280 path validation for a TLS client, but for its demand of a SAN:
    # a device certificate names its device in the CN, which Mosquitto takes as the username.
    leaf = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca.certificate]))
        .time(NOW)
        .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf)
        .build_client_verifier()
    )
    assert verifier.verify(cert, []).chain == [cert, ca.certificate]


def test_the_scope_is_compact_json_in_a_utf8string_and_round_trips(ca: DeviceCa) -> None:
    cert = sign(ca, p256_csr())
    raw = cert.extensions.get_extension_for_oid(SCOPE_OID).value
    assert isinstance(raw, x509.UnrecognizedExtension)
    expected = '{"pub":["devices/' + DEVICE_ID + '/#"],"sub":["devices/' + DEVICE_ID + '/#","fleet/+/config"]}'
    assert raw.value == utf8string(expected)

    # Long (two length bytes), non-ASCII as raw UTF-8, empty lists.
    wide = DeviceScope(publish=tuple(f"site/ü/{n}/#" for n in range(40)), subscribe=())
    wide_cert = sign(ca, p256_csr(), scope=wide)
    raw = wide_cert.extensions.get_extension_for_oid(SCOPE_OID).value
    assert isinstance(raw, x509.UnrecognizedExtension) and raw.value[:2] == b"\x0c\x82"
    assert "ü".encode() in raw.value
    assert scope_of(wide_cert) == wide
    assert scope_of(ca.certificate) is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
def test_openssl_accepts_the_chain_for_client_auth_only(ca: DeviceCa, tmp_path: Path) -> None:
    cert = sign(ca, parse_csr(der(p256_csr())))
    chain = chain_pem(cert, ca)
    assert x509.load_pem_x509_certificates(chain.encode()) == [cert, ca.certificate]
    (tmp_path / "ca.pem").write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "chain.pem").write_text(chain)

    def openssl_verify(purpose: str) -> subprocess.CompletedProcess[str]:
        command = ["openssl", "verify", "-x509_strict", "-CAfile", "ca.pem", "-purpose", purpose, "chain.pem"]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=10, check=False)

    client = openssl_verify("sslclient")
    assert client.returncode == 0 and client.stdout.strip() == "chain.pem: OK", client.stderr
    # A device certificate can never pass for a server's.
    assert openssl_verify("sslserver").returncode != 0


@pytest.mark.parametrize(
    ("validity_seconds", "allowed"),
    [(59, False), (60, True), (397 * DAY, True), (397 * DAY + 1, False), (-1, False)],
)
def test_validity_is_bounded(ca: DeviceCa, validity_seconds: int, allowed: bool) -> None:
    if allowed:
        cert = sign(ca, p256_csr(), validity_seconds=validity_seconds)
        assert cert.not_valid_after_utc == NOW + timedelta(seconds=validity_seconds)
    else:
        with pytest.raises(UsageError, match="validity_seconds must be 60 to 34300800"):
            sign(ca, p256_csr(), validity_seconds=validity_seconds)


def test_a_certificate_never_outlives_its_ca() -> None:
    ageing = new_device_ca(NOW - timedelta(days=3650) + timedelta(days=1))
    cert = sign(ageing, p256_csr(), validity_seconds=30 * DAY)
    assert cert.not_valid_after_utc == ageing.certificate.not_valid_after_utc
    expired = new_device_ca(NOW - timedelta(days=3651))
    with pytest.raises(ConfigError, match="device CA expired"):
        sign(expired, p256_csr())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device_id": "d" * 65}, "device_id must be 1 to 64 characters"),
        ({"tenant": ""}, "tenant must be 1 to 64 characters"),
        ({"scope": DeviceScope(publish=("a/#/b",), subscribe=())}, "'a/#/b' is not a topic filter"),
        ({"scope": DeviceScope(publish=(), subscribe=("",))}, "'' is not a topic filter"),
    ],
)
def test_names_and_filters_are_checked(ca: DeviceCa, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        sign(ca, p256_csr(), **overrides)


# --- refused CSRs -----------------------------------------------------------------------------


def _tampered() -> bytes:
    data = bytearray(der(p256_csr()))
    data[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    return bytes(data)


def _unknown_key_type() -> bytes:
    id_ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # 1.2.840.10045.2.1, made ...2.9
    return der(p256_csr()).replace(id_ec_public_key, bytes.fromhex("06072a8648ce3d0209"), 1)


def _too_large() -> bytes:
    names = x509.SubjectAlternativeName([x509.DNSName(f"name-{n}.example.com") for n in range(200)])
    data = der(p256_csr(extensions=[(names, False)]))
    assert len(data) > 4096
    return data


def _other_pem() -> bytes:
    return new_device_ca(NOW).certificate.public_bytes(serialization.Encoding.PEM)


REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "p384": (lambda: der(build_csr(ec.generate_private_key(ec.SECP384R1()))), "CSR key is on secp384r1, not P-256"),
    "rsa": (lambda: pem(build_csr(rsa.generate_private_key(65537, 2048))), "CSR key is RSA, not P-256"),
    "ed25519": (lambda: der(build_csr(ed25519.Ed25519PrivateKey.generate())), "CSR key is Ed25519, not P-256"),
    "unknown key": (_unknown_key_type, "CSR key is of an unsupported type, not P-256"),
    "tampered": (_tampered, "CSR signature does not verify: no proof of possession of the key"),
    "garbage": (lambda: b"\x30\x03junk that is no request", "CSR is not a PKCS#10 request (PEM or DER)"),
    "empty": (lambda: b"", "CSR is empty"),
    "over 4 KiB": (_too_large, "CSR is larger than 4096 bytes"),
    "PEM + junk": (lambda: pem(p256_csr()) + b"junk\n", "CSR PEM has data after its END line"),
    "PEM + PEM": (lambda: pem(p256_csr()) * 2, "CSR PEM has data after its END line"),
    "other PEM": (_other_pem, "CSR PEM is not one CERTIFICATE REQUEST block"),
    "bad base64": (
        lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\nQQ\n-----END CERTIFICATE REQUEST-----\n",
        "CSR PEM body is not base64",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_csrs_say_what_is_wrong_and_nothing_is_signed(ca: DeviceCa, tmp_path: Path, case: str) -> None:
    make, message = REFUSED[case]
    data = make()
    create_device_ca(tmp_path, NOW)
    before = files_in(tmp_path)
    with pytest.raises(InvalidCsr) as refused:
        parse_csr(data)
    assert str(refused.value) == message  # fixed text: never the bytes it was given
    # Nor is a CSR that skipped parse_csr signed (its size is parse_csr's business only).
    try:
        unchecked = x509.load_der_x509_csr(data)
    except ValueError:
        pass
    else:
        if len(data) <= 4096:
            with pytest.raises(InvalidCsr, match=re.escape(message)):
                sign(ca, unchecked)
    assert files_in(tmp_path) == before


def test_pem_and_der_of_one_csr_parse_alike() -> None:
    csr = p256_csr()
    crlf = pem(csr).replace(b"\n", b"\r\n")
    assert parse_csr(der(csr)) == parse_csr(pem(csr)) == parse_csr(b"\n" + crlf + b"\n") == csr


# --- verification -----------------------------------------------------------------------------


def test_verification_refuses_another_ca_a_forged_signature_and_the_wrong_times(ca: DeviceCa) -> None:
    cert = sign(ca, p256_csr(), validity_seconds=DAY)
    other = new_device_ca(NOW)
    with pytest.raises(InvalidCertificate, match="not issued by this device CA"):
        verify_device_certificate(other.certificate, cert, NOW)
    # Same name as the CA, another key: the signature gives it away.
    forged = sign(DeviceCa(ca.certificate, other.key), p256_csr())
    with pytest.raises(InvalidCertificate, match="signature does not verify"):
        verify_device_certificate(ca.certificate, forged, NOW)

    verify_device_certificate(ca.certificate, cert, NOW - timedelta(seconds=60))
    with pytest.raises(InvalidCertificate, match="certificate is not valid before"):
        verify_device_certificate(ca.certificate, cert, NOW - timedelta(seconds=61))
    verify_device_certificate(ca.certificate, cert, NOW + timedelta(days=1))
    with pytest.raises(InvalidCertificate, match="certificate expired on"):
        verify_device_certificate(ca.certificate, cert, NOW + timedelta(days=1, seconds=1))


def test_verification_refuses_what_is_not_a_client_certificate_or_outlives_its_ca(ca: DeviceCa) -> None:
    server = raw_certificate(ca, [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    with pytest.raises(InvalidCertificate, match="not for client authentication"):
        verify_device_certificate(ca.certificate, server, NOW)
    with pytest.raises(InvalidCertificate, match="not for client authentication"):
        verify_device_certificate(ca.certificate, raw_certificate(ca, []), NOW)
    lasting = raw_certificate(
        ca, [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)], NOW + timedelta(days=4000)
    )
    with pytest.raises(InvalidCertificate, match="device CA expired on"):
        verify_device_certificate(ca.certificate, lasting, NOW + timedelta(days=3651))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\x04\x02{}", "not a DER UTF8String"),  # an OCTET STRING
        (utf8string("{}") + b"\x00", "not a DER UTF8String"),
        (b"\x0c\x81\x02{}", "not a DER UTF8String"),  # a non-minimal length
        (b"\x0c\x02\xff\xfe", "not a DER UTF8String"),
        (b"\x0c", "not a DER UTF8String"),
        (utf8string("pub, sub"), "not JSON"),
        (utf8string('{"pub":[],"pub":["#"],"sub":[]}'), "a member twice"),
        (utf8string('{"pub":["a"],"sub":[1]}'), "is not {"),
        (utf8string('{"pub":[],"sub":[],"ver":1}'), "is not {"),
        (utf8string('{"pub":"a/#","sub":[]}'), "is not {"),
        (utf8string('[["a"],["b"]]'), "is not {"),
    ],
)
def test_a_malformed_scope_is_refused(ca: DeviceCa, value: bytes, message: str) -> None:
    cert = raw_certificate(ca, [(x509.UnrecognizedExtension(SCOPE_OID, value), False)])
    with pytest.raises(InvalidCertificate, match=message):
        scope_of(cert)


def test_a_scope_extension_twice_is_refused(ca: DeviceCa) -> None:
    # cryptography builds no certificate with an extension twice: a same-length stand-in OID is swapped in.
    stand_in = x509.ObjectIdentifier(SCOPE_OID.dotted_string[:-1] + "1")
    first, second = utf8string('{"pub":[],"sub":[]}'), utf8string('{"pub":["#"],"sub":["#"]}')
    cert = raw_certificate(
        ca,
        [(x509.UnrecognizedExtension(SCOPE_OID, first), False), (x509.UnrecognizedExtension(stand_in, second), False)],
    )
    twice = x509.load_der_x509_certificate(
        cert.public_bytes(serialization.Encoding.DER).replace(oid_der(stand_in), oid_der(SCOPE_OID))
    )
    with pytest.raises(InvalidCertificate, match="scope extension twice"):
        scope_of(twice)


def oid_der(oid: x509.ObjectIdentifier) -> bytes:
    """The DER of an OID (X.690 8.19): the first two arcs as one, each arc base 128, high bit = more to come."""
    arcs = [int(arc) for arc in oid.dotted_string.split(".")]
    body = b""
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        digits = [arc & 0x7F]
        while arc := arc >> 7:
            digits.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(digits))
    return bytes([0x06, len(body)]) + body
