"""Revocation (issue 3): `provbridge device revoke` and `key revoke` against a running bridge and embedded broker."""

import json
import time
import uuid

import pytest

from bridge.cli import main as cli
from bridge.config import TOKEN_TTL_CAP_SECONDS
from bridge.ops import admin
from bridge.ops.lifecycle import publish_denylist, revoke_device
from bridge.storage.statefiles import denylist_file
from broker.denylist import Credential, Denylist, Entries, parse_denylist
from provwire import topics
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device
from tests.helpers.mqtt import MqttClient, token_session
from tests.helpers.refresh import provisioned

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


def _events(bridge: Bridge, name: str) -> list[dict[str, object]]:
    return bridge.store.events(event=name, limit=1000)


def _cli(bridge: Bridge, *args: str) -> int:
    return cli.main(["--data-dir", str(bridge.settings.data_dir), *args])


def test_revoked_device_loses_refresh_reclaim_and_reconnect(bridge: Bridge) -> None:
    """Its live session ends too: tests/test_broker_promises.py, the same test on every broker."""
    device, creds = provisioned(bridge)
    assert _cli(bridge, "device", "revoke", device.device_id) == 0

    # Its token, still unexpired, no longer connects.
    with MqttClient(bridge.port, device.device_id, device.device_id, creds.mqtt.token) as again:
        assert not again.connect()

    with device:
        refused = device.send_refresh(device.refresh_payload())
        reclaim = device.claim(bridge.provision_key)
    for answer in (refused, reclaim):
        assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED
    assert _events(bridge, "token.refresh_rejected")[-1]["reason"] == "device_revoked"
    assert _events(bridge, "claim.rejected")[-1]["reason"] == "device_revoked"
    assert bridge.store.device(device.device_id).status == "revoked"

    denied = parse_denylist(denylist_file(bridge.settings.data_dir).read_bytes()).devices
    assert set(denied) == {device.device_id}
    assert denied[device.device_id] >= creds.mqtt.expires_at  # outlives every token it may hold
    assert _events(bridge, "device.revoked")[-1]["device_id"] == device.device_id


def test_other_devices_are_untouched_by_a_revocation(bridge: Bridge) -> None:
    revoked, _ = provisioned(bridge)
    kept, kept_creds = provisioned(bridge)
    revoke_device(bridge.settings, bridge.store, revoked.device_id)
    with token_session(bridge.port, kept_creds.mqtt) as conn:
        assert conn.subscribe(f"devices/{kept.device_id}/#") == [1]
        conn.publish(f"devices/{kept.device_id}/up", b"still here")
        assert conn.next_message() == (f"devices/{kept.device_id}/up", b"still here")
    with kept:
        assert isinstance(kept.send_refresh(kept.refresh_payload()), ClaimOk)


def test_a_claim_right_after_key_revoke_is_denied_while_the_bridge_runs(bridge: Bridge) -> None:
    key, raw = admin.create_key(bridge.store, bridge.settings, admin.KeySpec(tenant="default", name="line-9"), 0)
    with Device(bridge) as first:
        assert isinstance(first.claim(raw), ClaimOk)
    assert _cli(bridge, "key", "revoke", key.id) == 0
    with Device(bridge) as second:
        answer = second.claim(raw)
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED
    event = _events(bridge, "claim.rejected")[-1]
    assert event["reason"] == "key_revoked" and event["hardware_id"] == second.hardware_id


def test_revoking_an_unknown_device_fails_with_a_reason(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(bridge, "device", "revoke", "dev_" + "a" * 26) == 1
    assert "no device" in capsys.readouterr().err
    path = denylist_file(bridge.settings.data_dir)
    assert not path.exists() or parse_denylist(path.read_bytes()) == Entries()


def test_denylist_entries_expire_and_the_file_is_rebuilt_from_the_database(bridge: Bridge) -> None:
    device, _ = provisioned(bridge)
    revoked_at = int(time.time())
    revoke_device(bridge.settings, bridge.store, device.device_id, now=revoked_at)
    path = denylist_file(bridge.settings.data_dir)
    denylist = Denylist(path)
    until = revoked_at + TOKEN_TTL_CAP_SECONDS
    token = Credential(device.device_id)
    assert denylist.refuses(token, until - 1) and not denylist.refuses(token, until)

    path.unlink()  # lost: the next write restores it from the database
    assert publish_denylist(bridge.settings, bridge.store, now=revoked_at + 1) == Entries({device.device_id: until})
    assert publish_denylist(bridge.settings, bridge.store, now=until + 1) == Entries()  # expired entries drop out
    assert json.loads(path.read_text()) == {"devices": {}, "older_credentials": {}}


def test_revocation_reaches_a_device_session_of_a_token_minted_for_another_client_id(bridge: Bridge) -> None:
    """The denylist is by token `sub`, so a revoked device cannot escape it under another client id."""
    device, creds = provisioned(bridge)
    revoke_device(bridge.settings, bridge.store, device.device_id)
    with MqttClient(bridge.port, f"x-{uuid.uuid4().hex[:6]}", device.device_id, creds.mqtt.token) as conn:
        assert not conn.connect()
    with MqttClient(bridge.port, device.device_id, device.device_id, creds.mqtt.token) as conn:
        assert not conn.connect()


def test_provisioning_clients_of_a_revoked_device_can_still_ask_and_be_told_no(bridge: Bridge) -> None:
    device, _ = provisioned(bridge)
    revoke_device(bridge.settings, bridge.store, device.device_id)
    with MqttClient(bridge.port, device.client_id) as conn:  # anonymous provisioning connection
        assert conn.connect()
        assert conn.subscribe(topics.response_topic(bridge.prefix, device.client_id)) == [1]
        conn.publish(topics.token_topic(bridge.prefix, device.client_id), device.refresh_payload())
        answer = ClaimError.model_validate_json(conn.next_message()[1])
    assert answer.code is ErrorCode.PERMISSION_DENIED
