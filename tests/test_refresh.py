"""Token refresh (issue 3), through the embedded broker on loopback, real SQLite and real crypto."""

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path

import jwt
import pytest

from bridge.claims.refresh import Refresher
from bridge.errors import MirrorError
from bridge.ops import admin
from bridge.ops.lifecycle import revoke_device
from bridge.tokens import TokenGrant
from device_sim.device import (
    DeviceIdentity,
    claim_over_mqtt,
    connect_with_token,
    device_key_for,
    refresh_over_mqtt,
)
from device_sim.errors import ClaimRejected
from device_sim.fleet import FleetConfig, run_fleet
from device_sim.vault import Vault
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk, Credentials
from tests.helpers.bridge import Bridge
from tests.helpers.mqtt import MqttClient
from tests.helpers.refresh import RefreshingDevice

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


def _events(bridge: Bridge, name: str) -> list[dict[str, object]]:
    return bridge.store.events(event=name, limit=1000)


def _token_claims(token: str) -> dict[str, object]:
    claims: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _connect_and_echo(bridge: Bridge, creds: Credentials) -> None:
    device_id = creds.mqtt.client_id
    with MqttClient(bridge.port, device_id, device_id, creds.mqtt.token) as conn:
        assert conn.connect()
        assert conn.subscribe(f"devices/{device_id}/#") == [1]
        conn.publish(f"devices/{device_id}/up", b"after refresh")
        assert conn.next_message() == (f"devices/{device_id}/up", b"after refresh")


def test_refresh_end_to_end_device_opens_the_answer_and_connects_with_the_new_token(bridge: Bridge) -> None:
    with RefreshingDevice(bridge) as device:
        first = device.provision()
        answer = device.send_refresh(device.refresh_payload())
    assert isinstance(answer, ClaimOk)
    assert answer.device_id == device.device_id and not answer.created
    assert answer.cloud_key_id == device.cloud_kid and answer.profile == "default"
    creds = device.open(answer)  # the same seal as a claim: ECDH + HKDF(request_id) + AES-GCM
    assert creds.api_key == ""  # the API key is only ever shown once
    assert creds.mqtt.token != first.mqtt.token
    old, new = _token_claims(first.mqtt.token), _token_claims(creds.mqtt.token)
    assert new["sub"] == old["sub"] == device.device_id and new["acl"] == old["acl"] and new["jti"] != old["jti"]
    assert creds.mqtt.expires_at == new["exp"]
    _connect_and_echo(bridge, creds)

    [event] = _events(bridge, "token.refreshed")
    assert event["device_id"] == device.device_id and event["hardware_id"] == device.hardware_id
    assert event["request_id"] == answer.request_id and event["client_id"] == device.client_id
    assert creds.mqtt.token not in json.dumps(bridge.store.events(limit=100))


def test_a_replayed_refresh_is_refused(bridge: Bridge) -> None:
    with RefreshingDevice(bridge) as device:
        device.provision()
        payload = device.refresh_payload()
        first = device.send_refresh(payload)
        replay = device.send_refresh(payload)
    assert isinstance(first, ClaimOk)
    assert isinstance(replay, ClaimError) and replay.code is ErrorCode.PERMISSION_DENIED
    assert replay.request_id == first.request_id and replay.message == "token refresh not accepted"
    assert _events(bridge, "token.refresh_rejected")[-1]["reason"] == "replayed"
    assert len(_events(bridge, "token.refreshed")) == 1


def test_tampered_mac_wrong_device_unknown_device_and_stale_timestamps_are_refused_uniformly(bridge: Bridge) -> None:
    with RefreshingDevice(bridge) as other:
        other.provision()
    with RefreshingDevice(bridge) as device:
        device.provision()
        good = json.loads(device.refresh_payload())
        mac = crypto.b64decode(good["mac"])
        tampered = json.dumps(good | {"mac": crypto.b64encode(bytes([mac[0] ^ 1]) + mac[1:])}).encode()
        cases = [
            ("bad_mac", tampered),
            # another device's id, MAC'd with this device's key: it cannot speak for that device
            ("bad_mac", device.refresh_payload(device_id=other.device_id)),
            ("unknown_device", device.refresh_payload(device_id="dev_" + "a" * 26)),
            ("stale_timestamp", device.refresh_payload(timestamp=int(time.time()) - 3600)),
            ("stale_timestamp", device.refresh_payload(timestamp=int(time.time()) + 3600)),
        ]
        answers = [device.send_refresh(payload) for _, payload in cases]
        still_fine = device.send_refresh(device.refresh_payload())
    rejected = _events(bridge, "token.refresh_rejected")
    assert [e["reason"] for e in rejected] == [reason for reason, _ in cases]
    for answer in answers:
        assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED
        assert answer.message == "token refresh not accepted"  # nothing tells a prober which check failed
    assert rejected[2]["tenant"] == "_" and rejected[0]["tenant"] == "default"
    assert isinstance(still_fine, ClaimOk)


def test_invalid_refresh_gets_validation_error_naming_the_field(bridge: Bridge) -> None:
    with RefreshingDevice(bridge) as device:
        device.provision()
        bad = json.loads(device.refresh_payload()) | {"timestamp": "now"}
        answer = device.send_refresh(json.dumps(bad).encode())
        oversized = device.send_refresh(b'{"request_id": "abcdefgh", "pad": "' + b"x" * 2000 + b'"}')
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.VALIDATION_ERROR
    assert answer.request_id == bad["request_id"] and answer.errors and answer.errors[0].field == "timestamp"
    assert isinstance(oversized, ClaimError) and oversized.errors and oversized.errors[0].field == ""
    assert [e["reason"] for e in _events(bridge, "token.refresh_rejected")] == ["validation_error"] * 2


def test_refresh_needs_no_provisioning_key_even_a_revoked_one(bridge: Bridge) -> None:
    key, raw = admin.create_key(bridge.store, bridge.settings, admin.KeySpec(tenant="default", name="line"), 0)
    with RefreshingDevice(bridge) as device:
        answer = device.claim(raw)
        assert isinstance(answer, ClaimOk)
        device.device_id, device.cloud_kid = answer.device_id, answer.cloud_key_id
        admin.revoke_key(bridge.store, key.id, int(time.time()))
        assert isinstance(device.claim(raw), ClaimError)  # a re-claim is refused now ...
        refreshed = device.send_refresh(device.refresh_payload())  # ... a refresh is not
    assert isinstance(refreshed, ClaimOk)
    _connect_and_echo(bridge, device.open(refreshed))


def test_replay_table_forgets_request_ids_once_their_timestamps_are_stale(bridge: Bridge) -> None:
    refresher = Refresher(bridge.settings, bridge.store, bridge.keys)
    with RefreshingDevice(bridge) as device:
        device.provision()
    topic = topics.token_topic(bridge.prefix, device.client_id)
    window = bridge.settings.token.refresh_skew_seconds
    start = int(time.time())
    for step in range(3):
        now = start + step * 10 * window
        outcome = refresher.handle(topic, device.refresh_payload(timestamp=now), now=now)
        assert outcome.answer is not None and json.loads(outcome.answer)["status"] == "ok"
        rows = bridge.store.connection().execute("SELECT COUNT(*) FROM refresh_requests").fetchone()[0]
        assert rows == 1  # each refresh purged the previous one, whose timestamp left the window


class RefusingMirror:
    """A broker mirror that never confirms (a Mosquitto that is down)."""

    def grant(self, device_id: str, grant: TokenGrant) -> None:
        raise MirrorError("broker did not confirm")

    def revoke(self, device_id: str) -> None:
        raise MirrorError("broker did not confirm")


def test_a_broker_that_does_not_take_the_token_gets_internal_error_and_nothing_is_recorded(bridge: Bridge) -> None:
    refresher = Refresher(bridge.settings, bridge.store, bridge.keys, RefusingMirror())
    with RefreshingDevice(bridge) as device:
        device.provision()
    payload = device.refresh_payload()
    outcome = refresher.handle(topics.token_topic(bridge.prefix, device.client_id), payload)
    assert outcome.answer is not None
    error = ClaimError.model_validate_json(outcome.answer)
    assert error.code is ErrorCode.INTERNAL_ERROR and error.retry_after == bridge.settings.claims.retry_after_seconds
    assert bridge.store.connection().execute("SELECT COUNT(*) FROM refresh_requests").fetchone()[0] == 0
    assert _events(bridge, "token.refreshed") == []
    # Rolled back, so the very same request succeeds once the broker is back.
    with MqttClient(bridge.port, device.client_id) as conn:
        assert conn.connect()
        assert conn.subscribe(topics.response_topic(bridge.prefix, device.client_id)) == [1]
        conn.publish(topics.token_topic(bridge.prefix, device.client_id), payload)
        assert json.loads(conn.next_message()[1])["status"] == "ok"


# --- the simulator ------------------------------------------------------------------------------


def test_simulated_device_refreshes_and_connects_with_the_new_token(bridge: Bridge) -> None:
    cloud = bridge.keys.cloud_key.public_key()
    identity = DeviceIdentity.generate(f"sim-{uuid.uuid4().hex[:8]}")
    claimed = claim_over_mqtt("127.0.0.1", bridge.port, identity, bridge.provision_key, cloud, timeout=5)
    refreshed = refresh_over_mqtt("127.0.0.1", bridge.port, identity, claimed.device_id, cloud, timeout=5)
    assert refreshed.device_id == claimed.device_id and not refreshed.created
    assert refreshed.credentials.api_key == "" and refreshed.credentials.mqtt.token != claimed.credentials.mqtt.token
    topic = connect_with_token("127.0.0.1", bridge.port, refreshed.credentials, timeout=5)
    assert topic.startswith(f"devices/{claimed.device_id}/")
    # The simulator's device key is the bridge's: derived from the same ECDH, never sent.
    from bridge.claims.provisioning import device_key

    assert device_key_for(identity, cloud) == device_key(bridge.store, bridge.keys, claimed.device_id)


def test_simulated_refresh_of_a_revoked_device_is_rejected(bridge: Bridge) -> None:
    cloud = bridge.keys.cloud_key.public_key()
    identity = DeviceIdentity.generate(f"sim-{uuid.uuid4().hex[:8]}")
    claimed = claim_over_mqtt("127.0.0.1", bridge.port, identity, bridge.provision_key, cloud, timeout=5)
    revoke_device(bridge.settings, bridge.store, claimed.device_id)
    with pytest.raises(ClaimRejected) as caught:
        refresh_over_mqtt("127.0.0.1", bridge.port, identity, claimed.device_id, cloud, timeout=5)
    assert caught.value.code is ErrorCode.PERMISSION_DENIED and not caught.value.retryable


def test_fleet_with_refresh_renews_stored_credentials_without_a_provisioning_key(
    bridge: Bridge, tmp_path: Path
) -> None:
    config = FleetConfig(
        host="127.0.0.1",
        port=bridge.port,
        provision_key=bridge.provision_key,
        cloud_public_key=bridge.keys.cloud_key.public_key(),
        state_dir=tmp_path / "fleet",
        hardware_id_prefix=f"fleet-{uuid.uuid4().hex[:6]}-",
        timeout=5,
    )
    claimed = run_fleet(config, count=3, concurrency=3)
    assert all(o.ok and o.created and not o.refreshed for o in claimed)
    api_keys = [Vault(p).load() for p in sorted((tmp_path / "fleet").iterdir())]

    renewed = run_fleet(replace(config, provision_key="", refresh=True), count=3, concurrency=3)
    assert all(o.ok and o.refreshed and o.created is False for o in renewed), [o.error for o in renewed]
    assert [o.device_id for o in renewed] == [o.device_id for o in claimed]
    after = [Vault(p).load() for p in sorted((tmp_path / "fleet").iterdir())]
    for before, now in zip(api_keys, after, strict=True):
        assert before is not None and now is not None
        assert now.api_key == before.api_key != ""  # the refresh's "" never overwrites the stored key
        assert now.mqtt.token != before.mqtt.token
    assert len(_events(bridge, "token.refreshed")) == 3


def test_simulator_cli_refresh_flag_renews_without_a_provisioning_key(
    bridge: Bridge, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from device_sim import cli as sim_cli

    monkeypatch.delenv(sim_cli.KEY_ENV, raising=False)
    common = [
        "--port",
        str(bridge.port),
        "--cloud-key",
        str(bridge.settings.data_dir / "cloud_public.pem"),
        "--state-dir",
        str(tmp_path / "sim"),
        "--hardware-id-prefix",
        f"cli-{uuid.uuid4().hex[:6]}-",
        "--devices",
        "2",
        "--timeout",
        "5",
        "--json",
    ]
    assert sim_cli.main([*common, "--key", bridge.provision_key]) == sim_cli.EXIT_OK
    capsys.readouterr()
    assert sim_cli.main([*common, "--refresh"]) == sim_cli.EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and all(r["refreshed"] and r["ok"] for r in summary["results"])
    assert sim_cli.main([*common, "--first-index", "7"]) == sim_cli.EXIT_USAGE  # a claim needs the key
