"""The embedded MQTT broker of provbridge: amqtt, hardened, with provbridge's roles as its ACL.

    settings = EmbeddedBrokerSettings(data_dir=Path("data"))
    broker = await start_embedded_broker(settings)
    ...
    await stop_embedded_broker(broker)

or `run_broker_forever(settings)` to block until SIGINT/SIGTERM. The roles are in `broker.acl`.
"""

from broker.acl import Access, Grant, Role, filter_covers, topic_matches
from broker.embedded import (
    EmbeddedBrokerSettings,
    broker_config,
    run_broker_forever,
    start_embedded_broker,
    stop_embedded_broker,
)
from broker.errors import BrokerConfigError, BrokerStartError, ConnectRefused
from broker.plugin import ProvbridgeAclPlugin
from broker.server import ProvbridgeBroker

__all__ = [
    "Access",
    "BrokerConfigError",
    "BrokerStartError",
    "ConnectRefused",
    "EmbeddedBrokerSettings",
    "Grant",
    "ProvbridgeAclPlugin",
    "ProvbridgeBroker",
    "Role",
    "broker_config",
    "filter_covers",
    "run_broker_forever",
    "start_embedded_broker",
    "stop_embedded_broker",
    "topic_matches",
]
