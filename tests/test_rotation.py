"""Key rotation (issue 3): `provbridge keys rotate` under a running bridge and embedded broker."""

import json
import time
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.cli import main as cli
from bridge.config import TOKEN_TTL_CAP_SECONDS, Settings
from bridge.storage import keyfiles, rotation
from bridge.storage.rotation import LiveKeyRing
from device_sim.device import DeviceIdentity, claim_over_mqtt, connect_with_token, refresh_over_mqtt
from provwire import crypto
from provwire.models import ClaimOk, Credentials
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device
from tests.helpers.mqtt import can_connect
from tests.helpers.refresh import RefreshingDevice

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


def _cli_json(bridge: Bridge, capsys: pytest.CaptureFixture[str], *args: str) -> object:
    capsys.readouterr()
    assert cli.main(["--data-dir", str(bridge.settings.data_dir), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def _jwks_kids(settings: Settings) -> set[str]:
    return {k["kid"] for k in json.loads((settings.data_dir / "jwks.json").read_text())["keys"]}


def _connects(bridge: Bridge, creds: Credentials) -> bool:
    return can_connect(bridge.port, creds.mqtt.client_id, creds.mqtt.username, creds.mqtt.token)


def _claim(bridge: Bridge, device: Device, **extra: object) -> ClaimOk:
    raw = device.send(device.claim_payload(bridge.provision_key, **extra))
    return ClaimOk.model_validate_json(raw)


def _open(bridge: Bridge, device: Device, answer: ClaimOk) -> Credentials:
    """Like Device.open, but with the keys on disk now (the fixture's ring predates any rotation)."""
    cloud = keyfiles.load_keys(bridge.settings.data_dir).cloud[answer.cloud_key_id].public_key()
    shared = crypto.shared_secret(device.private_key, cloud)
    box = crypto.SealedBox(crypto.b64decode(answer.sealed.nonce), crypto.b64decode(answer.sealed.ciphertext))
    plain = crypto.open_sealed(crypto.derive_seal_key(shared, answer.request_id), box, answer.request_id)
    return Credentials.model_validate_json(plain)


def test_token_key_rotation_keeps_old_tokens_valid_and_new_ones_carry_the_new_kid(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    with Device(bridge) as early:
        before = _open(bridge, early, _claim(bridge, early))
    old_kid = _kid(before.mqtt.token)
    assert old_kid == bridge.keys.active_token
    published_before = _jwks_kids(bridge.settings)

    done = _cli_json(bridge, capsys, "keys", "rotate", "--token")
    assert isinstance(done, dict) and done["old_kid"] == old_kid and done["pruned"] == []
    new_kid = done["new_kid"]
    assert new_kid in published_before  # published since `init`, before it signed anything
    assert done["next_kid"] not in published_before and done["published_at"] is not None
    # Every live token key is published, and the next one.
    assert _jwks_kids(bridge.settings) == {old_kid, new_kid, done["next_kid"]}

    assert _connects(bridge, before)  # minted before the rotation, still within its exp
    with Device(bridge) as late:  # the running bridge signs with the new key from the next claim on
        after = _open(bridge, late, _claim(bridge, late))
    assert _kid(after.mqtt.token) == new_kid
    assert _connects(bridge, after)
    with RefreshingDevice(bridge) as device:  # refreshes too
        device.provision()
        refreshed = device.send_refresh(device.refresh_payload())
    assert isinstance(refreshed, ClaimOk) and _kid(_open(bridge, device, refreshed).mqtt.token) == new_kid

    # Once every token the old key signed has expired, pruning removes it everywhere.
    retired_at = rotation.read_active(bridge.settings.data_dir)["retired"]["token"][old_kid]
    assert rotation.prune(bridge.settings.data_dir, rotation.prunable_at(retired_at) - 1) == ()
    assert rotation.prune(bridge.settings.data_dir, rotation.prunable_at(retired_at)) == (old_kid,)
    assert _jwks_kids(bridge.settings) == {new_kid, done["next_kid"]}
    assert not (keyfiles.keys_dir(bridge.settings.data_dir) / f"token-{old_kid}.pem").exists()
    assert not _connects(bridge, before)  # the broker re-read jwks.json: nothing verifies it any more
    assert _connects(bridge, after)


def test_a_device_provisioned_before_a_cloud_key_rotation_still_refreshes(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    old_cloud = bridge.keys.cloud_key.public_key()
    old_kid = bridge.keys.active_cloud
    with RefreshingDevice(bridge) as device:
        device.provision()
    sim_identity = DeviceIdentity.generate(f"sim-{uuid.uuid4().hex[:8]}")
    sim = claim_over_mqtt("127.0.0.1", bridge.port, sim_identity, bridge.provision_key, old_cloud, timeout=5)

    done = _cli_json(bridge, capsys, "keys", "rotate", "--cloud")
    assert isinstance(done, dict) and done["old_kid"] == old_kid
    new_kid = done["new_kid"]
    published = serialization.load_pem_public_key((bridge.settings.data_dir / "cloud_public.pem").read_bytes())
    assert isinstance(published, ec.EllipticCurvePublicKey)
    assert crypto.key_id(published) == new_kid  # new firmware gets the new key

    with device:  # refresh: device key and seal from the cloud key it was provisioned with
        answer = device.send_refresh(device.refresh_payload())
    assert isinstance(answer, ClaimOk) and answer.cloud_key_id == old_kid
    assert _connects(bridge, device.open(answer))

    renewed = refresh_over_mqtt("127.0.0.1", bridge.port, sim_identity, sim.device_id, old_cloud, timeout=5)
    assert renewed.cloud_key_id == old_kid
    connect_with_token("127.0.0.1", bridge.port, renewed.credentials, timeout=5)

    with Device(bridge) as fresh:  # a claim that names no cloud key uses the new one ...
        assert _claim(bridge, fresh).cloud_key_id == new_kid
    with Device(bridge) as old_firmware:  # ... one that names the old key still gets it
        assert _claim(bridge, old_firmware, cloud_key_id=old_kid).cloud_key_id == old_kid
    assert bridge.store.device(device.device_id).cloud_key_id == old_kid


def test_keys_list_shows_active_and_retired_keys(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    _cli_json(bridge, capsys, "keys", "rotate", "--token")
    _cli_json(bridge, capsys, "keys", "rotate", "--cloud")
    listed = _cli_json(bridge, capsys, "keys", "list")
    assert isinstance(listed, list)
    by_kind = {(k["kind"], k["status"]) for k in listed}
    assert by_kind == {
        ("cloud", "active"),
        ("cloud", "retired"),
        ("token", "active"),
        ("token", "next"),
        ("token", "retired"),
    }
    for key in listed:
        if key["status"] == "retired":
            assert key["retired_at"] is not None
            assert (key["prunable_at"] is None) == (key["kind"] == "cloud")  # cloud keys are kept for good


# --- without a bridge: the files and the live ring ------------------------------------------------


def test_rotation_prunes_only_retired_token_keys_whose_tokens_have_expired(settings: Settings) -> None:
    data_dir = settings.data_dir
    t0 = int(time.time())
    first = rotation.rotate(data_dir, "token", t0)
    second = rotation.rotate(data_dir, "token", t0 + 10)
    assert second.pruned == ()
    ring = keyfiles.load_keys(data_dir)
    assert set(ring.token) == {first.old_kid, first.new_kid, second.new_kid, second.next_kid}
    assert ring.active_token == second.new_kid and first.next_kid == second.new_kid  # the next key, made active
    # The third rotation comes after the first retired key's tokens can all have expired, not the second's.
    third = rotation.rotate(data_dir, "token", t0 + TOKEN_TTL_CAP_SECONDS + rotation.RETIRED_TOKEN_GRACE_SECONDS)
    assert third.pruned == (first.old_kid,)
    assert set(keyfiles.load_keys(data_dir).token) == {first.new_kid, second.new_kid, third.new_kid, third.next_kid}
    assert set(rotation.read_active(data_dir)["retired"]["token"]) == {first.new_kid, second.new_kid}
    # Cloud keys are never pruned: devices depend on them for good.
    for n in range(2):
        rotation.rotate(data_dir, "cloud", t0 + 10 * TOKEN_TTL_CAP_SECONDS * (n + 1))
    assert len(keyfiles.load_keys(data_dir).cloud) == 3


def test_live_key_ring_follows_active_json_and_keeps_the_last_good_ring(settings: Settings, tmp_path: Path) -> None:
    live = LiveKeyRing(settings.data_dir)
    before = live.current()
    assert live.current() is before  # nothing changed: no reload
    done = rotation.rotate(settings.data_dir, "token", int(time.time()))
    assert live.current().active_token == done.new_kid

    active = keyfiles.keys_dir(settings.data_dir) / "active.json"
    good = active.read_bytes()
    broken = tmp_path / "active.json"
    broken.write_text('{"cloud": "0000000000000000", "token": "0000000000000000"}')
    broken.replace(active)  # names keys that do not exist
    assert live.current().active_token == done.new_kid  # the previous ring, not a dead bridge
    keyfiles.write_public(active, good)
    assert live.current().active_token == done.new_kid
