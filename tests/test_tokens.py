"""The device token (bridge/tokens.py) is the JWT PyJWT would make, byte for byte up to the signature, and
PyJWT verifies it."""

import base64
import json
import time

import jwt

from bridge.tokens import mint_token
from provwire import crypto


def _segment(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def test_tokens_are_the_jwts_pyjwt_makes_and_verify_with_it() -> None:
    key = crypto.generate_private_key()
    kid = crypto.key_id(key.public_key())
    now = int(time.time())
    # Enough tokens that some signatures have an r or s with leading zero bytes (each ~1/128).
    for n in range(300):
        grant = mint_token(
            key=key,
            kid=kid,
            issuer="provbridge",
            audience="mqtt",
            device_id=f"dev_{n:026d}",
            tenant="tenant \u00e9\u4e2d",  # non-ASCII: escaped as json.dumps (and so PyJWT) does
            publish=[f"devices/dev_{n}/#"],
            subscribe=[f"devices/dev_{n}/cmd/#", "broadcast/+"],
            now=now - n,
            ttl_seconds=3600,
        )
        header, payload, signature = grant.token.split(".")
        assert "=" not in grant.token
        assert len(_segment(signature)) == 64  # r || s, 32 bytes each (RFC 7518 section 3.4), not DER
        claims = jwt.decode(grant.token, key.public_key(), algorithms=["ES256"], audience="mqtt", issuer="provbridge")
        assert claims["jti"] == grant.jti and claims["exp"] == grant.expires_at == now - n + 3600
        assert claims["acl"] == {"pub": grant.publish, "sub": grant.subscribe}
        assert jwt.get_unverified_header(grant.token) == {"alg": "ES256", "kid": kid, "typ": "JWT"}
        # The same header and payload bytes as jwt.encode of the same claims.
        reference = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
        assert reference.split(".")[:2] == [header, payload]
        assert json.loads(_segment(payload)) == claims
