"""The ops role: read-only access to events and status, from a file of password digests."""

import hashlib
import json

import pytest

from broker.acl import Access, ops_grant
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
