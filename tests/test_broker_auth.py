"""CONNECT decisions without a network: roles, device tokens, the JWKS and the bridge secret."""

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.acl import Access, Role
from broker.auth import Authenticator, AuthSettings
from broker.errors import BrokerConfigError, ConnectRefused

SECRET = "s3cret-bridge-password"


def public_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "ES256", "use": "sig"}


def write_jwks(path: Path, *jwks: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": list(jwks)}))
    os.replace(tmp, path)  # atomic, as a careful writer would


def mint(key: Any, kid: str | None = "k1", *, algorithm: str = "ES256", **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "provbridge",
        "aud": "provbridge-mqtt",
        "sub": "d1",
        "tenant": "acme",
        "iat": now,
        "exp": now + 600,
        "jti": "jti-1",
        "acl": {"pub": ["devices/d1/#"], "sub": ["devices/d1/cmd/#"]},
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


@pytest.fixture
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def auth(tmp_path: Path, signing_key: ec.EllipticCurvePrivateKey) -> Authenticator:
    write_jwks(tmp_path / "jwks.json", public_jwk(signing_key, "k1"))
    (tmp_path / "bridge.secret").write_text(SECRET + "\n")
    return Authenticator(AuthSettings(jwks_file=tmp_path / "jwks.json", bridge_secret_file=tmp_path / "bridge.secret"))


def device(auth: Authenticator, token: str, client_id: str = "d1", username: str = "d1") -> Any:
    return auth.authenticate(client_id=client_id, username=username, password=token)


def test_device_with_valid_token_gets_the_token_acl(auth: Authenticator, signing_key: Any) -> None:
    grant = device(auth, mint(signing_key))
    assert grant.role is Role.DEVICE
    assert grant.principal == "device:d1"
    assert grant.publish == ("devices/d1/#",)
    assert grant.subscribe == grant.receive == ("devices/d1/cmd/#",)
    assert grant.claims["tenant"] == "acme"
    assert grant.permits(Access.PUBLISH, "devices/d1/x", time.time())


def _with_header(token: str, **header: Any) -> str:
    """The token with its header fields replaced, signature kept: what a tamperer would send."""
    head, body, signature = token.split(".")
    fields = {**json.loads(base64.urlsafe_b64decode(head + "==")), **header}
    new_head = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    return f"{new_head}.{body}.{signature}"


def _forge_none(signing_key: Any) -> str:
    return mint(None, algorithm="none")


def _forge_hs256(signing_key: Any) -> str:
    return mint("a-shared-secret-of-at-least-32-bytes!!", algorithm="HS256")


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda k: mint(ec.generate_private_key(ec.SECP256R1())), "signature"),  # forged: other key
        (lambda k: mint(k, exp=int(time.time()) - 1), "expired"),
        (lambda k: mint(k, aud="someone-else"), "audience"),
        (lambda k: mint(k, iss="someone-else"), "issuer"),
        (lambda k: mint(k, sub="d2"), "subject"),
        (lambda k: mint(k, exp=None), "required"),
        (lambda k: mint(k, aud=None), "required"),
        (lambda k: mint(k, iat=int(time.time()) + 3600), "not valid yet"),
        (lambda k: mint(k, kid="unknown"), "kid"),
        (lambda k: mint(k, kid=None), "kid"),
        (lambda k: _with_header(mint(k), kid=["k1"]), "not a JWT"),  # PyJWT refuses a non-str kid
        (lambda k: _with_header(mint(k), alg="ES384"), "ES256"),
        (lambda k: mint(k, acl=None), "acl"),
        (lambda k: mint(k, acl={"pub": "devices/#"}), "acl"),
        (_forge_none, "ES256"),
        (_forge_hs256, "ES256"),
        (lambda k: "not-a-jwt", "not a JWT"),
        (lambda k: "", "missing"),
    ],
)
def test_device_token_refusals(auth: Authenticator, signing_key: Any, make_token: Any, reason: str) -> None:
    with pytest.raises(ConnectRefused, match=reason):
        device(auth, make_token(signing_key))


def test_device_client_id_must_equal_device_id(auth: Authenticator, signing_key: Any) -> None:
    with pytest.raises(ConnectRefused, match="client id"):
        device(auth, mint(signing_key), client_id="d1-other")


def test_device_refusal_reason_never_holds_the_token(auth: Authenticator) -> None:
    forged = mint(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConnectRefused) as caught:
        device(auth, forged)
    assert forged not in str(caught.value) and forged.split(".")[2] not in str(caught.value)


def test_jwks_is_reloaded_when_it_changes_and_may_hold_several_keys(
    auth: Authenticator, tmp_path: Path, signing_key: Any
) -> None:
    new_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConnectRefused):
        device(auth, mint(new_key, kid="k2"))
    write_jwks(tmp_path / "jwks.json", public_jwk(signing_key, "k1"), public_jwk(new_key, "k2"))
    assert device(auth, mint(new_key, kid="k2")).role is Role.DEVICE
    assert device(auth, mint(signing_key, kid="k1")).role is Role.DEVICE
    write_jwks(tmp_path / "jwks.json", public_jwk(new_key, "k2"))  # k1 retired
    with pytest.raises(ConnectRefused, match="kid"):
        device(auth, mint(signing_key, kid="k1"))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda jwk: {**jwk, "alg": "HS256"},
        lambda jwk: {**jwk, "crv": "P-384"},
        lambda jwk: {**jwk, "use": "enc"},
        lambda jwk: {**jwk, "kty": "oct", "k": "c2VjcmV0"},
    ],
)
def test_jwks_keys_that_are_not_es256_signing_keys_are_ignored(
    auth: Authenticator, tmp_path: Path, signing_key: Any, mangle: Any
) -> None:
    write_jwks(tmp_path / "jwks.json", mangle(public_jwk(signing_key, "k1")))
    with pytest.raises(ConnectRefused, match="kid"):
        device(auth, mint(signing_key))


def test_jwks_with_private_key_material_is_refused(auth: Authenticator, tmp_path: Path, signing_key: Any) -> None:
    private = {**ECAlgorithm.to_jwk(signing_key, as_dict=True), "kid": "k1"}
    write_jwks(tmp_path / "jwks.json", private)
    with pytest.raises(ConnectRefused, match="kid"):
        device(auth, mint(signing_key))


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"keys": 3}', b"\xff\xfe"])
def test_unusable_or_missing_jwks_fails_closed(
    auth: Authenticator, tmp_path: Path, signing_key: Any, content: bytes
) -> None:
    (tmp_path / "jwks.json").write_bytes(content)
    with pytest.raises(ConnectRefused):
        device(auth, mint(signing_key))
    (tmp_path / "jwks.json").unlink()
    with pytest.raises(ConnectRefused):
        device(auth, mint(signing_key))


def test_bridge_needs_the_secret_file_contents(auth: Authenticator, tmp_path: Path) -> None:
    grant = auth.authenticate(client_id="bridge-1", username="provbridge-bridge", password=SECRET)
    assert grant.role is Role.BRIDGE
    for wrong in ["", None, SECRET + "x", SECRET[:-1], SECRET + "\n"]:
        with pytest.raises(ConnectRefused):
            auth.authenticate(client_id="bridge-1", username="provbridge-bridge", password=wrong)
    # The secret is re-read when the file changes.
    (tmp_path / "bridge.secret").write_text("rotated-secret-value\n")
    with pytest.raises(ConnectRefused):
        auth.authenticate(client_id="bridge-1", username="provbridge-bridge", password=SECRET)
    assert auth.authenticate(client_id="b", username="provbridge-bridge", password="rotated-secret-value")


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_bridge_is_refused_without_a_usable_secret(auth: Authenticator, tmp_path: Path, content: str | None) -> None:
    secret_file = tmp_path / "bridge.secret"
    if content is None:
        secret_file.unlink()
    else:
        secret_file.write_text(content)
    for password in ["", None, content or "x"]:
        with pytest.raises(ConnectRefused):
            auth.authenticate(client_id="bridge-1", username="provbridge-bridge", password=password)


def test_provisioning_clients_anonymous_or_with_the_provision_username(tmp_path: Path) -> None:
    settings = AuthSettings(jwks_file=tmp_path / "none.json", bridge_secret_file=tmp_path / "none.secret")
    auth = Authenticator(settings)
    assert auth.authenticate(client_id="hw-1", username=None, password=None).role is Role.PROVISIONING
    assert auth.authenticate(client_id="hw-1", username="provision", password="any").role is Role.PROVISIONING
    with pytest.raises(ConnectRefused):
        auth.authenticate(client_id="hw/1", username=None, password=None)
    closed = Authenticator(
        AuthSettings(
            jwks_file=settings.jwks_file,
            bridge_secret_file=settings.bridge_secret_file,
            allow_anonymous_provisioning=False,
        )
    )
    with pytest.raises(ConnectRefused, match="anonymous"):
        closed.authenticate(client_id="hw-1", username=None, password=None)
    assert closed.authenticate(client_id="hw-1", username="provision", password="").role is Role.PROVISIONING


def test_unknown_username_is_refused(auth: Authenticator) -> None:
    for username in ["", "has space", "a/b"]:
        with pytest.raises(ConnectRefused):
            auth.authenticate(client_id=username, username=username, password="x")
    with pytest.raises(ConnectRefused):
        auth.authenticate(client_id="stranger", username="stranger", password="not-a-token")


@pytest.mark.parametrize("username", ["", "provision"])
def test_bridge_username_must_not_shadow_provisioning(tmp_path: Path, username: str) -> None:
    with pytest.raises(BrokerConfigError):
        AuthSettings(jwks_file=tmp_path / "j", bridge_secret_file=tmp_path / "s", bridge_username=username)
