"""Who is connecting: the CONNECT username, password and client id mapped to a role's `Grant`.

    username                    password                      client id             role
    (none)                      (none)                        provwire client id    provisioning, if anonymous
                                                                                    provisioning is allowed
    "provision"                 anything                      provwire client id    provisioning
    bridge username             contents of the secret file   anything              bridge
    a name in ops_users.json    its password (SHA-256 kept)   anything              ops (read-only)
    any other (the device id)   ES256 JWT, sub = device id    the device id         device, unless
                                                                                    denylist.json lists it

On the certificate listener (a client certificate the device CA signed, verified in the TLS handshake)
every CONNECT is a device's, by `authenticate_certificate`: username = client id = the certificate's CN,
the scope from the certificate (broker/certificates.py), until its notAfter, unless denylist.json lists it.

Everything else is refused.
"""

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from broker import acl
from broker.certificates import certificate_device
from broker.denylist import Credential, Denylist
from broker.errors import BrokerConfigError, ConnectRefused
from broker.tokens import VerificationKeys, parse_jwks, verify_device_token
from broker.watched import WatchedFile
from provwire.topics import DEFAULT_PREFIX, is_valid_client_id

PROVISION_USERNAME = "provision"
DEFAULT_AUDIENCE = "provbridge-mqtt"
DEFAULT_ISSUER = "provbridge"
DEFAULT_BRIDGE_USERNAME = "provbridge-bridge"
JWKS_FILE_NAME = "jwks.json"
BRIDGE_SECRET_FILE_NAME = "bridge.secret"
OPS_USERS_FILE_NAME = "ops_users.json"


def parse_ops_users(data: bytes) -> dict[str, bytes]:
    """`{"users": {name: sha256 hex of the password}}`, as `provbridge ops-user create` writes it.

    Ops passwords are 256 random bits made by the bridge, so a plain digest is enough, and it keeps
    a CONNECT from costing the broker's event loop a slow password hash.
    """
    document = json.loads(data)
    users = document.get("users") if isinstance(document, dict) else None
    if not isinstance(users, dict):
        raise ValueError('expected {"users": {name: sha256 hex}}')
    return {str(name): bytes.fromhex(str(digest)) for name, digest in users.items()}


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    jwks_file: Path
    bridge_secret_file: Path
    ops_users_file: Path | None = None
    denylist_file: Path | None = None  # revoked devices (broker/denylist.py)
    prefix: str = DEFAULT_PREFIX
    audience: str = DEFAULT_AUDIENCE
    issuer: str = DEFAULT_ISSUER
    bridge_username: str = DEFAULT_BRIDGE_USERNAME
    allow_anonymous_provisioning: bool = True

    def __post_init__(self) -> None:
        acl.check_prefix(self.prefix)
        check_bridge_username(self.bridge_username)


def check_bridge_username(username: str) -> str:
    """The bridge account must not shadow the provisioning username, nor be empty."""
    if not username or username == PROVISION_USERNAME:
        raise BrokerConfigError(f"unusable bridge username {username!r}")
    return username


class Authenticator:
    """Decides a CONNECT. Reads the JWKS and the bridge secret again whenever those files change."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._keys: WatchedFile[VerificationKeys] = WatchedFile(settings.jwks_file, parse_jwks, {})
        # Bytes, stripped: the file is written by `provbridge init` and may end with a newline.
        self._secret: WatchedFile[bytes] = WatchedFile(settings.bridge_secret_file, bytes.strip, b"")
        self._ops: WatchedFile[dict[str, bytes]] | None = (
            WatchedFile(settings.ops_users_file, parse_ops_users, {}) if settings.ops_users_file else None
        )
        self._denylist = Denylist(settings.denylist_file) if settings.denylist_file else None

    def is_revoked(self, grant: acl.Grant, now: float) -> bool:
        """Whether the denylist refuses a device session's credential (its device revoked or deleted, or the
        credential older than a reinstatement or reset): checked on every packet, not only at CONNECT."""
        if grant.role is not acl.Role.DEVICE or self._denylist is None:
            return False
        credential = Credential(str(grant.claims.get("sub", "")), grant.generation, grant.certificate_serial)
        return self._denylist.refuses(credential, now)

    def listed_devices(self, now: float) -> list[str]:
        """The devices with credentials the denylist refuses at `now`, whose live sessions the broker must check."""
        return [] if self._denylist is None else self._denylist.listed(now)

    def authenticate(self, *, client_id: str, username: str | None, password: str | None) -> acl.Grant:
        """The grant of this CONNECT, or ConnectRefused saying why (never echoing a credential)."""
        s = self.settings
        if username is None:
            if not s.allow_anonymous_provisioning:
                raise ConnectRefused("anonymous provisioning is disabled")
            return acl.provisioning_grant(s.prefix, client_id)
        if username == PROVISION_USERNAME:
            return acl.provisioning_grant(s.prefix, client_id)
        if username == s.bridge_username:
            self._check_bridge_secret(password)
            return acl.bridge_grant(s.prefix, username)
        ops_users = self._ops.get() if self._ops is not None else {}
        if username in ops_users:
            given = hashlib.sha256((password or "").encode("utf-8")).digest()
            if not hmac.compare_digest(given, ops_users[username]):
                raise ConnectRefused("ops password does not match")
            return acl.ops_grant(s.prefix, username)
        return self._device(username, client_id, password)

    def authenticate_certificate(self, *, client_id: str, username: str | None, certificate: bytes) -> acl.Grant:
        """The grant of a CONNECT on the certificate listener, from its verified client certificate (DER).

        The password, if any, is ignored: the certificate is the credential. The grant is a device's, with the
        certificate's scope as its `acl` and its notAfter as its `exp`, so the ACL, expiry and denylist checks
        of token devices apply unchanged.
        """
        now = time.time()
        device = certificate_device(
            certificate, username=username, client_id=client_id, now=datetime.fromtimestamp(now, UTC)
        )
        claims = {
            "sub": device.device_id,
            "exp": device.not_after,
            "acl": {"pub": list(device.scope.publish), "sub": list(device.scope.subscribe)},
        }
        grant = acl.device_grant(device.device_id, claims, certificate_serial=device.serial)
        if self.is_revoked(grant, now):
            raise ConnectRefused("device is revoked")
        return grant

    def _check_bridge_secret(self, password: str | None) -> None:
        secret = self._secret.get()
        given = (password or "").encode("utf-8")
        # compare_digest always runs, so a missing secret file costs the same time as a wrong password.
        if not hmac.compare_digest(given, secret) or not secret:
            raise ConnectRefused("bridge password does not match the secret file")

    def _device(self, device_id: str, client_id: str, token: str | None) -> acl.Grant:
        if not is_valid_client_id(device_id):
            raise ConnectRefused("username is not a valid device id")
        if client_id != device_id:
            raise ConnectRefused("client id must equal the device id")
        if not token:
            raise ConnectRefused("device password (token) missing")
        claims = verify_device_token(
            token,
            self._keys.get(),
            audience=self.settings.audience,
            issuer=self.settings.issuer,
            device_id=device_id,
        )
        grant = acl.device_grant(device_id, claims)
        if self.is_revoked(grant, time.time()):
            raise ConnectRefused("device is revoked")
        return grant
