"""Minting the device's MQTT token: an ES256 JWT with an EMQX-style `acl` claim. Pure.

The token is assembled here rather than by `jwt.encode` (PyJWT), whose generality (header and payload
checks, the header serialised and encoded anew for every token, the algorithm looked up, the DER signature
converted through generic helpers) adds about two thirds of the ECDSA signature's own cost to every claim
(measured: 38 µs against 23 µs for the signature; 32 µs here). The bytes are the ones PyJWT makes (RFC 7515 compact
serialisation): the header `{"alg":"ES256","kid":...,"typ":"JWT"}` with sorted keys and no spaces, the
claims with no spaces in their given order, both base64url without padding, and the signature as the
64-byte r || s (RFC 7518 §3.4); tests/test_tokens.py checks them against PyJWT and verifies with it.
"""

import base64
import functools
import json
import secrets
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

_ES256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class TokenGrant:
    token: str = field(repr=False)
    jti: str
    expires_at: int
    publish: list[str]
    subscribe: list[str]


def fill_scope(filters: list[str], device_id: str, tenant: str) -> list[str]:
    return [f.replace("{device_id}", device_id).replace("{tenant}", tenant) for f in filters]


def mint_token(
    *,
    key: ec.EllipticCurvePrivateKey,
    kid: str,
    issuer: str,
    audience: str,
    device_id: str,
    tenant: str,
    publish: list[str],
    subscribe: list[str],
    now: int,
    ttl_seconds: int,
    generation: int = 0,
    scope: list[str] | None = None,
) -> TokenGrant:
    """`generation`: the device's credential generation, carried as `gen` once a reinstatement or reset raised it
    above 0 (brokers refuse tokens of a lower one: broker/denylist.py); absent at 0, so such tokens are as before.
    `scope`: RabbitMQ's permissions (bridge/rabbitmq_scopes.py), carried as `scope` beside `acl` when given."""
    jti = secrets.token_hex(16)
    expires_at = now + ttl_seconds
    claims: dict[str, object] = {
        "iss": issuer,
        "aud": audience,
        "sub": device_id,
        "tenant": tenant,
        "iat": now,
        "exp": expires_at,
        "jti": jti,
        "acl": {"pub": publish, "sub": subscribe},
    }
    if generation:
        claims["gen"] = generation
    if scope is not None:
        claims["scope"] = " ".join(scope)
    return TokenGrant(_es256_jwt(key, _header(kid), claims), jti, expires_at, publish, subscribe)


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@functools.lru_cache(maxsize=16)
def _header(kid: str) -> bytes:
    """The encoded JOSE header for a token key: the same few bytes for every token it signs."""
    return _b64url(json.dumps({"alg": "ES256", "kid": kid, "typ": "JWT"}, separators=(",", ":")).encode())


def _es256_jwt(key: ec.EllipticCurvePrivateKey, header: bytes, claims: dict[str, object]) -> str:
    signing_input = header + b"." + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    r, s = decode_dss_signature(key.sign(signing_input, _ES256))
    return (signing_input + b"." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))).decode("ascii")


def _b64url_int(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode("ascii")


def jwk(public_key: ec.EllipticCurvePublicKey, kid: str) -> dict[str, str]:
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url_int(numbers.x),
        "y": _b64url_int(numbers.y),
        "kid": kid,
        "alg": "ES256",
        "use": "sig",
    }
