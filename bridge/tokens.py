"""Minting the device's MQTT token: an ES256 JWT with an EMQX-style `acl` claim. Pure."""

import base64
import secrets
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives.asymmetric import ec


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
) -> TokenGrant:
    jti = secrets.token_hex(16)
    expires_at = now + ttl_seconds
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": device_id,
        "tenant": tenant,
        "iat": now,
        "exp": expires_at,
        "jti": jti,
        "acl": {"pub": publish, "sub": subscribe},
    }
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
    return TokenGrant(token, jti, expires_at, publish, subscribe)


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
