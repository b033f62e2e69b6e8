"""Issue 2 acceptance, through the embedded broker on loopback, a real SQLite file and real crypto."""

import json
import time
import uuid

import jwt
import pytest

from bridge.storage import keyfiles
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device, race_one_time_key
from tests.helpers.mqtt import MqttClient
from tests.helpers.storage import holding_the_write_lock

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


def _events(bridge: Bridge, name: str) -> list[dict[str, object]]:
    return bridge.store.events(event=name, limit=1000)


def _registrations(bridge: Bridge, raw_key: str) -> int:
    from bridge.claims.identifiers import digest

    row = (
        bridge.store.connection()
        .execute("SELECT registrations FROM provision_keys WHERE key_hash = ?", (digest(raw_key),))
        .fetchone()
    )
    return int(row[0])


def test_happy_path_device_opens_answer_and_connects_with_its_token(bridge: Bridge) -> None:
    with Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk) and answer.created
    creds = device.open(answer)
    assert creds.api_key.startswith("dk_")
    assert creds.mqtt.client_id == creds.mqtt.username == answer.device_id

    # The token verifies against the published JWKS and carries the default scope.
    jwks = keyfiles.jwks(keyfiles.load_keys(bridge.settings.data_dir))
    kid = jwt.get_unverified_header(creds.mqtt.token)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(
        creds.mqtt.token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience=bridge.settings.token.audience
    )
    scope = f"devices/{answer.device_id}/#"
    assert claims["sub"] == answer.device_id and claims["tenant"] == "default"
    assert claims["acl"] == {"pub": [scope], "sub": [scope]}
    assert creds.mqtt.expires_at == claims["exp"]

    # The row stores the API key's hash, never the key.
    row = bridge.store.connection().execute("SELECT * FROM devices WHERE id = ?", (answer.device_id,)).fetchone()
    assert row["hardware_id"] == device.hardware_id
    assert bytes(row["api_key_hash"]) != creds.api_key.encode()

    with MqttClient(bridge.port, answer.device_id, answer.device_id, creds.mqtt.token) as conn:
        assert conn.connect()
        assert conn.subscribe(scope) == [1]
        conn.publish(f"devices/{answer.device_id}/telemetry", b"hello")
        assert conn.next_message() == (f"devices/{answer.device_id}/telemetry", b"hello")


def test_device_is_held_to_its_scope(bridge: Bridge) -> None:
    creds = {}
    for name in ("a", "b"):
        with Device(bridge) as device:
            answer = device.claim(bridge.provision_key)
            assert isinstance(answer, ClaimOk)
            creds[name] = (answer.device_id, device.open(answer).mqtt.token)
    (a_id, a_token), (b_id, b_token) = creds["a"], creds["b"]
    with MqttClient(bridge.port, b_id, b_id, b_token) as b, MqttClient(bridge.port, a_id, a_id, a_token) as a:
        assert b.connect() and a.connect()
        assert b.subscribe(f"devices/{b_id}/#") == [1]
        assert a.subscribe(f"devices/{b_id}/#") == [0x80]  # outside a's scope
        assert a.subscribe("#") == [0x80]
        a.publish(f"devices/{b_id}/cmd", b"intrusion")  # refused by the ACL ...
        b.publish(f"devices/{b_id}/cmd", b"own")  # ... so this is the first thing b receives
        assert b.next_message() == (f"devices/{b_id}/cmd", b"own")


def test_forged_and_expired_tokens_cannot_connect(bridge: Bridge) -> None:
    with Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk)
    real = jwt.decode(device.open(answer).mqtt.token, options={"verify_signature": False})
    kid = bridge.keys.active_token
    forged = jwt.encode(real, crypto.generate_private_key(), algorithm="ES256", headers={"kid": kid})
    expired = jwt.encode(
        {**real, "iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600},
        bridge.keys.token_key,
        algorithm="ES256",
        headers={"kid": kid},
    )
    for token in (forged, expired, "not-a-jwt"):
        with MqttClient(bridge.port, answer.device_id, answer.device_id, token) as conn:
            assert not conn.connect()


def test_error_codes_come_from_the_inputs_that_should_produce_them(bridge: Bridge) -> None:
    devices_before = bridge.store.count("devices")
    with Device(bridge) as device:
        bad = json.loads(device.claim_payload(bridge.provision_key))
        bad["hardware"] = {"cpu_cores": "4"}
        answer = ClaimError.model_validate_json(device.send(json.dumps(bad).encode()))
        assert answer.code is ErrorCode.VALIDATION_ERROR
        assert answer.request_id == bad["request_id"]
        assert answer.errors and answer.errors[0].field == "hardware.cpu_cores"

        unknown = device.claim("pk_" + "A" * 43)
        assert isinstance(unknown, ClaimError) and unknown.code is ErrorCode.PERMISSION_DENIED
    assert bridge.store.count("devices") == devices_before

    with Device(bridge) as first:
        assert isinstance(first.claim(bridge.provision_key), ClaimOk)
    with Device(bridge, hardware_id=first.hardware_id) as impostor:
        taken = impostor.claim(bridge.provision_key)
    assert isinstance(taken, ClaimError) and taken.code is ErrorCode.DEVICE_EXISTS
    assert bridge.store.count("devices") == devices_before + 1
    assert _registrations(bridge, bridge.provision_key) == 1  # device_exists spent no use


def test_rejected_claims_spend_no_key_use(bridge: Bridge) -> None:
    key = bridge.create_key(max_registrations=5, hardware_id_pattern=r"line-a-\d+")
    with Device(bridge, hardware_id="line-b-1") as off_pattern:
        denied = off_pattern.claim(key)
    assert isinstance(denied, ClaimError) and denied.code is ErrorCode.PERMISSION_DENIED
    assert _registrations(bridge, key) == 0
    assert _events(bridge, "claim.rejected")[-1]["reason"] == "hardware_id_mismatch"
    with Device(bridge, hardware_id="line-a-1") as on_pattern:
        assert isinstance(on_pattern.claim(key), ClaimOk)
    assert _registrations(bridge, key) == 1


def test_one_time_key_under_50_concurrent_claims_creates_exactly_one_device(bridge: Bridge) -> None:
    race_one_time_key(bridge)
    one_time = "SELECT registrations FROM provision_keys WHERE max_registrations = 1"
    assert bridge.store.connection().execute(one_time).fetchone()[0] == 1
    rejected = [e for e in _events(bridge, "claim.rejected") if e.get("reason") == "key_exhausted"]
    assert len(rejected) == 49
    assert len(_events(bridge, "key.exhausted")) == 1


@pytest.mark.parametrize("reason", ["key_expired", "key_revoked"])
def test_expired_and_revoked_keys_are_denied_with_the_reason_in_the_event(bridge: Bridge, reason: str) -> None:
    from bridge.claims.identifiers import digest

    key = bridge.create_key()
    with bridge.store.transaction() as tx:
        db = tx.connection
        if reason == "key_expired":
            db.execute(
                "UPDATE provision_keys SET expires_at = ? WHERE key_hash = ?", (int(time.time()) - 1, digest(key))
            )
        else:
            db.execute("UPDATE provision_keys SET status = 'revoked' WHERE key_hash = ?", (digest(key),))
    with Device(bridge) as device:
        answer = device.claim(key)
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED
    assert answer.message == "provisioning key not accepted"  # uniform: the device learns nothing
    event = _events(bridge, "claim.rejected")[-1]
    assert event["reason"] == reason and event["hardware_id"] == device.hardware_id
    assert bridge.store.count("devices") == 0


def test_reclaim_with_same_public_key_is_idempotent(bridge: Bridge) -> None:
    with Device(bridge) as device:
        first = device.claim(bridge.provision_key)
        again = device.claim(bridge.provision_key)
    assert isinstance(first, ClaimOk) and isinstance(again, ClaimOk)
    assert again.device_id == first.device_id and not again.created
    first_creds, again_creds = device.open(first), device.open(again)
    assert again_creds.api_key == "" and first_creds.api_key
    assert again_creds.mqtt.token != first_creds.mqtt.token
    assert bridge.store.count("devices") == 1
    assert len(_events(bridge, "device.provisioned")) == 1
    assert len(_events(bridge, "device.reclaimed")) == 1


def test_rotate_policy_lets_a_factory_reset_device_reprovision(bridge: Bridge) -> None:
    key = bridge.create_key(reclaim_policy="rotate")
    with Device(bridge) as before:
        first = before.claim(key)
    assert isinstance(first, ClaimOk)
    old_hash = bridge.store.api_key_hash(first.device_id)
    with Device(bridge, hardware_id=before.hardware_id) as after:  # same board, new key pair
        second = after.claim(key)
    assert isinstance(second, ClaimOk)
    assert second.device_id == first.device_id and not second.created
    new_api_key = after.open(second).api_key
    assert new_api_key.startswith("dk_")
    from bridge.claims.identifiers import digest

    assert bridge.store.api_key_hash(first.device_id) == digest(new_api_key) != old_hash
    assert bridge.store.device(first.device_id).public_key == crypto.b64decode(after.public_key_b64)
    assert len(_events(bridge, "device.reprovisioned")) == 1


def test_same_request_id_gets_the_byte_identical_answer(bridge: Bridge) -> None:
    with Device(bridge) as device:
        payload = device.claim_payload(bridge.provision_key)
        first = device.send(payload)
        second = device.send(payload)
        reordered = json.dumps(dict(reversed(list(json.loads(payload).items())))).encode()
        third = device.send(reordered)  # same claim, other field order: still the same request
        other = json.loads(payload) | {"device_name": "changed"}
        reused = ClaimError.model_validate_json(device.send(json.dumps(other).encode()))
    assert first == second == third
    assert json.loads(first)["status"] == "ok"
    assert device.open(ClaimOk.model_validate_json(first)).api_key  # the sealed api_key is replayed too
    assert bridge.store.count("devices") == 1
    assert reused.code is ErrorCode.VALIDATION_ERROR and reused.errors and reused.errors[0].field == "request_id"


def _point_off_curve() -> str:
    good = crypto.sec1(crypto.generate_private_key().public_key())
    return crypto.b64encode(good[:-1] + bytes([good[-1] ^ 1]))


BAD_PAYLOADS = {
    "malformed json": b'{"request_id": "abcdefgh",',
    "not an object": b"[1, 2, 3]",
    "empty": b"",
    "non utf-8": b"\xff\xfe\x00",
    "oversized": b'{"request_id": "abcdefgh", "device_name": "' + b"x" * 17000 + b'"}',
}


def _bad_claims(device: Device, key: str) -> dict[str, bytes]:
    good = json.loads(device.claim_payload(key))
    variants = {
        "wrong type": good | {"hardware_id": 42},
        "number as string": good | {"hardware": {"ram_mb": "512"}},
        "unknown field": good | {"is_admin": True},
        "missing field": {k: v for k, v in good.items() if k != "public_key"},
        "invalid base64": good | {"public_key": "***"},
        "off-curve point": good | {"public_key": _point_off_curve()},
        "identity point": good | {"public_key": crypto.b64encode(b"\x00")},
        "compressed point": good | {"public_key": crypto.b64encode(b"\x02" + b"\x01" * 32)},
        "wildcard hardware id": good | {"hardware_id": "hw/+/#"},
        "short request id": good | {"request_id": "abc"},
    }
    return {name: json.dumps(v).encode() for name, v in variants.items()} | BAD_PAYLOADS


def test_bad_input_gets_a_documented_error_and_changes_nothing(bridge: Bridge) -> None:
    with Device(bridge) as device:
        bad = _bad_claims(device, bridge.provision_key)
        for name, payload in bad.items():
            answer = ClaimError.model_validate_json(device.send(payload))
            assert answer.code is ErrorCode.VALIDATION_ERROR, name
            assert bridge.store.count("devices") == 0, name
        rejected = [e for e in _events(bridge, "claim.rejected") if e["reason"] == "validation_error"]
        assert len(rejected) == len(bad)  # each one is visible to ops
        assert _registrations(bridge, bridge.provision_key) == 0
        assert isinstance(device.claim(bridge.provision_key), ClaimOk)  # still serving


def test_claim_on_a_topic_with_an_invalid_client_id_is_dropped_with_an_event(bridge: Bridge) -> None:
    from bridge.claims.provisioning import Provisioner

    provisioner = Provisioner(bridge.settings, bridge.store, bridge.keys)
    outcome = provisioner.handle(f"{bridge.prefix}/claim/bad id!", b"{}")
    assert outcome.answer is None and outcome.response_topic is None
    assert _events(bridge, "claim.rejected")[-1]["reason"] == "invalid_client_id"
    # Through the broker such a topic cannot even be published to by a provisioning client.
    with MqttClient(bridge.port, "good-client") as conn:
        assert conn.connect()
        assert conn.subscribe(topics.response_topic(bridge.prefix, "good-client")) == [1]
        conn.publish(f"{bridge.prefix}/claim/other-client", b"{}")
        with Device(bridge, client_id="good-client-2") as device:
            assert isinstance(device.claim(bridge.provision_key), ClaimOk)
    assert bridge.store.count("devices") == 1


def test_events_are_published_and_stored_without_secrets(bridge: Bridge) -> None:
    with Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk)
    [event] = _events(bridge, "device.provisioned")
    assert event["device_id"] == answer.device_id and event["hardware_id"] == device.hardware_id
    assert event["key_name"] == "first-key" and str(event["key_id_prefix"]).startswith("key_")
    assert bridge.provision_key not in json.dumps(event)


def test_storage_failure_answers_internal_error_and_writes_nothing(bridge: Bridge) -> None:
    with holding_the_write_lock(bridge.settings):  # another writer holds the database
        from bridge.claims.provisioning import Provisioner
        from bridge.storage.store import Store

        impatient = Store(bridge.settings.database, lock_timeout=0.05)
        provisioner = Provisioner(bridge.settings, impatient, bridge.keys)
        with Device(bridge) as device:
            payload = device.claim_payload(bridge.provision_key)
        outcome = provisioner.handle(topics.claim_topic(bridge.prefix, device.client_id), payload)
        assert outcome.answer is not None
        answer = ClaimError.model_validate_json(outcome.answer)
        assert answer.code is ErrorCode.INTERNAL_ERROR and answer.retry_after
    assert bridge.store.count("devices") == 0
    with Device(bridge) as device:
        assert isinstance(device.claim(bridge.provision_key), ClaimOk)


def test_unique_request_ids_are_not_confused_across_clients(bridge: Bridge) -> None:
    request_id = uuid.uuid4().hex
    with Device(bridge) as a, Device(bridge) as b:
        first, second = a.claim(bridge.provision_key, request_id), b.claim(bridge.provision_key, request_id)
    assert isinstance(first, ClaimOk) and isinstance(second, ClaimOk)
    assert first.device_id != second.device_id


def test_ops_user_watches_events_over_mqtt_and_can_do_nothing_else(bridge: Bridge) -> None:
    from bridge.ops import admin

    password = admin.create_ops_user(bridge.settings, "night-shift")
    assert "night-shift" in keyfiles.read_ops_users(bridge.settings.data_dir)
    assert password not in (bridge.settings.data_dir / "ops_users.json").read_text()
    with MqttClient(bridge.port, "ops-watch", "night-shift", "wrong") as intruder:
        assert not intruder.connect()
    with MqttClient(bridge.port, "ops-watch", "night-shift", password) as ops:
        assert ops.connect()
        assert ops.subscribe(f"{bridge.prefix}/events/#") == [1]
        assert ops.subscribe(f"{bridge.prefix}/res/+") == [0x80]  # never anyone's answers
        assert ops.subscribe(f"{bridge.prefix}/status/#") == [1]
        assert ops.next_message() == (f"{bridge.prefix}/status/bridge", b'{"status":"online"}')
        ops.publish(f"{bridge.prefix}/events/default/device.provisioned", b"forged")  # refused by the ACL
        with Device(bridge) as device:
            answer = device.claim(bridge.provision_key)
        assert isinstance(answer, ClaimOk)
        topic, payload = ops.next_message()
    assert topic == f"{bridge.prefix}/events/default/device.provisioned"
    event = json.loads(payload)
    assert event["device_id"] == answer.device_id and event["hardware_id"] == device.hardware_id


def test_unknown_cloud_key_id_is_a_validation_error_and_creates_nothing(bridge: Bridge) -> None:
    with Device(bridge) as device:
        payload = device.claim_payload(bridge.provision_key, cloud_key_id="0123456789abcdef")
        answer = ClaimError.model_validate_json(device.send(payload))
    assert answer.code is ErrorCode.VALIDATION_ERROR
    assert answer.errors and answer.errors[0].field == "cloud_key_id"
    assert _events(bridge, "claim.rejected")[-1]["reason"] == "unknown_cloud_key"
    assert bridge.store.count("devices") == 0 and _registrations(bridge, bridge.provision_key) == 0


def test_after_the_retention_window_a_request_id_is_forgotten(bridge: Bridge) -> None:
    with Device(bridge) as device:
        payload = device.claim_payload(bridge.provision_key)
        first = device.send(payload)
        assert bridge.store.purge_answers(int(time.time()) + 1) == 1  # as the purge loop does after the window
        again = ClaimOk.model_validate_json(device.send(payload))
    assert again.device_id == ClaimOk.model_validate_json(first).device_id
    assert not again.created and device.open(again).api_key == ""  # a re-claim now, not a replay


def test_a_rotate_key_cannot_replace_the_key_of_a_device_it_did_not_create(bridge: Bridge) -> None:
    rotate = bridge.create_key(reclaim_policy="rotate")
    with Device(bridge) as original:
        assert isinstance(original.claim(bridge.provision_key), ClaimOk)  # made by the first (reject) key
    with Device(bridge, hardware_id=original.hardware_id) as attacker:
        taken = attacker.claim(rotate)
    assert isinstance(taken, ClaimError) and taken.code is ErrorCode.DEVICE_EXISTS
    assert bridge.store.count("devices") == 1
