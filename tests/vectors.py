"""Generator of the protocol v1 test vectors printed in docs/PROTOCOL.md.

Every input is derived from a fixed label with SHA-256, so the whole set is reproducible:

    python tests/vectors.py            # prints the body of the vector block in docs/PROTOCOL.md

The values are computed with provwire (the code the bridge and devices run). The test
tests/test_protocol_vectors.py re-checks every value in the document independently and also
checks that this generator still reproduces the document's block byte for byte.
"""

import base64
import hashlib
import hmac
import json
import math
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pydantic import BaseModel

from bridge.tls.device_ca import DeviceCa, chain_pem, sign_device_certificate
from broker.certificates import DeviceScope
from provwire import crypto, models, topics
from provwire.errors import ErrorCode

LABEL = "provbridge v1 test vector: "
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# P-256 field prime, and the point with x = 0 (used for the non-canonical-encoding vector).
P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
P256_X0_Y = 0x66485C780E2F83D72433BD5D84A06BB6541C2AF31DAE871728BF856A174F93F4

ISSUED_AT = 1735689600  # 2025-01-01T00:00:00Z
TOKEN_TTL = 900
REFRESHED_AT = ISSUED_AT + 600  # the token refresh vector: 10 minutes after the claim
CERTIFICATE_VALIDITY = 7 * 24 * 3600  # a certificate key's default


def fixed(name: str) -> bytes:
    """The 32 fixed bytes behind a vector input: SHA-256 of the UTF-8 text `LABEL + name`."""
    return hashlib.sha256((LABEL + name).encode("utf-8")).digest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def crockford(data: bytes, chars: int) -> str:
    bits = int.from_bytes(data, "big")
    total = len(data) * 8
    return "".join(CROCKFORD[(bits >> (total - 5 * (i + 1))) & 31] for i in range(chars))


def es256_jwt(private_key: ec.EllipticCurvePrivateKey, header: dict[str, object], claims: dict[str, object]) -> str:
    """A compact JWS (RFC 7515) signed ES256 with deterministic ECDSA (RFC 6979), so it is reproducible."""
    signing_input = f"{b64url(compact(header).encode())}.{b64url(compact(claims).encode())}"
    der = private_key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def device_csr(private_key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A DER PKCS#10 request, subject CN = `common_name`, signed with deterministic ECDSA-SHA256."""
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return csr.sign(private_key, hashes.SHA256(), ecdsa_deterministic=True).public_bytes(serialization.Encoding.DER)


def device_ca(private_key: ec.EllipticCurvePrivateKey) -> DeviceCa:
    """A device CA like `bridge.tls.device_ca.new_device_ca` makes, but reproducible (fixed serial, times, RFC 6979)."""
    name = x509.Name(
        [
            x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "provbridge"),
            x509.NameAttribute(
                x509.NameOID.COMMON_NAME, f"provbridge device CA {crypto.key_id(private_key.public_key())}"
            ),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(private_key.public_key())
    start = datetime.fromtimestamp(ISSUED_AT, UTC) - timedelta(days=1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(int.from_bytes(fixed("device CA serial")[:16], "big") >> 1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(private_key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return DeviceCa(certificate, private_key)


def flip_bit(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


Section = tuple[str, list[tuple[str, str]]]


def build() -> list[Section]:
    """The vector block as ordered sections of (name, value) pairs."""
    cloud_scalar = fixed("cloud private key")
    device_scalar = fixed("device private key")
    token_scalar = fixed("token private key")
    cloud = crypto.private_key_from_scalar(cloud_scalar)
    device = crypto.private_key_from_scalar(device_scalar)
    token_key = crypto.private_key_from_scalar(token_scalar)
    cloud_pub = crypto.sec1(cloud.public_key())
    device_pub = crypto.sec1(device.public_key())
    token_pub = crypto.sec1(token_key.public_key())
    cloud_kid = crypto.key_id(cloud.public_key())
    token_kid = crypto.key_id(token_key.public_key())

    request_id = "tv1-" + fixed("request id")[:8].hex()
    client_id = "c-" + hashlib.sha256(device_pub).digest()[:8].hex()
    nonce = fixed("nonce")[:12]
    device_id = "dev_" + base64.b32encode(fixed("device id")[:16]).decode("ascii").rstrip("=").lower()
    api_key = "dk_" + b64url(fixed("api key"))
    provision_key = "pk_" + b64url(fixed("provisioning key"))
    human_code = crockford(fixed("human code")[:5], 8)
    human_code = f"PROV-{human_code[:4]}-{human_code[4:]}"
    key_id = "key_" + fixed("provisioning key id")[:8].hex()  # the key's public handle, not a secret
    tenant = "acme"

    shared_cloud = crypto.shared_secret(cloud, device.public_key())
    shared_device = crypto.shared_secret(device, cloud.public_key())
    assert shared_cloud == shared_device
    device_key = crypto.derive_device_key(shared_cloud)
    seal_key = crypto.derive_seal_key(shared_cloud, request_id)

    claim = models.Claim(
        request_id=request_id,
        provision_key=provision_key,
        hardware_id="SN-4711-0042",
        public_key=crypto.b64encode(device_pub),
        device_name="Line 7 sensor",
        cloud_key_id=cloud_kid,
        hardware=models.Hardware(
            board_model="ESP32-S3-DevKitC-1",
            cpu_cores=2,
            ram_mb=8,
            os="FreeRTOS",
            arch="xtensa",
            kernel="ESP-IDF v5.3",
        ),
        network=models.Network(
            hostname="sensor-0042", ip="192.0.2.42", mac="24:6f:28:aa:bb:cc", connection_type="wifi"
        ),
        agent_version="1.0.0",
    )

    scope = f"devices/{device_id}/#"
    header: dict[str, object] = {"alg": "ES256", "typ": "JWT", "kid": token_kid}
    claims: dict[str, object] = {
        "iss": "provbridge",
        "aud": "provbridge-mqtt",
        "sub": device_id,
        "tenant": tenant,
        "iat": ISSUED_AT,
        "exp": ISSUED_AT + TOKEN_TTL,
        "jti": fixed("jti")[:16].hex(),
        "acl": {"pub": [scope], "sub": [scope]},
    }
    token = es256_jwt(token_key, header, claims)
    jwks = {
        "keys": [
            {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url(token_pub[1:33]),
                "y": b64url(token_pub[33:]),
                "kid": token_kid,
                "alg": "ES256",
                "use": "sig",
            }
        ]
    }

    credentials = models.Credentials(
        api_key=api_key,
        mqtt=models.MqttCredentials(
            host="mqtt.example.com",
            port=8883,
            tls=True,
            client_id=device_id,
            username=device_id,
            token=token,
            expires_at=ISSUED_AT + TOKEN_TTL,
            publish=[scope],
            subscribe=[scope],
        ),
    )
    plaintext = models.to_json(credentials)
    box = crypto.seal(seal_key, plaintext, request_id, nonce=nonce)
    answer = models.ClaimOk(
        request_id=request_id,
        device_id=device_id,
        created=True,
        labels={"site": "Zürich", "line": "7"},
        groups=["sensors"],
        profile="default",
        cloud_key_id=cloud_kid,
        sealed=models.Sealed(nonce=crypto.b64encode(box.nonce), ciphertext=crypto.b64encode(box.ciphertext)),
    )

    off_curve = device_pub[:-1] + bytes([device_pub[-1] ^ 0x01])
    x0_point = b"\x04" + (0).to_bytes(32, "big") + P256_X0_Y.to_bytes(32, "big")
    x_is_p = b"\x04" + P256_P.to_bytes(32, "big") + P256_X0_Y.to_bytes(32, "big")
    compressed = bytes([0x02 | (device_pub[-1] & 1)]) + device_pub[1:33]
    wrong_request_id = request_id[:-1] + ("0" if request_id[-1] != "0" else "1")

    refresh_request_id = "tv1-" + fixed("refresh request id")[:8].hex()
    refresh_mac = crypto.refresh_mac(device_key, device_id, refresh_request_id, REFRESHED_AT)
    refresh = models.TokenRefresh(
        request_id=refresh_request_id,
        device_id=device_id,
        timestamp=REFRESHED_AT,
        mac=crypto.b64encode(refresh_mac),
    )
    # Certificate credentials (section 10.4): the same device and request id, a key of credential type certificate.
    csr_der = device_csr(device, claim.hardware_id)
    csr_b64 = crypto.b64encode(csr_der)
    certificate_claim = models.Claim(
        request_id=request_id,
        provision_key=provision_key,
        hardware_id=claim.hardware_id,
        public_key=claim.public_key,
        cloud_key_id=cloud_kid,
        csr=csr_b64,
    )
    ca = device_ca(crypto.private_key_from_scalar(fixed("device CA private key")))
    certificate = sign_device_certificate(
        ca,
        x509.load_der_x509_csr(csr_der),
        device_id=device_id,
        tenant=tenant,
        scope=DeviceScope((scope,), (scope,)),
        not_before=datetime.fromtimestamp(ISSUED_AT, UTC),
        validity_seconds=CERTIFICATE_VALIDITY,
        serial=int.from_bytes(fixed("certificate serial")[:16], "big") >> 1,
    )
    certificate_credentials = models.Credentials(
        api_key=api_key,
        mqtt=models.MqttCredentials(
            host="mqtt.example.com",
            port=8884,
            tls=True,
            client_id=device_id,
            username=device_id,
            certificate=chain_pem(certificate, ca),
            expires_at=ISSUED_AT + CERTIFICATE_VALIDITY,
            publish=[scope],
            subscribe=[scope],
        ),
    )
    certificate_plaintext = models.to_json(certificate_credentials)
    certificate_box = crypto.seal(seal_key, certificate_plaintext, request_id, nonce=nonce)
    renewal_request_id = "tv1-" + fixed("renewal request id")[:8].hex()
    renewal_mac = crypto.refresh_mac(device_key, device_id, renewal_request_id, REFRESHED_AT, csr_b64)
    renewal = models.TokenRefresh(
        request_id=renewal_request_id,
        device_id=device_id,
        timestamp=REFRESHED_AT,
        mac=crypto.b64encode(renewal_mac),
        csr=csr_b64,
    )
    other_device = crypto.private_key_from_scalar(fixed("other device private key"))
    other_csr_b64 = crypto.b64encode(device_csr(other_device, claim.hardware_id))
    # The last byte of the DER is in the signature's s: flipping it keeps the DER valid and the signature wrong.
    bad_signature_b64 = crypto.b64encode(flip_bit(csr_der, len(csr_der) - 1))

    invalid_refreshes = [
        ("device_id_uppercase", "device_id", {"device_id": device_id.upper()}),
        ("timestamp_string", "timestamp", {"timestamp": str(REFRESHED_AT)}),
        ("timestamp_negative", "timestamp", {"timestamp": -1}),
        ("mac_31_bytes", "mac", {"mac": crypto.b64encode(refresh_mac[:31])}),
        ("mac_urlsafe", "mac", {"mac": refresh.mac.replace("+", "-").replace("/", "_")}),
        ("request_id_null", "request_id", {"request_id": None}),
        ("unknown_field", "hardware_id", {"hardware_id": claim.hardware_id}),
        ("csr_bad_signature", "csr", {"csr": bad_signature_b64}),
    ]

    # The message texts are those the bridge sends today; they are not part of the contract.
    errors = [
        models.ClaimError(
            request_id=request_id,
            code=ErrorCode.VALIDATION_ERROR,
            message="claim is not valid",
            errors=[models.FieldError(field="hardware.cpu_cores", message="Input should be a valid integer")],
        ),
        models.ClaimError(
            code=ErrorCode.VALIDATION_ERROR,
            message="claim is not valid",
            errors=[models.FieldError(field="", message="Input should be an object")],
        ),
        models.ClaimError(
            request_id=request_id, code=ErrorCode.PERMISSION_DENIED, message="provisioning key not accepted"
        ),
        models.ClaimError(
            request_id=request_id,
            code=ErrorCode.DEVICE_EXISTS,
            message="a device with this hardware_id already exists",
        ),
        models.ClaimError(
            request_id=request_id,
            code=ErrorCode.RATE_LIMITED,
            message="bridge is busy, retry later",
            retry_after=2,
        ),
        models.ClaimError(
            request_id=request_id, code=ErrorCode.INTERNAL_ERROR, message="storage unavailable", retry_after=2
        ),
    ]
    key_event = {
        "tenant": tenant,
        "request_id": request_id,
        "client_id": client_id,
        "hardware_id": claim.hardware_id,
        "key_name": "factory-line-7",
        "key_id_prefix": key_id[:12],
    }
    events = [
        models.Event(event="device.provisioned", time="2025-01-01T00:00:00.000Z", device_id=device_id, **key_event),
        models.Event(event="key.exhausted", time="2025-01-01T00:00:00.000Z", **key_event),
        models.Event(
            event="claim.rejected",
            time="2025-01-01T00:00:05.250Z",
            tenant="_",
            request_id=request_id,
            client_id=client_id,
            hardware_id=claim.hardware_id,
            reason="unknown_key",
        ),
        models.Event(
            event="token.refreshed",
            time="2025-01-01T00:10:00.000Z",
            tenant=tenant,
            request_id=refresh_request_id,
            client_id=client_id,
            hardware_id=claim.hardware_id,
            device_id=device_id,
        ),
        models.Event(
            event="token.refresh_rejected",
            time="2025-01-01T00:10:00.000Z",
            tenant=tenant,
            request_id=refresh_request_id,
            client_id=client_id,
            hardware_id=claim.hardware_id,
            device_id=device_id,
            reason="bad_mac",
        ),
    ]
    refresh_denied = models.ClaimError(
        request_id=refresh_request_id, code=ErrorCode.PERMISSION_DENIED, message="token refresh not accepted"
    )

    off_curve_b64 = crypto.b64encode(off_curve)
    invalid_claims = [
        ("request_id_too_short", "request_id", {"request_id": "short"}),
        ("request_id_bad_char", "request_id", {"request_id": "tv1 0001 0002"}),
        ("provision_key_number", "provision_key", {"provision_key": 12345}),
        ("hardware_id_slash", "hardware_id", {"hardware_id": "SN/4711"}),
        ("hardware_id_too_long", "hardware_id", {"hardware_id": "X" * 129}),
        (
            "public_key_urlsafe",
            "public_key",
            {"public_key": claim.public_key.replace("+", "-").replace("/", "_")},
        ),
        ("public_key_off_curve", "public_key", {"public_key": off_curve_b64}),
        ("public_key_compressed", "public_key", {"public_key": crypto.b64encode(compressed)}),
        ("cloud_key_id_uppercase", "cloud_key_id", {"cloud_key_id": cloud_kid.upper()}),
        ("device_name_empty", "device_name", {"device_name": ""}),
        ("cpu_cores_string", "hardware.cpu_cores", {"hardware": {"cpu_cores": "2"}}),
        ("cpu_cores_float", "hardware.cpu_cores", {"hardware": {"cpu_cores": 2.0}}),
        ("cpu_cores_zero", "hardware.cpu_cores", {"hardware": {"cpu_cores": 0}}),
        ("ram_mb_too_big", "hardware.ram_mb", {"hardware": {"ram_mb": (1 << 40) + 1}}),
        ("network_unknown_field", "network.vlan", {"network": {"vlan": 3}}),
        ("unknown_field", "colour", {"colour": "blue"}),
        ("csr_not_base64", "csr", {"csr": "MIIB not base64"}),
        ("csr_not_a_request", "csr", {"csr": crypto.b64encode(b"\x30\x03\x02\x01\x01")}),
        ("csr_for_another_key", "csr", {"csr": other_csr_b64}),
        ("csr_bad_signature", "csr", {"csr": bad_signature_b64}),
        ("csr_too_long", "csr", {"csr": "A" * (models.MAX_CSR_CHARS + 4)}),
    ]

    return [
        (
            f'fixed inputs (32-byte values are SHA-256 of "{LABEL}<what>", see the text above)',
            [
                ("cloud_private_scalar_hex", cloud_scalar.hex()),
                ("device_private_scalar_hex", device_scalar.hex()),
                ("token_private_scalar_hex", token_scalar.hex()),
                ("request_id", request_id),
                ("nonce_hex", nonce.hex()),
                ("claim_client_id", client_id),
            ],
        ),
        (
            "public keys and key ids",
            [
                ("cloud_public_key_sec1_hex", cloud_pub.hex()),
                ("cloud_public_key_b64", crypto.b64encode(cloud_pub)),
                ("cloud_kid", cloud_kid),
                ("device_public_key_sec1_hex", device_pub.hex()),
                ("device_public_key_b64", crypto.b64encode(device_pub)),
            ],
        ),
        (
            "key agreement and derivation",
            [
                ("shared_secret_hex", shared_cloud.hex()),
                ("hkdf_prk_hex", _hkdf_extract(shared_cloud).hex()),
                ("device_key_info_hex", crypto.DEVICE_KEY_INFO.hex()),
                ("device_key_hex", device_key.hex()),
                ("seal_key_info_hex", (crypto.SEAL_KEY_INFO + request_id.encode("utf-8")).hex()),
                ("seal_key_hex", seal_key.hex()),
            ],
        ),
        (
            "the claim the device publishes (on claim_topic)",
            [
                ("claim_topic", topics.claim_topic(topics.DEFAULT_PREFIX, client_id)),
                ("response_topic", topics.response_topic(topics.DEFAULT_PREFIX, client_id)),
                ("claim_json", models.to_json(claim).decode("utf-8")),
            ],
        ),
        (
            "the sealed credentials and the answer",
            [
                ("plaintext", plaintext.decode("utf-8")),
                ("aad_hex", request_id.encode("utf-8").hex()),
                ("sealed_ciphertext_b64", crypto.b64encode(box.ciphertext)),
                ("sealed_ciphertext_hex", box.ciphertext[:-16].hex()),
                ("sealed_tag_hex", box.ciphertext[-16:].hex()),
                ("answer_json", models.to_json(answer).decode("utf-8")),
            ],
        ),
        (
            "the token inside the credentials (opaque to devices) and the JWKS that verifies it",
            [
                ("token_public_key_sec1_hex", token_pub.hex()),
                ("token_kid", token_kid),
                ("token_header_json", compact(header)),
                ("token_claims_json", compact(claims)),
                ("jwks_json", compact(jwks)),
            ],
        ),
        (
            "token refresh (section 10.1): device_key_hex and device_id as above; the request (on refresh_topic)",
            [
                ("refresh_request_id", refresh_request_id),
                ("refresh_timestamp", str(REFRESHED_AT)),
                ("refresh_topic", topics.token_topic(topics.DEFAULT_PREFIX, client_id)),
                ("refresh_mac_input_hex", crypto.refresh_mac_input(device_id, refresh_request_id, REFRESHED_AT).hex()),
                ("refresh_mac_hex", refresh_mac.hex()),
                ("refresh_json", models.to_json(refresh).decode("utf-8")),
            ],
        ),
        (
            "certificate credentials (section 10.4): the claim, the answer's credentials, the renewal",
            [
                ("csr_b64", csr_b64),
                ("certificate_claim_json", models.to_json(certificate_claim).decode("utf-8")),
                ("device_ca_private_scalar_hex", fixed("device CA private key").hex()),
                (
                    "device_ca_certificate_b64",
                    crypto.b64encode(ca.certificate.public_bytes(serialization.Encoding.DER)),
                ),
                ("device_certificate_b64", crypto.b64encode(certificate.public_bytes(serialization.Encoding.DER))),
                ("certificate_plaintext", certificate_plaintext.decode("utf-8")),
                ("certificate_sealed_ciphertext_b64", crypto.b64encode(certificate_box.ciphertext)),
                ("renewal_request_id", renewal_request_id),
                (
                    "renewal_mac_input_hex",
                    crypto.refresh_mac_input(device_id, renewal_request_id, REFRESHED_AT, csr_b64).hex(),
                ),
                ("renewal_mac_hex", renewal_mac.hex()),
                ("renewal_json", models.to_json(renewal).decode("utf-8")),
            ],
        ),
        (
            "key formats",
            [
                ("provision_key", provision_key),
                ("human_code", human_code),
                ("api_key", api_key),
                ("device_id", device_id),
            ],
        ),
        (
            "negative vectors: public keys that must be rejected (a valid x = 0 point is given for contrast)",
            [
                ("reject_off_curve_public_key_hex", off_curve.hex()),
                ("reject_compressed_public_key_hex", compressed.hex()),
                ("reject_all_zero_public_key_hex", (b"\x04" + bytes(64)).hex()),
                ("accept_x0_public_key_hex", x0_point.hex()),
                ("reject_x_equals_p_public_key_hex", x_is_p.hex()),
            ],
        ),
        (
            "negative vectors: sealed boxes that must not open (with seal_key_hex, nonce_hex, request_id)",
            [
                ("reject_tampered_ciphertext_b64", crypto.b64encode(flip_bit(box.ciphertext, 0))),
                (
                    "reject_tampered_tag_b64",
                    crypto.b64encode(flip_bit(box.ciphertext, len(box.ciphertext) - 1)),
                ),
                ("reject_wrong_request_id", wrong_request_id),
            ],
        ),
        (
            "claims answered validation_error: <field> <JSON members that replace those of claim_json>",
            [(f"invalid_claim.{name}", f"{field} {compact(patch)}") for name, field, patch in invalid_claims],
        ),
        (
            "token refreshes answered validation_error: <field> <JSON members that replace those of refresh_json>",
            [(f"invalid_refresh.{name}", f"{field} {compact(patch)}") for name, field, patch in invalid_refreshes],
        ),
        (
            "claims and refreshes that are not JSON (RFC 8259 has no NaN or Infinity), answered validation_error"
            ' with one error on field "" and no request_id: <members that replace those of claim_json or refresh_json>',
            [
                ("unreadable_claim.cpu_cores_nan", compact({"hardware": {"cpu_cores": math.nan}})),
                ("unreadable_claim.ram_mb_infinity", compact({"hardware": {"ram_mb": math.inf}})),
                ("unreadable_refresh.timestamp_minus_infinity", compact({"timestamp": -math.inf})),
            ],
        ),
        (
            "other messages, exactly as serialised on the wire",
            [(f"error_{e.code.value}{'' if e.request_id else '_unreadable'}_json", _j(e)) for e in errors]
            + [("error_permission_denied_refresh_json", _j(refresh_denied))]
            + [(f"event_{e.event.replace('.', '_')}_json", _j(e)) for e in events]
            + [
                ("status_online_json", _j(models.BridgeStatus(status="online"))),
                ("status_offline_json", _j(models.BridgeStatus(status="offline"))),
            ],
        ),
    ]


def _j(model: BaseModel) -> str:
    return models.to_json(model).decode("utf-8")


def _hkdf_extract(ikm: bytes) -> bytes:
    """HKDF-Extract with the salt absent: HMAC-SHA256 keyed with 32 zero bytes (RFC 5869 section 2.2)."""
    return hmac.new(bytes(32), ikm, hashlib.sha256).digest()


def render() -> str:
    """The body of the vector block, one `name = value` per line, sections led by `#` comments."""
    lines: list[str] = []
    for title, pairs in build():
        if lines:
            lines.append("")
        lines.append(f"# {title}")
        lines.extend(f"{name} = {value}" for name, value in pairs)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
