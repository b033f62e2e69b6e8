"""Topic matching and the access rules of the three roles, as data and pure functions.

Nothing here does I/O or knows amqtt, so the same rules can be mirrored to another broker
(a Mosquitto ACL file or dynamic-security role) by reading the `Grant` each role gets:

    role          publish                      subscribe (covered by)              receive
    bridge        {p}/res/+                    {p}/claim/+, {p}/token/+            {p}/claim/+, {p}/token/+
                  {p}/events/#                 $share/<group>/{p}/claim/+
                  {p}/status/bridge            $share/<group>/{p}/token/+
    provisioning  {p}/claim/<own client id>    {p}/res/<own client id>             {p}/res/<own client id>
                  {p}/token/<own client id>
    device        token acl.pub                token acl.sub                       token acl.sub
    ops           (nothing)                    {p}/events/#, {p}/status/#          {p}/events/#, {p}/status/#

`p` is the topic prefix (default `prov/v1`). A device grant also ends at the token's `exp`.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from broker.errors import CONNACK_IDENTIFIER_REJECTED, BrokerConfigError, ConnectRefused
from provwire.topics import (
    SHARED_PREFIX,
    claim_subscription,
    claim_topic,
    is_valid_client_id,
    is_valid_filter,
    is_valid_topic,
    presence_subscription,
    response_topic,
    status_topic,
    token_subscription,
    token_topic,
    topic_matches,
)

__all__ = ["is_valid_filter", "is_valid_topic", "topic_matches"]  # re-exported: the broker's vocabulary


class Access(StrEnum):
    """What a client wants to do with a topic. Values equal amqtt's `Action` values."""

    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


class Role(StrEnum):
    BRIDGE = "bridge"
    PROVISIONING = "provisioning"
    DEVICE = "device"
    OPS = "ops"


def _shared(topic_filter: str) -> tuple[str, str] | None:
    """The group and filter of a `$share/<group>/<filter>` subscription, else None."""
    levels = topic_filter.split("/", 2)
    return (levels[1], levels[2]) if len(levels) == 3 and levels[0] == SHARED_PREFIX else None


def filter_covers(allowed_filter: str, requested_filter: str) -> bool:
    """Whether every topic `requested_filter` can match is also matched by `allowed_filter`.

    `devices/d1/#` covers `devices/d1/+/x` and `devices/d1/#`, not `devices/#` nor `devices/+/x`.
    A shared subscription is covered by a shared filter whose group is `+` or the same group:
    `$share/+/a/#` covers `$share/g1/a/b`.
    """
    shared_allowed, shared_requested = _shared(allowed_filter), _shared(requested_filter)
    if shared_allowed or shared_requested:
        if not shared_allowed or not shared_requested or not is_valid_filter(requested_filter):
            return False
        return shared_allowed[0] in ("+", shared_requested[0]) and filter_covers(shared_allowed[1], shared_requested[1])
    if not is_valid_filter(allowed_filter) or not is_valid_filter(requested_filter):
        return False
    allowed = allowed_filter.split("/")
    requested = requested_filter.split("/")
    # `$x/...` topics escape a leading wildcard, so `#` does not cover `$SYS/#`.
    if requested[0].startswith("$") and allowed[0] in ("+", "#"):
        return False
    for index, level in enumerate(allowed):
        if level == "#":
            return True
        if index >= len(requested):
            return False  # `a/+` does not match `a`, which the shorter request does
        wanted = requested[index]
        if wanted == "#":
            return False  # the request spans any depth from here, the allowed filter does not
        if level != "+" and wanted != level:
            return False  # a literal level covers only the same literal, not `+`
    return len(allowed) == len(requested)


@dataclass(frozen=True)
class Grant:
    """What one authenticated session may do, decided once at CONNECT.

    `principal` names who owns the session's client id: another principal may not take it over.
    """

    role: Role
    principal: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    receive: tuple[str, ...]
    expires_at: int | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # A device's credential, for the denylist (broker/denylist.py): its token's `gen`, or its certificate's serial.
    generation: int = 0
    certificate_serial: str | None = None

    def permits(self, access: Access, topic: str, now: float) -> bool:
        """Whether `access` to `topic` (a filter for SUBSCRIBE, else a topic name) is allowed at `now`."""
        if self.expires_at is not None and now >= self.expires_at:
            return False
        if access is Access.SUBSCRIBE:
            return any(filter_covers(allowed, topic) for allowed in self.subscribe)
        filters = self.publish if access is Access.PUBLISH else self.receive
        return any(topic_matches(allowed, topic) for allowed in filters)


def check_prefix(prefix: str) -> str:
    """The prefix every topic hangs off: plain levels, no wildcard, no `$`, no empty level."""
    levels = prefix.split("/")
    if not prefix or prefix.startswith("$") or not all(levels) or not is_valid_topic(prefix):
        raise BrokerConfigError(f"invalid topic prefix {prefix!r}")
    return prefix


def bridge_grant(prefix: str, username: str) -> Grant:
    """The bridge service account: reads every claim, answers on any response topic, emits events. It also reads
    events back: the admin API (its own process, logged in as the bridge) relays them to the dashboard."""
    claims, refreshes = claim_subscription(prefix), token_subscription(prefix)
    presence = presence_subscription(prefix)  # what the broker says of device connections (only it publishes there)
    events = f"{prefix}/events/#"
    return Grant(
        role=Role.BRIDGE,
        principal=f"bridge:{username}",
        publish=(response_topic(prefix, "+"), events, status_topic(prefix)),
        subscribe=(
            claims,
            refreshes,
            f"{SHARED_PREFIX}/+/{claims}",
            f"{SHARED_PREFIX}/+/{refreshes}",
            presence,
            events,
        ),
        receive=(claims, refreshes, presence, events),
    )


def ops_grant(prefix: str, username: str) -> Grant:
    """A person or tool watching provisioning happen: reads events and status, writes nothing."""
    watched = (f"{prefix}/events/#", f"{prefix}/status/#", presence_subscription(prefix))
    return Grant(role=Role.OPS, principal=f"ops:{username}", publish=(), subscribe=watched, receive=watched)


def provisioning_grant(prefix: str, client_id: str) -> Grant:
    """A device that is not provisioned yet: its own claim topic out, its own response topic in.

    The client id lands in topic names, so it must be a `provwire` client id (no `/`, `+`, `#`).
    Every provisioning client is the same anonymous principal.
    """
    if not is_valid_client_id(client_id):
        # MQTT 3.1.1 [MQTT-3.1.3-9]: a client id the server does not allow gets "identifier rejected".
        raise ConnectRefused("client id is not a valid provisioning client id", CONNACK_IDENTIFIER_REJECTED)
    own_response = response_topic(prefix, client_id)
    return Grant(
        role=Role.PROVISIONING,
        principal="provisioning",
        publish=(claim_topic(prefix, client_id), token_topic(prefix, client_id)),
        subscribe=(own_response,),
        receive=(own_response,),
    )


def _filters(acl: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value: Any = acl.get(key, [])
    if not isinstance(value, list) or not all(isinstance(f, str) and is_valid_filter(f) for f in value):
        raise ConnectRefused(f"token acl.{key} must be a list of topic filters")
    return tuple(value)


def device_grant(device_id: str, claims: Mapping[str, Any], certificate_serial: str | None = None) -> Grant:
    """A provisioned device, from the verified claims of its token (EMQX-style `acl`), or those a certificate
    stands for (`certificate_serial` given).

    It may publish to topics matching `acl.pub`, subscribe to filters covered by `acl.sub` and
    receive topics matching `acl.sub`, until `exp`. A token's `gen` (absent: 0) is its credential
    generation, which the denylist compares (broker/denylist.py).
    """
    acl = claims.get("acl")
    if not isinstance(acl, Mapping):
        raise ConnectRefused("token has no acl object")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise ConnectRefused("token exp is not a number")
    generation = claims.get("gen", 0)
    if (
        isinstance(generation, bool)
        or not isinstance(generation, int | float)
        or not math.isfinite(generation)
        or generation != int(generation)
        or generation < 0
    ):
        raise ConnectRefused("token gen must be a whole number, at least 0")
    subscribe = _filters(acl, "sub")
    return Grant(
        role=Role.DEVICE,
        principal=f"device:{device_id}",
        publish=_filters(acl, "pub"),
        subscribe=subscribe,
        receive=subscribe,
        expires_at=int(exp),  # the same truncation PyJWT applies when it checks exp
        claims=dict(claims),
        generation=int(generation),
        certificate_serial=certificate_serial,
    )


def may_take_over(holder: Grant | None, newcomer: Grant | None) -> bool:
    """Whether a CONNECT granted `newcomer` may take a client id whose session was granted `holder`.

    MQTT lets a new connection take over any client id. Here only the same principal may, except
    that anyone authenticated may displace an anonymous provisioning session squatting an id.
    """
    if holder is None or holder.role is Role.PROVISIONING:
        return True
    return newcomer is not None and newcomer.principal == holder.principal
