"""Role grants: ops reads events and status only; a provisioning client only its own topics."""

import hashlib
import json

import pytest

from broker.acl import Access, ops_grant, provisioning_grant
from broker.auth import parse_ops_users


def test_ops_grant_reads_events_and_status_only() -> None:
    grant = ops_grant("prov/v1", "night-shift")
    assert grant.permits(Access.SUBSCRIBE, "prov/v1/events/#", 0)
    assert grant.permits(Access.RECEIVE, "prov/v1/events/acme/device.provisioned", 0)
    assert grant.permits(Access.RECEIVE, "prov/v1/status/bridge", 0)
    assert not grant.permits(Access.PUBLISH, "prov/v1/events/acme/device.provisioned", 0)
    assert not grant.permits(Access.SUBSCRIBE, "prov/v1/res/+", 0)
    assert not grant.permits(Access.SUBSCRIBE, "#", 0)


def test_ops_users_file_is_parsed_strictly() -> None:
    digest = hashlib.sha256(b"pw").hexdigest()
    assert parse_ops_users(json.dumps({"users": {"a": digest}}).encode()) == {"a": bytes.fromhex(digest)}
    for bad in (b"[]", b'{"users": []}', b"{}", b"not json", b'{"users": {"a": "zz"}}'):
        with pytest.raises(ValueError):
            parse_ops_users(bad)


def test_provisioning_client_may_use_only_its_own_claim_token_and_response_topics() -> None:
    grant = provisioning_grant("prov/v1", "me")
    assert grant.permits(Access.PUBLISH, "prov/v1/claim/me", 0)
    assert grant.permits(Access.PUBLISH, "prov/v1/token/me", 0)
    assert grant.permits(Access.SUBSCRIBE, "prov/v1/res/me", 0)
    for topic in ("prov/v1/claim/you", "prov/v1/token/you", "prov/v1/res/me", "prov/v1/events/x/y"):
        assert not grant.permits(Access.PUBLISH, topic, 0), topic
    for topic_filter in ("prov/v1/res/you", "prov/v1/res/+", "prov/v1/events/#", "#"):
        assert not grant.permits(Access.SUBSCRIBE, topic_filter, 0), topic_filter
