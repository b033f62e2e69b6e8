"""The crypto steps of protocol v1, as pure functions over bytes.

    shared      = ECDH-P256(cloud private key, device public key)      32 bytes, the x coordinate
    device_key  = HKDF-SHA256(ikm=shared, salt=none, info=DEVICE_KEY_INFO, 32 bytes)
    seal_key    = HKDF-SHA256(ikm=shared, salt=none, info=SEAL_KEY_INFO + request_id, 32 bytes)
    purpose_key = HKDF-SHA256(ikm=device_key, salt=none, info=PURPOSE_KEY_INFO + label, 32 bytes)
    sealed      = AES-256-GCM(seal_key, nonce 12 bytes, plaintext, aad=request_id)
    refresh mac = HMAC-SHA256(device_key, REFRESH_MAC_LABEL \n device_id \n request_id \n timestamp)
    renewal mac = HMAC-SHA256(device_key, RENEWAL_MAC_LABEL \n device_id \n request_id \n timestamp \n csr)
    csr         = DER PKCS#10 request for the device's own P-256 key (certificate credentials)

The device computes the same `shared` from its private key and the cloud public key.
"""

import base64
import functools
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from provwire.errors import InvalidCsr, InvalidPublicKey, SealError

DEVICE_KEY_INFO = b"provbridge v1 device key"
SEAL_KEY_INFO = b"provbridge v1 response seal "
PURPOSE_KEY_INFO = b"provbridge v1 purpose key "
REFRESH_MAC_LABEL = b"provbridge v1 token refresh"
RENEWAL_MAC_LABEL = b"provbridge v1 certificate renewal"
REFRESH_MAC_BYTES = 32
NONCE_BYTES = 12
SEC1_UNCOMPRESSED_LEN = 65


def b64encode(data: bytes) -> str:
    """Standard base64 (RFC 4648 section 4) with padding, as used on the wire."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict, canonical standard base64: one string per byte sequence, so digests of claims agree.

    Rejects characters outside the alphabet, bad padding and non-zero unused trailing bits.
    """
    encoded = text.encode("ascii")
    raw = base64.b64decode(encoded, validate=True)
    if base64.b64encode(raw) != encoded:
        raise ValueError("base64 is not in canonical form")
    return raw


def public_key_from_sec1(data: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a SEC1 uncompressed P-256 point; off-curve points and the identity are refused.

    Remembered for the last few points (refusals are not): a claim's point is checked when the claim is
    parsed and again for its ECDH, 8 µs each time."""
    return _point(bytes(data))


@functools.lru_cache(maxsize=64)
def _point(data: bytes) -> ec.EllipticCurvePublicKey:
    if len(data) != SEC1_UNCOMPRESSED_LEN or data[0] != 0x04:
        raise InvalidPublicKey("public_key must be a 65-byte SEC1 uncompressed P-256 point (0x04 || X || Y)")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError as exc:
        raise InvalidPublicKey("public_key is not a point on the P-256 curve") from exc


def sec1(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The kid of a P-256 key: first 8 bytes of SHA-256 over its SEC1 uncompressed point, in hex."""
    return hashlib.sha256(sec1(public_key)).digest()[:8].hex()


def private_key_from_scalar(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def shared_secret(private_key: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    return private_key.exchange(ec.ECDH(), peer)


def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def derive_device_key(shared: bytes) -> bytes:
    """The long-term device key. Never transmitted: both ends derive it."""
    return _hkdf(shared, DEVICE_KEY_INFO)


def derive_purpose_key(device_key: bytes, label: str) -> bytes:
    """A key for one purpose a backend names (`label`, ASCII), derived from the device key: its holder can do
    with it what the label is for (encrypt payloads, sign commands) but cannot refresh the device's tokens."""
    return _hkdf(device_key, PURPOSE_KEY_INFO + label.encode("ascii"))


def derive_seal_key(shared: bytes, request_id: str) -> bytes:
    """The key that seals the answer to one claim, bound to its request_id."""
    return _hkdf(shared, SEAL_KEY_INFO + request_id.encode("utf-8"))


@dataclass(frozen=True)
class SealedBox:
    nonce: bytes
    ciphertext: bytes  # includes the 16-byte GCM tag at its end


def seal(key: bytes, plaintext: bytes, request_id: str, nonce: bytes | None = None) -> SealedBox:
    """AES-256-GCM with the request_id as associated data. `nonce` is for test vectors only."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    return SealedBox(nonce, AESGCM(key).encrypt(nonce, plaintext, request_id.encode("utf-8")))


def open_sealed(key: bytes, box: SealedBox, request_id: str) -> bytes:
    if len(box.nonce) != NONCE_BYTES:
        raise SealError("nonce must be 12 bytes")
    try:
        return AESGCM(key).decrypt(box.nonce, box.ciphertext, request_id.encode("utf-8"))
    except InvalidTag as exc:
        raise SealError("sealed answer does not open with this key and request_id") from exc


def refresh_mac_input(device_id: str, request_id: str, timestamp: int, csr: str | None = None) -> bytes:
    """The bytes a refresh MAC covers: label, device id, request id, decimal timestamp, newline-separated; for a
    certificate renewal (`csr`, its base64 as on the wire) another label and the CSR last.

    The fields' patterns exclude newlines, so the encoding is unambiguous; the label (which carries the
    protocol version) keeps a refresh MAC from ever being valid as any other MAC made with the device key,
    a renewal's included.
    """
    if timestamp < 0:
        raise ValueError("timestamp must not be negative")
    fields = [device_id.encode("ascii"), request_id.encode("ascii"), str(timestamp).encode("ascii")]
    if csr is None:
        return b"\n".join((REFRESH_MAC_LABEL, *fields))
    return b"\n".join((RENEWAL_MAC_LABEL, *fields, csr.encode("ascii")))


def refresh_mac(device_key: bytes, device_id: str, request_id: str, timestamp: int, csr: str | None = None) -> bytes:
    """HMAC-SHA256 with the device key over `refresh_mac_input`: proves the request comes from the device."""
    return hmac.new(device_key, refresh_mac_input(device_id, request_id, timestamp, csr), hashlib.sha256).digest()


def refresh_mac_matches(
    device_key: bytes, device_id: str, request_id: str, timestamp: int, mac: bytes, csr: str | None = None
) -> bool:
    """Constant-time check of a refresh MAC, so response timing tells nothing about the expected value."""
    return hmac.compare_digest(refresh_mac(device_key, device_id, request_id, timestamp, csr), mac)


def parse_csr_der(der: bytes) -> x509.CertificateSigningRequest:
    """A DER PKCS#10 request for a P-256 key whose self-signature verifies: the device's proof that it holds
    the key (InvalidCsr, a ValueError, otherwise). Its subject and requested extensions are not read: the
    bridge decides what a certificate says."""
    try:
        csr = x509.load_der_x509_csr(der)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion (a version other than 0) is no ValueError
        raise InvalidCsr("csr is not a DER PKCS#10 certificate request") from exc
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise InvalidCsr("csr is for a key of an unsupported type, not P-256") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidCsr("csr is not for a P-256 key")
    try:
        signed = csr_signature_valid(csr)
    except (UnsupportedAlgorithm, ValueError) as exc:  # e.g. a signature algorithm that is not ECDSA
        raise InvalidCsr("csr signature algorithm is not supported: sign it with ECDSA-SHA256") from exc
    if not signed:
        raise InvalidCsr("csr signature does not verify: no proof of possession of the key")
    if not isinstance(csr.signature_hash_algorithm, hashes.SHA256):
        raise InvalidCsr("csr must be signed with ECDSA-SHA256")
    return csr


@functools.lru_cache(maxsize=256)
def csr_signature_valid(csr: x509.CertificateSigningRequest) -> bool:
    """`csr.is_signature_valid`, remembered (CSRs hash and compare by their bytes): a certificate claim's CSR is
    checked when the claim is parsed and again when it is signed (`bridge.tls.device_ca`), and each check is an
    ECDSA verification."""
    return csr.is_signature_valid


def csr_key_sec1(csr: x509.CertificateSigningRequest) -> bytes:
    """The SEC1 point of the key of a CSR `parse_csr_der` accepted."""
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidCsr("csr is not for a P-256 key")
    return sec1(key)
