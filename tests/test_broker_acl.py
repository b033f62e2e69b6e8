"""The pure ACL layer: MQTT matching, filter coverage and each role's grant."""

import pytest

from broker.acl import (
    Access,
    Role,
    bridge_grant,
    check_prefix,
    device_grant,
    filter_covers,
    is_valid_filter,
    may_take_over,
    provisioning_grant,
    topic_matches,
)
from broker.errors import BrokerConfigError, ConnectRefused

NOW = 1_700_000_000.0
P = "prov/v1"


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/#", "a", True),  # `#` includes the parent level
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "a/b", True),
        ("+", "/a", False),
        ("+/a", "/a", True),  # an empty level is a level
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b#", "a/b#", False),  # invalid filter matches nothing
        ("a/#/b", "a/x/b", False),
        ("a/+", "a/+", False),  # a topic name cannot hold a wildcard
        ("", "a", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("devices/d1/#", "devices/d1/+/x", True),
        ("devices/d1/#", "devices/d1/#", True),
        ("devices/d1/#", "devices/d1", True),
        ("devices/d1/#", "devices/#", False),
        ("devices/d1/#", "devices/+/x", False),
        ("devices/+/x", "devices/d1/x", True),
        ("devices/+/x", "devices/+/x", True),
        ("devices/+/x", "devices/#", False),
        ("devices/+/x", "devices/+/x/y", False),
        ("a/+", "a", False),
        ("a/+/#", "a/#", False),  # the request also matches `a`, which `a/+/#` does not
        ("a/b", "a/b", True),
        ("a/b", "a/+", False),
        ("#", "anything/at/all", True),
        ("#", "$SYS/#", False),
        ("+/#", "$share/g/x", False),
        ("$share/+/p/claim/+", "$share/g1/p/claim/+", True),
        ("$share/+/p/claim/+", "$share/g1/p/claim/abc", True),
        ("$share/+/p/claim/+", "$share/g1/p/#", False),
        ("$share/+/p/claim/+", "$share/+/p/claim/+", False),  # wildcard share group is invalid
        ("a/#", "a/b#", False),
    ],
)
def test_filter_covers(allowed: str, requested: str, expected: bool) -> None:
    assert filter_covers(allowed, requested) is expected


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [("a/#", True), ("#", True), ("+", True), ("a/+/b", True), ("a#", False), ("a/#/b", False),
     ("a+/b", False), ("", False), ("a\0b", False), ("$share/g/a/b", True), ("$share/g", False),
     ("$share//a", False), ("$share/+/a", False)],
)  # fmt: skip
def test_is_valid_filter(topic_filter: str, valid: bool) -> None:
    assert is_valid_filter(topic_filter) is valid


def test_bridge_grant() -> None:
    grant = bridge_grant(P, "provbridge-bridge")
    assert grant.role is Role.BRIDGE
    allowed = [
        (Access.SUBSCRIBE, "prov/v1/claim/+"),
        (Access.SUBSCRIBE, "$share/bridges/prov/v1/claim/+"),
        (Access.RECEIVE, "prov/v1/claim/dev-1"),
        (Access.PUBLISH, "prov/v1/res/dev-1"),
        (Access.PUBLISH, "prov/v1/events/acme/device_created"),
        (Access.PUBLISH, "prov/v1/status/bridge"),
        (Access.SUBSCRIBE, "prov/v1/events/#"),  # the admin API relays events to the dashboard
        (Access.RECEIVE, "prov/v1/events/acme/device.provisioned"),
    ]
    denied = [
        (Access.SUBSCRIBE, "#"),
        (Access.SUBSCRIBE, "prov/v1/#"),
        (Access.SUBSCRIBE, "prov/v1/res/+"),
        (Access.PUBLISH, "prov/v1/claim/dev-1"),
        (Access.PUBLISH, "prov/v1/status/other"),
        (Access.RECEIVE, "prov/v1/res/dev-1"),
    ]
    assert all(grant.permits(a, t, NOW) for a, t in allowed)
    assert not any(grant.permits(a, t, NOW) for a, t in denied)


def test_provisioning_grant_is_limited_to_its_own_topics() -> None:
    grant = provisioning_grant(P, "hw-1")
    assert grant.permits(Access.PUBLISH, "prov/v1/claim/hw-1", NOW)
    assert grant.permits(Access.SUBSCRIBE, "prov/v1/res/hw-1", NOW)
    assert grant.permits(Access.RECEIVE, "prov/v1/res/hw-1", NOW)
    for access, topic in [
        (Access.PUBLISH, "prov/v1/claim/hw-2"),
        (Access.PUBLISH, "prov/v1/res/hw-1"),
        (Access.SUBSCRIBE, "prov/v1/res/hw-2"),
        (Access.SUBSCRIBE, "prov/v1/res/+"),
        (Access.SUBSCRIBE, "#"),
        (Access.SUBSCRIBE, "prov/v1/events/#"),
        (Access.SUBSCRIBE, "prov/v1/claim/hw-1"),
        (Access.RECEIVE, "prov/v1/res/hw-2"),
    ]:
        assert not grant.permits(access, topic, NOW), (access, topic)


@pytest.mark.parametrize("client_id", ["", "a/b", "a+", "a#", "with space", "x" * 65, "amqtt/abc"])
def test_provisioning_grant_refuses_client_ids_that_are_not_topic_safe(client_id: str) -> None:
    with pytest.raises(ConnectRefused):
        provisioning_grant(P, client_id)


def _claims(**acl: object) -> dict[str, object]:
    return {"exp": int(NOW) + 60, "sub": "d1", "acl": acl}


def test_device_grant_follows_token_acl_until_exp() -> None:
    grant = device_grant("d1", _claims(pub=["devices/d1/#"], sub=["devices/d1/cmd/#"]))
    assert grant.permits(Access.PUBLISH, "devices/d1/telemetry", NOW)
    assert not grant.permits(Access.PUBLISH, "devices/d2/telemetry", NOW)
    assert grant.permits(Access.SUBSCRIBE, "devices/d1/cmd/+", NOW)
    assert not grant.permits(Access.SUBSCRIBE, "devices/d1/#", NOW)
    assert grant.permits(Access.RECEIVE, "devices/d1/cmd/reboot", NOW)
    assert not grant.permits(Access.RECEIVE, "devices/d1/telemetry", NOW)
    # A token that expires mid-session loses every access.
    assert not grant.permits(Access.PUBLISH, "devices/d1/telemetry", NOW + 60)
    assert not grant.permits(Access.RECEIVE, "devices/d1/cmd/reboot", NOW + 61)


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(NOW) + 60},  # no acl
        {"exp": int(NOW) + 60, "acl": ["devices/#"]},
        _claims(pub="devices/d1/#"),
        _claims(pub=["devices/d1/#", 3]),
        _claims(sub=["devices/#/x"]),
        {"acl": {"pub": []}, "exp": "soon"},
        {"acl": {"pub": []}, "exp": True},
    ],
)
def test_device_grant_refuses_malformed_claims(claims: dict[str, object]) -> None:
    with pytest.raises(ConnectRefused):
        device_grant("d1", claims)


def test_take_over_only_by_the_same_principal_or_from_anonymous() -> None:
    device = device_grant("d1", _claims())
    bridge = bridge_grant(P, "provbridge-bridge")
    anonymous = provisioning_grant(P, "d1")
    assert may_take_over(None, anonymous)
    assert may_take_over(device, device_grant("d1", _claims(pub=["x"])))
    assert may_take_over(anonymous, device)
    assert may_take_over(anonymous, anonymous)
    assert not may_take_over(device, anonymous)
    assert not may_take_over(bridge, anonymous)
    assert not may_take_over(bridge, device)
    assert not may_take_over(device, None)


@pytest.mark.parametrize("prefix", ["", "/prov", "prov/", "prov//v1", "prov/+", "prov/#", "$prov"])
def test_check_prefix_refuses_unusable_prefixes(prefix: str) -> None:
    with pytest.raises(BrokerConfigError):
        check_prefix(prefix)
