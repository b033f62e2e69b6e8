"""Device tokens: the JWKS file of the keys that sign them, and their verification.

A device token is an ES256 JWT whose header `kid` names a key of the JWKS file. Only ES256 is
ever accepted: the algorithm comes from this code, never from the token, so `none`, HMAC and
key-confusion tricks cannot apply.
"""

import json
import logging
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import ConnectRefused

ALGORITHM = "ES256"
REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]
logger = logging.getLogger(__name__)

VerificationKeys = Mapping[str, ec.EllipticCurvePublicKey]


def _public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise ValueError("not an EC P-256 key")
    if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
        raise ValueError("not an ES256 signing key")
    if "d" in jwk:
        # A private key in a file the broker reads means the signing key leaked: refuse it loudly.
        raise ValueError("holds private key material")
    key = jwt.PyJWK(dict(jwk), algorithm=ALGORITHM).key
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an EC P-256 public key")
    return key


def parse_jwks(data: bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """The usable keys of a JWKS document, by kid. Unusable keys are skipped with a warning."""
    document = json.loads(data)
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError('a JWKS must be an object with a "keys" list')
    found: dict[str, ec.EllipticCurvePublicKey] = {}
    for index, jwk in enumerate(keys):
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        if not isinstance(kid, str) or not kid:
            logger.warning("JWKS key #%d has no kid: skipped", index)
            continue
        if kid in found:
            logger.warning("JWKS key %r appears twice: the later one is skipped", kid)
            continue
        try:
            found[kid] = _public_key(jwk)
        except (ValueError, jwt.PyJWTError) as exc:
            logger.warning("JWKS key %r skipped: %s", kid, exc)
    return found


_REASONS: list[tuple[type[jwt.PyJWTError], str]] = [
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not valid yet"),
    (jwt.InvalidAudienceError, "token audience mismatch"),
    (jwt.InvalidIssuerError, "token issuer mismatch"),
    (jwt.exceptions.InvalidSubjectError, "token subject is not the username"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidSignatureError, "token signature invalid"),
]


def verify_device_token(
    token: str, keys: VerificationKeys, *, audience: str, issuer: str, device_id: str
) -> dict[str, Any]:
    """The verified claims of `token` for `device_id`, or ConnectRefused with a loggable reason."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise ConnectRefused("password is not a JWT") from exc
    if header.get("alg") != ALGORITHM:
        raise ConnectRefused(f"token algorithm must be {ALGORITHM}")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise ConnectRefused("token kid names no key of the JWKS")
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            subject=device_id,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as exc:
        reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), "token invalid")
        raise ConnectRefused(reason) from exc
