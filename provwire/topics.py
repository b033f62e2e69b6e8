"""Topic names of protocol v1. Everything hangs off a configurable prefix (default `prov/v1`)."""

import re

DEFAULT_PREFIX = "prov/v1"
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
SHARED_PREFIX = "$share"


def is_valid_client_id(client_id: str) -> bool:
    return CLIENT_ID_RE.fullmatch(client_id) is not None


def claim_topic(prefix: str, client_id: str) -> str:
    return f"{prefix}/claim/{client_id}"


def response_topic(prefix: str, client_id: str) -> str:
    return f"{prefix}/res/{client_id}"


def claim_subscription(prefix: str) -> str:
    return f"{prefix}/claim/+"


def token_topic(prefix: str, client_id: str) -> str:
    """Where a provisioned device asks for a fresh token (answered on its response topic)."""
    return f"{prefix}/token/{client_id}"


def token_subscription(prefix: str) -> str:
    return f"{prefix}/token/+"


def event_topic(prefix: str, tenant: str, event: str) -> str:
    return f"{prefix}/events/{tenant}/{event}"


def status_topic(prefix: str) -> str:
    return f"{prefix}/status/bridge"


# A device's connection, as its broker saw it: payload PRESENCE_ONLINE or PRESENCE_OFFLINE (PROTOCOL.md §12).
PRESENCE_ONLINE, PRESENCE_OFFLINE = b"online", b"offline"


def presence_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/presence/{device_id}"


def presence_subscription(prefix: str) -> str:
    return f"{prefix}/presence/+"


def device_id_of_presence_topic(prefix: str, topic: str) -> str | None:
    head = f"{prefix}/presence/"
    rest = topic[len(head) :] if topic.startswith(head) else ""
    return rest if rest and "/" not in rest else None


def client_id_of_claim_topic(prefix: str, topic: str) -> str | None:
    """The client id of a claim topic, or None when the topic is not a claim topic or the id is invalid."""
    return _client_id_after(f"{prefix}/claim/", topic)


def client_id_of_token_topic(prefix: str, topic: str) -> str | None:
    """The client id of a token-refresh topic, or None when it is not one or the id is invalid."""
    return _client_id_after(f"{prefix}/token/", topic)


def _client_id_after(head: str, topic: str) -> str | None:
    if not topic.startswith(head):
        return None
    client_id = topic[len(head) :]
    return client_id if is_valid_client_id(client_id) else None


# --- MQTT topic rules (MQTT 3.1.1 section 4.7), shared by brokers and devices -----------------


def is_valid_topic(topic: str) -> bool:
    """A topic name a PUBLISH may carry: non-empty, no wildcard, no NUL (MQTT 3.1.1 section 4.7)."""
    return bool(topic) and not any(c in topic for c in "+#\0")


def is_valid_filter(topic_filter: str) -> bool:
    """A subscription filter: `#` only as the whole last level, `+` only as a whole level.

    A shared subscription `$share/<group>/<filter>` needs a literal, non-empty group and a filter.
    """
    if not topic_filter or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    if levels[0] == SHARED_PREFIX:
        return len(levels) >= 3 and levels[1] not in ("", "+", "#")
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` is matched by `topic_filter`, the MQTT way.

    Topics starting with `$` are not matched by a filter starting with a wildcard [MQTT-4.7.2-1].
    Invalid filters and topics match nothing.
    """
    if not is_valid_filter(topic_filter) or not is_valid_topic(topic):
        return False
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level: `a/#` matches `a`
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)
