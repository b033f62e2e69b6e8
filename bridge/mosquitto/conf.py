"""Mosquitto 2.0 configuration for provbridge, as pure functions over data from `broker.acl`.

Three files make a Mosquitto that enforces the same role table as the embedded broker:

    mosquitto.conf          listeners, persistence, queue sizes, the dynamic-security plugin
    dynamic-security.json   the plugin's state: the bridge, `provision` and ops accounts, their roles,
                            the anonymous group; the bridge adds one client + role per device token
    provisioning.acl        `pattern` lines for provisioning clients, keyed on their client id

How Mosquitto 2.0 decides (checked against 2.0.11, see tests/test_mosquitto_*.py):

- A CONNECT with a username must match a dynamic-security client (PBKDF2-SHA512 password, and its
  client id when one is bound); one without a username is anonymous, let in by `allow_anonymous`.
- Authorisation asks dynamic security first. The first ACL of the client's roles (by priority) that
  matches decides; when none matches and the default access is deny, the plugin *defers* and the
  acl_file decides. The 2.0 acl_file checks publish and delivery only: it never refuses a SUBSCRIBE.
- Dynamic-security ACL topics are plain topic filters: no `%c`/`%u`. A rule per client id therefore
  lives in the acl_file as `pattern` lines, and every role other than provisioning ends with explicit
  denies, so dynamic security never defers for those clients and the patterns cannot widen them.

The resulting difference from the embedded broker, for provisioning clients only: a SUBSCRIBE to
another client's response topic is accepted (nothing the acl_file can refuse), but nothing published
there is ever delivered to it. docs/SECURITY.md has the table.
"""

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from broker import acl
from broker.auth import PROVISION_USERNAME, check_bridge_username
from broker.errors import BrokerConfigError
from provwire.topics import SHARED_PREFIX, presence_subscription

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"

# Mosquitto cannot ignore a password the way the embedded broker does for `provision`: a dynamic
# security client always has one. It is public: provisioning clients prove nothing by it.
PROVISION_PASSWORD = "provision"

# Mosquitto's own default for dynamic-security clients (the tokens the bridge mirrors get it too).
# Every password hashed here is either public (`provision`) or 256 random bits (the bridge secret,
# ops passwords), so more iterations would only slow each CONNECT down.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12

BRIDGE_ROLE = "provbridge-bridge"
OPS_ROLE = "provbridge-ops"
PROVISIONING_ROLE = "provbridge-provisioning"
PROVISIONING_GROUP = "provbridge-provisioning"
DEVICE_ROLE_PREFIX = "provbridge-device:"
DEVICE_TEXTNAME = "provbridge device"

CONF_FILE = "mosquitto.conf"
DYNSEC_FILE = "dynamic-security.json"
ACL_FILE = "provisioning.acl"

# Sized for provisioning bursts: claims wait in the bridge's persistent session while it is away
# or busy, and Mosquitto's default of 1000 queued messages would silently drop the rest.
MAX_QUEUED_MESSAGES = 100_000
# QoS 1 messages in flight per client: the bridge acknowledges a claim only once it is answered.
MAX_INFLIGHT_MESSAGES = 256
PERSISTENT_CLIENT_EXPIRATION = "7d"

# A placeholder client id run through `acl.provisioning_grant`, turned into `%c` / `+` afterwards.
_CLIENT_ID_PLACEHOLDER = "provbridge.client-id.placeholder"
# Every role but provisioning ends with these: `#` does not match `$`-topics, so they are named too.
CLOSING_DENY_FILTERS = ("#", "$SYS/#", "$CONTROL/#", "$share/#")
ALLOW_PRIORITY = 10
DENY_PRIORITY = 0


class AclType(StrEnum):
    """Dynamic-security ACL types (the plugin's own names)."""

    PUBLISH = "publishClientSend"
    RECEIVE = "publishClientReceive"
    SUBSCRIBE = "subscribePattern"


_GRANT_FIELDS = ((AclType.PUBLISH, "publish"), (AclType.SUBSCRIBE, "subscribe"), (AclType.RECEIVE, "receive"))


# --- passwords ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasswordHash:
    """A dynamic-security password: base64 PBKDF2-HMAC-SHA512 (64 bytes) over base64 salt bytes."""

    password: str = field(repr=False)
    salt: str
    iterations: int

    def to_json(self) -> dict[str, Any]:
        return {"password": self.password, "salt": self.salt, "iterations": self.iterations}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PasswordHash":
        return cls(str(data["password"]), str(data["salt"]), int(data["iterations"]))


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> PasswordHash:
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return PasswordHash(base64.b64encode(digest).decode(), base64.b64encode(salt).decode(), iterations)


def password_matches(password: str, stored: PasswordHash) -> bool:
    again = hash_password(password, base64.b64decode(stored.salt), stored.iterations)
    return hmac.compare_digest(again.password, stored.password)


# --- roles, from the role table in broker.acl -------------------------------------------------


def acl_entry(acltype: AclType, topic: str, allow: bool = True) -> dict[str, Any]:
    return {
        "acltype": acltype.value,
        "topic": topic,
        "priority": ALLOW_PRIORITY if allow else DENY_PRIORITY,
        "allow": allow,
    }


def closing_denies(types: Iterable[AclType] = tuple(AclType)) -> list[dict[str, Any]]:
    return [acl_entry(t, f, allow=False) for t in types for f in CLOSING_DENY_FILTERS]


def grant_acls(grant: acl.Grant) -> list[dict[str, Any]]:
    """A role's ACLs: exactly what `grant` allows, then denies for everything else.

    Subscribe filters become `subscribePattern`: the plugin checks that the requested filter is covered
    by the allowed one, like `acl.filter_covers`.
    """
    allowed = [acl_entry(t, f) for t, name in _GRANT_FIELDS for f in getattr(grant, name)]
    return allowed + closing_denies()


def allowed_filters(role: Mapping[str, Any]) -> dict[AclType, set[str]]:
    """What a role allows, by ACL type (for comparing a role with the `Grant` it came from)."""
    result: dict[AclType, set[str]] = {t: set() for t in AclType}
    for entry in role["acls"]:
        if entry["allow"]:
            result[AclType(entry["acltype"])].add(entry["topic"])
    return result


def role(rolename: str, acls: list[dict[str, Any]], textname: str) -> dict[str, Any]:
    return {"rolename": rolename, "textname": textname, "acls": acls}


def control_acls() -> list[dict[str, Any]]:
    """What the bridge needs to drive the plugin. The plugin grants `$CONTROL` only explicitly."""
    return [
        acl_entry(AclType.PUBLISH, CONTROL_TOPIC),
        acl_entry(AclType.SUBSCRIBE, CONTROL_RESPONSE_TOPIC),
        acl_entry(AclType.RECEIVE, CONTROL_RESPONSE_TOPIC),
    ]


def shared_presence_filter(prefix: str) -> str:
    """The presence topics as several bridge processes share them, like their claims: on Mosquitto, where the
    provbridge_jwt plugin publishes presence to subscribers (the embedded broker hands it to its one bridge
    in-process). Mosquitto checks a shared SUBSCRIBE with its `$share/<group>/`, and each delivery by the topic
    alone, which `acl.bridge_grant` lets the bridge receive."""
    return f"{SHARED_PREFIX}/+/{presence_subscription(prefix)}"


def bridge_role(prefix: str, username: str) -> dict[str, Any]:
    """`acl.bridge_grant` plus the dynamic-security control topics and shared presence, and nothing else."""
    grant = acl.bridge_grant(prefix, username)
    shared = shared_presence_filter(prefix)
    presence = [] if shared in grant.subscribe else [acl_entry(AclType.SUBSCRIBE, shared)]
    acls = control_acls() + presence + grant_acls(grant)
    return role(BRIDGE_ROLE, acls, "provbridge bridge service account")


def ops_role(prefix: str) -> dict[str, Any]:
    return role(OPS_ROLE, grant_acls(acl.ops_grant(prefix, "ops")), "provbridge ops: read events and status")


def device_grant(device_id: str, publish: Iterable[str], subscribe: Iterable[str], expires_at: int) -> acl.Grant:
    """The grant a device token carries, decided by the same function the embedded broker uses."""
    claims = {"acl": {"pub": list(publish), "sub": list(subscribe)}, "exp": expires_at}
    return acl.device_grant(device_id, claims)


def device_role_name(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


def device_role(device_id: str, grant: acl.Grant) -> dict[str, Any]:
    return role(device_role_name(device_id), grant_acls(grant), DEVICE_TEXTNAME)


@dataclass(frozen=True)
class ProvisioningRules:
    """`acl.provisioning_grant` written for Mosquitto: `%c` where the client id goes."""

    publish: tuple[str, ...]  # acl_file `pattern write`
    receive: tuple[str, ...]  # acl_file `pattern read`
    subscribe: tuple[str, ...]  # dynamic-security subscribePattern: `+` where the client id goes


def _substitute(topic_filter: str, by: str) -> str:
    return "/".join(by if level == _CLIENT_ID_PLACEHOLDER else level for level in topic_filter.split("/"))


def provisioning_rules(prefix: str) -> ProvisioningRules:
    grant = acl.provisioning_grant(prefix, _CLIENT_ID_PLACEHOLDER)
    return ProvisioningRules(
        publish=tuple(_substitute(f, "%c") for f in grant.publish),
        receive=tuple(_substitute(f, "%c") for f in grant.receive),
        subscribe=tuple(_substitute(f, "+") for f in grant.subscribe),
    )


def provisioning_role(prefix: str) -> dict[str, Any]:
    """Subscribe rules only: publish and delivery must fall through to the acl_file's patterns."""
    rules = provisioning_rules(prefix)
    acls = [acl_entry(AclType.SUBSCRIBE, f) for f in rules.subscribe] + closing_denies([AclType.SUBSCRIBE])
    return role(PROVISIONING_ROLE, acls, "provbridge provisioning clients (anonymous and 'provision')")


def acl_file_text(prefix: str) -> str:
    rules = provisioning_rules(prefix)
    lines = [
        "# Generated by `provbridge mosquitto-config` from broker/acl.py: do not edit, regenerate.",
        "# Provisioning clients only (anonymous, or username 'provision'): Mosquitto's dynamic-security",
        "# plugin has no %c, so their per-client-id rules live here. Every other account's roles end",
        "# with explicit denies, so these patterns never apply to them.",
    ]
    lines += [f"pattern write {f}" for f in rules.publish]
    lines += [f"pattern read {f}" for f in rules.receive]
    return "\n".join(lines) + "\n"


# --- the dynamic-security state -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DynsecAccounts:
    prefix: str
    bridge_username: str
    bridge_password: PasswordHash
    provision_password: PasswordHash
    ops_users: Mapping[str, PasswordHash] = field(default_factory=dict)
    allow_anonymous: bool = True


def _client(username: str, password: PasswordHash, rolename: str, textname: str) -> dict[str, Any]:
    return {"username": username, "textname": textname, **password.to_json(), "roles": [{"rolename": rolename}]}


def dynsec_config(accounts: DynsecAccounts) -> dict[str, Any]:
    """The plugin's JSON state for the fixed accounts; device clients are added at run time."""
    acl.check_prefix(accounts.prefix)
    check_bridge_username(accounts.bridge_username)
    clients = [
        _client(accounts.bridge_username, accounts.bridge_password, BRIDGE_ROLE, "provbridge bridge"),
        _client(PROVISION_USERNAME, accounts.provision_password, PROVISIONING_ROLE, "provisioning clients"),
    ]
    for name in sorted(accounts.ops_users):
        clients.append(_client(name, accounts.ops_users[name], OPS_ROLE, "provbridge ops user"))
    config: dict[str, Any] = {
        "clients": clients,
        "groups": [{"groupname": PROVISIONING_GROUP, "roles": [{"rolename": PROVISIONING_ROLE}]}],
        "roles": [
            bridge_role(accounts.prefix, accounts.bridge_username),
            provisioning_role(accounts.prefix),
            ops_role(accounts.prefix),
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,  # unsubscribing from what one may not read harms no one
        },
    }
    if accounts.allow_anonymous:
        config["anonymousGroup"] = PROVISIONING_GROUP
    return config


def is_device_client(client: Mapping[str, Any]) -> bool:
    return client.get("textname") == DEVICE_TEXTNAME


def carry_over_devices(fresh: dict[str, Any], existing: Mapping[str, Any]) -> dict[str, Any]:
    """`fresh` plus the device clients and roles the bridge mirrored into `existing`.

    Regenerating the file (new bridge secret, new ops user) must not log every device out.
    """
    names = {c["username"] for c in fresh["clients"]}
    devices = [c for c in existing.get("clients", []) if is_device_client(c) and c.get("username") not in names]
    roles = {r["rolename"] for r in fresh["roles"]}
    device_roles = [
        r
        for r in existing.get("roles", [])
        if str(r.get("rolename", "")).startswith(DEVICE_ROLE_PREFIX) and r["rolename"] not in roles
    ]
    return {**fresh, "clients": fresh["clients"] + devices, "roles": fresh["roles"] + device_roles}


# --- mosquitto.conf -------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsListener:
    port: int
    cafile: str
    certfile: str
    keyfile: str


@dataclass(frozen=True)
class CertificateListener:
    """Devices with a client certificate of the device CA (`cafile`), the TLS listener's certificate and key.

    `require_certificate` without `use_identity_as_username`, on purpose: Mosquitto 2.0.11 skips every
    plugin's basic-auth check on a `use_identity_as_username` listener (src/handle_connect.c: "Authentication
    assumed to be cleared"), so a revoked device could not be refused at CONNECT. Here the device sends
    username = client id = its device id, and the provbridge_jwt plugin, which sees the verified certificate
    (`mosquitto_client_certificate`), checks that the certificate's CN is that id, reads the scope from the
    certificate and refuses a revoked device at CONNECT.
    """

    port: int
    cafile: str
    certfile: str
    keyfile: str

    def lines(self, bind: str) -> list[str]:
        return [
            "# Device certificates: only the device CA's, never the server CA's; the provbridge_jwt plugin",
            "# authenticates them (CN = username = client id) and reads their scope (docs/SECURITY.md 3.6).",
            f"listener {self.port} {bind}",
            f"cafile {_check_word('device CA file', self.cafile)}",
            f"certfile {_check_word('certfile', self.certfile)}",
            f"keyfile {_check_word('keyfile', self.keyfile)}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "",
        ]


@dataclass(frozen=True, kw_only=True)
class JwtPlugin:
    """`broker.mosquitto_auth = "jwt"`: the provbridge_jwt plugin (bridge/mosquitto/jwt) verifies device tokens.

    Its `plugin` line comes before dynamic security's, so it decides every device CONNECT and ACL check
    and defers all other clients to dynamic security and the acl_file, as in "dynsec" mode.
    """

    plugin: str
    jwks_file: str
    denylist_file: str
    audience: str
    issuer: str
    # Publishes a second and burst per client id, for every client but the bridge (`bridge_username`);
    # a rate of 0: no limit in Mosquitto. Looser than the bridge's own, which answers rate_limited first.
    bridge_username: str = ""
    publish_rate: float = 0.0
    publish_burst: int = 0
    # The topic prefix: the plugin publishes device presence on {prefix}/presence/{device_id} (like the embedded
    # broker); "": none (the plugin takes a config without it, as written before presence).
    topic_prefix: str = ""

    def lines(self) -> list[str]:
        lines = [
            f"plugin {_check_word('plugin', self.plugin)}",
            f"plugin_opt_jwks_file {_check_word('jwks file', self.jwks_file)}",
            f"plugin_opt_denylist_file {_check_word('denylist file', self.denylist_file)}",
            f"plugin_opt_audience {_check_word('token audience', self.audience)}",
            f"plugin_opt_issuer {_check_word('token issuer', self.issuer)}",
        ]
        if self.bridge_username:
            lines.append(f"plugin_opt_bridge_username {_check_word('bridge username', self.bridge_username)}")
        if self.topic_prefix:
            prefix = _check_word("topic prefix", acl.check_prefix(self.topic_prefix))
            lines.append(f"plugin_opt_topic_prefix {prefix}")
        if self.publish_rate > 0 and self.publish_burst >= 1:
            if not self.bridge_username:
                raise BrokerConfigError("a publish limit in the jwt plugin needs the bridge username (exempt from it)")
            lines += [
                "# Per client id, every client but the bridge: beyond, Mosquitto drops the publish (docs/SECURITY.md).",
                f"plugin_opt_publish_rate {self.publish_rate:g}",
                f"plugin_opt_publish_burst {self.publish_burst}",
            ]
        return lines


@dataclass(frozen=True, kw_only=True)
class ConfSettings:
    """Paths are as Mosquitto sees them (in a container they differ from where they were written)."""

    bind: str
    port: int | None  # None: no plain listener
    tls: TlsListener | None
    broker_dir: str
    plugin: str
    allow_anonymous: bool
    user: str | None = None
    jwt: JwtPlugin | None = None  # device tokens verified in Mosquitto instead of mirrored
    certificates: CertificateListener | None = None  # needs `jwt`: the plugin authenticates certificates
    max_packet_size: int | None = None  # bytes; None: Mosquitto's default, no limit


_NO_SPACE = re.compile(r"\S+")


def _check_word(what: str, value: str) -> str:
    # mosquitto.conf has no quoting: a value with a space would be cut at it.
    if _NO_SPACE.fullmatch(value) is None:
        raise BrokerConfigError(f"{what} {value!r} must be non-empty and contain no whitespace")
    return value


def mosquitto_conf_text(conf: ConfSettings) -> str:
    if conf.port is None and conf.tls is None:
        raise BrokerConfigError("no listener: give a plain port, a TLS listener, or both")
    if conf.certificates is not None and conf.jwt is None:
        # Without the plugin a certificate's scope is read by nobody: dynamic security would decide alone.
        raise BrokerConfigError("a device-certificate listener needs the provbridge_jwt plugin")
    directory = _check_word("broker directory", conf.broker_dir.rstrip("/") or "/")
    base = "" if directory == "/" else directory
    bind = _check_word("listen address", conf.bind)
    lines = [
        "# Generated by `provbridge mosquitto-config` for Mosquitto 2.0: regenerate rather than edit.",
        "# Who may do what is derived from provbridge's role table (broker/acl.py); see docs/SECURITY.md.",
        "per_listener_settings false",
    ]
    if conf.user:
        lines.append(f"user {_check_word('user', conf.user)}")
    lines.append("")
    if conf.port is not None:
        lines += [f"listener {conf.port} {bind}", ""]
    if conf.tls is not None:
        lines += [
            f"listener {conf.tls.port} {bind}",
            f"cafile {_check_word('cafile', conf.tls.cafile)}",
            f"certfile {_check_word('certfile', conf.tls.certfile)}",
            f"keyfile {_check_word('keyfile', conf.tls.keyfile)}",
            "tls_version tlsv1.2",
            "",
        ]
    if conf.certificates is not None:
        lines += conf.certificates.lines(bind)
    lines.append(f"allow_anonymous {'true' if conf.allow_anonymous else 'false'}")
    if conf.jwt is not None:
        lines += conf.jwt.lines()
    lines += [
        f"plugin {_check_word('plugin', conf.plugin)}",
        f"plugin_opt_config_file {base}/{DYNSEC_FILE}",
        f"acl_file {base}/{ACL_FILE}",
        "",
        "# The bridge's persistent session and the claims queued in it survive a restart.",
        "persistence true",
        f"persistence_location {base}/",
        "autosave_interval 60",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "# Small request/answer exchanges otherwise stall on Nagle + delayed ACK.",
        "set_tcp_nodelay true",
    ]
    if conf.max_packet_size is not None:
        lines += [
            "# Any client, even before its CONNECT is accepted, may otherwise send a packet of up to 256 MB.",
            f"max_packet_size {conf.max_packet_size}",
        ]
    lines += [
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    return "\n".join(lines) + "\n"
