"""RabbitMQ 3.10 configuration for provbridge, as pure functions over data (`provbridge rabbitmq-config` writes it).

What every node of the cluster gets:

    rabbitmq.conf lines    the MQTT plugin on the vhost and exchange the bridge uses; anonymous MQTT clients logged in
                           as the claimant user; device tokens verified by the OAuth 2 backend (ES256, each token key
                           by its kid, the token audience as `resource_server_id`), then the internal users
    definitions.json       imported at boot: the vhost, the bridge user and the claimant user with their permissions
    enabled_plugins        rabbitmq_mqtt, rabbitmq_auth_backend_oauth2, rabbitmq_management

How permissions come out (checked against 3.10.8 on a 3-node cluster, tests/test_rabbitmq_*.py):

- A device logs in with its token; its permissions are its token's scopes (bridge/rabbitmq_scopes.py): its profile's
  topics, its refresh and response topics, its own subscription queues. It reaches no other queue or exchange.
- Provisioning clients (no token) are the claimant user: they may publish on any claim or token-refresh topic and
  read any response topic, nothing else. Not their own only, as Mosquitto's `%c` patterns give: RabbitMQ's
  `{client_id}` expansion puts the client id into the permission's regular expression unescaped, so a client id such
  as `.*|.*` would match every topic, provisioning keys on claim topics included. Answers are sealed to the claiming
  device's key, so what another provisioning client can read there is no secret (docs/SECURITY.md 3.7). Their
  subscription queues are any but a device's (`dev_...`): none resumes a device's persistent session.
- The bridge user declares and consumes the claim queue and publishes to the exchange; it is tagged `administrator`
  because RabbitMQ's management API closes another user's connections for administrators only.
"""

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from bridge.rabbitmq_scopes import routing_key

CLAIMANT_USER = "provbridge-claimant"
PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_backend_oauth2", "rabbitmq_management")
HASHING = "rabbit_password_hashing_sha256"


@dataclass(frozen=True)
class RabbitConfig:
    """Everything the files are made from."""

    vhost: str
    exchange: str
    queue: str
    prefix: str  # the topic prefix
    audience: str  # the token audience: RabbitMQ's resource_server_id
    bridge_user: str
    bridge_password_hash: str = field(repr=False)
    claimant_password: str = field(repr=False)  # in rabbitmq.conf as mqtt.default_pass: RabbitMQ needs it in clear
    signing_keys: dict[str, str]  # kid -> the path of its public key's PEM, as the nodes see it
    definitions_path: str
    allow_anonymous: bool = True


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt || SHA-256(salt || password)), a 4-byte salt."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode("ascii")


def claimant_password(bridge_secret: str) -> str:
    """The claimant user's password, derived from the bridge secret: the same on every run of `rabbitmq-config`, so
    nodes configured by an earlier run keep logging anonymous clients in after `definitions.json` is imported."""
    digest = hmac.new(bridge_secret.encode("utf-8"), b"provbridge rabbitmq claimant", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _exactly(*names: str) -> str:
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def claimant_topics(prefix: str) -> tuple[str, str]:
    """The claimant's (write, read) topic permissions: any one claim or token-refresh topic (a device whose token
    expired refreshes as a provisioning client), any one response topic; no wildcard."""
    head = re.escape(routing_key(prefix))
    one_level = r"[^.*#]+"
    return f"^{head}\\.(claim|token)\\.{one_level}$", f"^{head}\\.res\\.{one_level}$"


def definitions(config: RabbitConfig) -> dict[str, Any]:
    write, read = claimant_topics(config.prefix)
    # Not a device's queues (device ids start with `dev_`): a provisioning client connecting with a device's client id
    # and a persistent session would otherwise resume that device's queue and read what waits in it.
    subscription_queues = r"^mqtt-subscription-(?!dev_).*$"
    return {
        "vhosts": [{"name": config.vhost}],
        "users": [
            {
                "name": config.bridge_user,
                "password_hash": config.bridge_password_hash,
                "hashing_algorithm": HASHING,
                "tags": ["administrator"],
            },
            {
                "name": CLAIMANT_USER,
                "password_hash": password_hash(config.claimant_password),
                "hashing_algorithm": HASHING,
                "tags": [],
            },
        ],
        "permissions": [
            {
                "user": config.bridge_user,
                "vhost": config.vhost,
                "configure": _exactly(config.queue),
                "write": _exactly(config.exchange, config.queue),
                "read": _exactly(config.exchange, config.queue),
            },
            {
                "user": CLAIMANT_USER,
                "vhost": config.vhost,
                "configure": subscription_queues,
                "write": f"^({re.escape(config.exchange)}|mqtt-subscription-(?!dev_).*)$",
                "read": f"^({re.escape(config.exchange)}|mqtt-subscription-(?!dev_).*)$",
            },
        ],
        "topic_permissions": [
            {"user": CLAIMANT_USER, "vhost": config.vhost, "exchange": config.exchange, "write": write, "read": read}
        ],
    }


def rabbitmq_conf(config: RabbitConfig) -> str:
    lines = [
        "# provbridge (`provbridge rabbitmq-config`): add to every node's rabbitmq.conf",
        f"load_definitions = {config.definitions_path}",
        f"mqtt.vhost = {config.vhost}",
        f"mqtt.exchange = {config.exchange}",
        f"mqtt.allow_anonymous = {str(config.allow_anonymous).lower()}",
        f"mqtt.default_user = {CLAIMANT_USER}",
        f"mqtt.default_pass = {config.claimant_password}",
        "auth_backends.1 = rabbit_auth_backend_oauth2",
        "auth_backends.2 = internal",
        f"auth_oauth2.resource_server_id = {config.audience}",
        "auth_oauth2.algorithms.1 = ES256",
        *(f"auth_oauth2.signing_keys.{kid} = {path}" for kid, path in sorted(config.signing_keys.items())),
    ]
    return "\n".join(lines) + "\n"


def enabled_plugins() -> str:
    return f"[{','.join(PLUGINS)}].\n"
