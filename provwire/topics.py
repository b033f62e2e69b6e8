"""Topic names of protocol v1. Everything hangs off a configurable prefix (default `prov/v1`)."""

import re

DEFAULT_PREFIX = "prov/v1"
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def is_valid_client_id(client_id: str) -> bool:
    return CLIENT_ID_RE.fullmatch(client_id) is not None


def claim_topic(prefix: str, client_id: str) -> str:
    return f"{prefix}/claim/{client_id}"


def response_topic(prefix: str, client_id: str) -> str:
    return f"{prefix}/res/{client_id}"


def claim_subscription(prefix: str) -> str:
    return f"{prefix}/claim/+"


def event_topic(prefix: str, tenant: str, event: str) -> str:
    return f"{prefix}/events/{tenant}/{event}"


def status_topic(prefix: str) -> str:
    return f"{prefix}/status/bridge"


def client_id_of_claim_topic(prefix: str, topic: str) -> str | None:
    """The client id segment of a claim topic, or None when the topic is not one."""
    head = f"{prefix}/claim/"
    if not topic.startswith(head):
        return None
    return topic[len(head) :]
