"""The amqtt plugin enforcing provbridge's roles: authentication and topic ACL in one class.

One class serves both hooks because amqtt loads each configured plugin once and registers it as
an auth plugin and as a topic plugin when it is an instance of both bases
(`PluginManager._load_str_plugins`). The grant decided at CONNECT is kept on the session
(`Session.attributes`, amqtt's slot for plugin-owned data), so every later check reads the same
verified claims without decoding the token again.

Configure it in the amqtt `plugins` section (what `broker.embedded.broker_config` writes):

    plugins:
      broker.plugin.ProvbridgeAclPlugin:
        data_dir: ./data          # jwks.json and bridge.secret are read from here
        prefix: prov/v1
        audience: provbridge-mqtt
        issuer: provbridge
        bridge_username: provbridge-bridge
        allow_anonymous_provisioning: true
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from broker.acl import Access, Grant, Role
from broker.auth import (
    BRIDGE_SECRET_FILE_NAME,
    DEFAULT_AUDIENCE,
    DEFAULT_BRIDGE_USERNAME,
    DEFAULT_ISSUER,
    JWKS_FILE_NAME,
    OPS_USERS_FILE_NAME,
    Authenticator,
    AuthSettings,
)
from broker.denylist import DENYLIST_FILE_NAME
from broker.errors import ConnectRefused
from provwire.topics import DEFAULT_PREFIX

GRANT_ATTRIBUTE = "provbridge.grant"
REFUSAL_ATTRIBUTE = "provbridge.refusal"
REFUSAL_CODE_ATTRIBUTE = "provbridge.refusal_code"  # the CONNACK return code of a refused CONNECT
# Set by ProvbridgeBroker on every CONNECT: the DER client certificate of a connection on the certificate
# listener (verified against the device CA in the handshake), None on every other listener.
CERTIFICATE_ATTRIBUTE = "provbridge.client_certificate"
logger = logging.getLogger(__name__)


def grant_of(session: Any) -> Grant | None:
    """The grant a session was given at CONNECT, or None if it was not (or not yet) authenticated."""
    grant = session.attributes.get(GRANT_ATTRIBUTE)
    return grant if isinstance(grant, Grant) else None


class ProvbridgeAclPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    @dataclass
    class Config:
        data_dir: str
        jwks_file: str | None = None  # default: <data_dir>/jwks.json
        bridge_secret_file: str | None = None  # default: <data_dir>/bridge.secret
        ops_users_file: str | None = None  # default: <data_dir>/ops_users.json
        denylist_file: str | None = None  # default: <data_dir>/denylist.json
        prefix: str = DEFAULT_PREFIX
        audience: str = DEFAULT_AUDIENCE
        issuer: str = DEFAULT_ISSUER
        bridge_username: str = DEFAULT_BRIDGE_USERNAME
        allow_anonymous_provisioning: bool = True

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        config: ProvbridgeAclPlugin.Config = context.config
        data_dir = Path(config.data_dir)
        self.authenticator = Authenticator(
            AuthSettings(
                jwks_file=Path(config.jwks_file or data_dir / JWKS_FILE_NAME),
                bridge_secret_file=Path(config.bridge_secret_file or data_dir / BRIDGE_SECRET_FILE_NAME),
                ops_users_file=Path(config.ops_users_file or data_dir / OPS_USERS_FILE_NAME),
                denylist_file=Path(config.denylist_file or data_dir / DENYLIST_FILE_NAME),
                prefix=config.prefix,
                audience=config.audience,
                issuer=config.issuer,
                bridge_username=config.bridge_username,
                allow_anonymous_provisioning=config.allow_anonymous_provisioning,
            )
        )

    async def authenticate(self, *, session: Any) -> bool:
        # A resumed session object is reused by amqtt: never let an earlier grant survive a new CONNECT.
        session.attributes.pop(GRANT_ATTRIBUTE, None)
        session.attributes.pop(REFUSAL_ATTRIBUTE, None)
        session.attributes.pop(REFUSAL_CODE_ATTRIBUTE, None)
        certificate = session.attributes.get(CERTIFICATE_ATTRIBUTE)
        try:
            if certificate is not None:  # the certificate listener: only devices by their certificate
                grant = self.authenticator.authenticate_certificate(
                    client_id=session.client_id or "", username=session.username, certificate=certificate
                )
            else:
                grant = self.authenticator.authenticate(
                    client_id=session.client_id or "", username=session.username, password=session.password
                )
            # amqtt publishes a will without any ACL check, so vet it here, as Mosquitto does.
            if session.will_flag and not grant.permits(Access.PUBLISH, session.will_topic or "", time.time()):
                raise ConnectRefused("will topic is not one this client may publish to")
        except ConnectRefused as exc:
            session.attributes[REFUSAL_ATTRIBUTE] = exc.reason
            session.attributes[REFUSAL_CODE_ATTRIBUTE] = exc.return_code
            logger.debug("CONNECT refused for client id %r: %s", session.client_id, exc.reason)
            return False
        session.attributes[GRANT_ATTRIBUTE] = grant
        # amqtt neither queues messages for nor keeps disconnected sessions of anonymous clients.
        session.is_anonymous = grant.role is Role.PROVISIONING
        return True

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None, action: Any = None) -> bool:
        grant = None if session is None else grant_of(session)
        if grant is None or topic is None or action is None:
            return False
        now = time.time()
        if self._is_presence(topic) and (grant.role not in (Role.BRIDGE, Role.OPS) or str(action) == "publish"):
            return False  # the bridge's and ops' business only, and only the broker says them
        # A revoked device keeps its verified grant until its token expires: the denylist ends it sooner.
        return grant.permits(Access(str(action)), topic, now) and not self.authenticator.is_revoked(grant, now)

    def _is_presence(self, topic: str) -> bool:
        head = f"{self.authenticator.settings.prefix}/presence/"
        return topic.startswith(head)
