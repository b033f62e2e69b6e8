"""MQTT topics as RabbitMQ sees them, and the `scope` claim that gives a device its topics there. Pure.

RabbitMQ's MQTT plugin publishes to a topic exchange (`amq.topic`) and writes an MQTT topic as a routing key by
swapping `/` and `.`: `prov/v1/claim/c.1` is the routing key `prov.v1.claim.c/1` (`routing_key`, `mqtt_topic`).

Its OAuth 2 backend takes a token's permissions from its `scope` claim: one space-separated string of
`<resource_server_id>.<read|write|configure>:<vhost>/<name>[/<routing key>]` patterns, where `*` matches any run of
characters and each part is URL-decoded (rabbit_oauth2_scope.erl, wildcard.erl in rabbitmq-server 3.10). So a
literal `/`, `*`, `%`, `+` or space must be percent-encoded, and `*` is wider than MQTT's `+`: a profile filter with
`+` cannot be written as a scope and is refused (`UnscopableFilter`); `#` at the end becomes a trailing `*` (so
`devices/d1/#` allows `devices.d1.x...` but not the bare `devices.d1`, narrower than MQTT).

A device's scopes name the exchange and the vhost (never `*`): the same token presented to AMQP reaches no other
exchange, and only its own MQTT subscription queues (`mqtt-subscription-<client id>qos0|1`).
"""

from urllib.parse import quote

from bridge.errors import UnscopableFilter
from provwire import topics

MQTT_SUBSCRIPTION_QUEUE = "mqtt-subscription-{client_id}qos*"  # the MQTT plugin's queue per client id and QoS


def routing_key(topic: str) -> str:
    """The routing key RabbitMQ's MQTT plugin gives an MQTT topic (and the other way round: the swap is its own
    inverse)."""
    return topic.translate(_SWAP)


def mqtt_topic(key: str) -> str:
    return key.translate(_SWAP)


_SWAP = str.maketrans({"/": ".", ".": "/"})


def _literal(text: str) -> str:
    """`text` as a scope pattern matching exactly it: URL-encoded, so `/` and `*` and `+` are no syntax."""
    return quote(text, safe="._-~:")


def filter_pattern(topic_filter: str) -> str:
    """The scope pattern of routing keys an MQTT topic filter allows (see the module's notes)."""
    levels = topic_filter.split("/")
    if any("+" in level for level in levels):
        raise UnscopableFilter(f"RabbitMQ scopes cannot express the topic filter {topic_filter!r} ('+')")
    tail = levels[-1] == "#"
    literal = levels[:-1] if tail else levels
    if any("#" in level for level in literal):
        raise UnscopableFilter(f"not a topic filter: {topic_filter!r} ('#' only as the last level)")
    head = ".".join(_literal(level.replace(".", "/")) for level in literal)
    if not tail:
        return head
    return head + ".*" if head else "*"


def device_scopes(
    *,
    resource_server_id: str,
    vhost: str,
    exchange: str,
    prefix: str,
    device_id: str,
    publish: list[str],
    subscribe: list[str],
) -> list[str]:
    """The scopes of a device token: its profile's topics, its token-refresh topic and its response topic, and the
    MQTT plugin's subscription queues of its client id (its client id is its device id)."""
    where = f"{_literal(vhost)}/{_literal(exchange)}"
    queues = f"{_literal(vhost)}/{_literal(MQTT_SUBSCRIPTION_QUEUE.format(client_id=device_id)).replace('%2A', '*')}"
    writes = [filter_pattern(f) for f in [*publish, topics.token_topic(prefix, device_id)]]
    reads = [filter_pattern(f) for f in [*subscribe, topics.response_topic(prefix, device_id)]]
    return [
        *(f"{resource_server_id}.write:{where}/{pattern}" for pattern in dict.fromkeys(writes)),
        *(f"{resource_server_id}.read:{where}/{pattern}" for pattern in dict.fromkeys(reads)),
        *(f"{resource_server_id}.{permission}:{queues}" for permission in ("configure", "write", "read")),
    ]


def binding_key(topic_filter: str) -> str:
    """The AMQP binding key of an MQTT topic filter (`+` is `*`, `#` is `#`): what a queue bound to the MQTT
    plugin's exchange with it receives is what an MQTT subscription to the filter would."""
    words = {"+": "*", "#": "#"}
    return ".".join(words.get(level, level.replace(".", "/")) for level in topic_filter.split("/"))
