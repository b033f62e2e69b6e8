"""Issue 12: the host-wide admin actions over real HTTP (tests/helpers/api.py), against a running bridge:
`denylist publish`, `jwks`, `keys list|rotate|prune`, `ops-user create|list|delete` as endpoints.

- a token rotation applies to the running bridge at once: the JWKS has the new kid, and a device provisioned
  after it gets a token signed with the new key that the embedded broker takes;
- prune removes only retired token keys whose tokens have all expired (never a cloud key);
- an ops account made over HTTP connects to the embedded broker and reads the events topics; deleted, it is
  refused; on Mosquitto (both modes) an unreachable broker is 503 and changes nothing;
- the denylist comes back from the database;
- read-only tokens cannot change, tenant tokens cannot even read (403); each change is one event naming its
  admin token; the ops password and the private keys appear in no event, no log line, no other answer.
"""

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.config import Settings
from bridge.mosquitto.files import read_ops_hashes
from bridge.ops import admin
from bridge.ops import admin_tokens as tokens
from bridge.storage import keyfiles, rotation, statefiles
from bridge.storage.store import Store
from provwire.models import ClaimOk
from tests.helpers.api import Api, Response, api_server
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device
from tests.helpers.mqtt import MqttClient, can_connect
from tests.helpers.waiting import wait_for

# Every host-wide route, with a body it takes (a tenant's token is refused before the body is looked at).
HOST_ROUTES: list[tuple[str, str, dict[str, str] | None]] = [
    ("POST", "/v1/denylist/publish", None),
    ("GET", "/v1/jwks", None),
    ("GET", "/v1/signing-keys", None),
    ("POST", "/v1/signing-keys/rotate", {"kind": "token"}),
    ("POST", "/v1/signing-keys/prune", None),
    ("GET", "/v1/ops-users", None),
    ("POST", "/v1/ops-users", {"name": "tenant-made"}),
    ("DELETE", "/v1/ops-users/someone", None),
]


@dataclass(frozen=True)
class Host:
    api: Api
    bridge: Bridge
    read: str
    write: str
    tenant_read: str  # of tenant "acme"
    tenant_write: str

    def actor(self, raw: str) -> str:
        token = tokens.authenticate(self.bridge.store, raw)
        assert token is not None
        return tokens.actor_of(token)

    def events(self, prefix: str) -> list[dict[str, object]]:
        return [e for e in self.bridge.store.events(limit=1000) if str(e["event"]).startswith(prefix)]


@pytest.fixture
def host(bridge: Bridge, caplog: pytest.LogCaptureFixture) -> Iterator[Host]:
    caplog.set_level(logging.DEBUG)  # every record, the API's (in this process) included, for the secret checks
    store, now = bridge.store, int(time.time())
    admin.create_tenant(store, bridge.settings, "acme", now)

    def token(*scopes: str, tenant: str | None = None) -> str:
        return tokens.create_admin_token(store, f"h-{uuid.uuid4().hex[:6]}", list(scopes), tenant, now).raw

    with api_server(bridge.settings) as api:
        yield Host(
            api,
            bridge,
            read=token("read"),
            write=token("write"),
            tenant_read=token("read", tenant="acme"),
            tenant_write=token("read", "write", "backend", tenant="acme"),
        )


def private_scalars(data_dir: Path) -> set[str]:
    """Every private key of the data dir's key rings, as its PEM body and its scalar in hex and base64(url)."""
    found = set()
    for path in keyfiles.keys_dir(data_dir).glob("*.pem"):
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        pem_body = "".join(path.read_text().splitlines()[1:3])
        found |= {
            scalar.hex(),
            base64.b64encode(scalar).decode().rstrip("="),
            base64.urlsafe_b64encode(scalar).decode().rstrip("="),
            pem_body,
        }
    return found


def assert_nowhere(host: Host, caplog: pytest.LogCaptureFixture, secrets: set[str], *answers: Response) -> None:
    events = json.dumps(host.bridge.store.events(limit=1000))
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in secrets:
        assert secret not in events and secret not in logged, secret[:6]
        for answer in answers:
            assert secret.encode() not in answer.body, secret[:6]


def host_files(data_dir: Path) -> list[tuple[str, int]]:
    """The files the host-wide routes write, each with when it last changed (the database aside: the bridge
    writes it all along)."""
    written = [
        statefiles.denylist_file(data_dir),
        keyfiles.jwks_file(data_dir),
        keyfiles.cloud_public_file(data_dir),
        keyfiles.ops_users_file(data_dir),
        data_dir / "mosquitto_ops_users.json",
        *keyfiles.keys_dir(data_dir).iterdir(),
    ]
    return sorted((str(path), path.stat().st_mtime_ns) for path in written if path.exists())


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


# --- signing keys ------------------------------------------------------------------------------------------


def test_a_token_key_rotation_applies_to_the_running_bridge(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    api, bridge = host.api, host.bridge
    before = api.request("GET", "/v1/jwks", host.read)
    assert before.status == 200
    old = bridge.keys.active_token
    upcoming = rotation.read_active(bridge.settings.data_dir)["next_token"]
    assert {k["kid"] for k in before.json()["keys"]} == {old, upcoming}  # the active key and the next one
    assert all(set(k) <= {"kty", "crv", "x", "y", "kid", "alg", "use"} for k in before.json()["keys"])  # no "d"

    rotated = api.request("POST", "/v1/signing-keys/rotate", host.write, {"kind": "token"})
    assert rotated.status == 200, rotated
    done = rotated.json()
    assert done["kind"] == "token" and done["old_kid"] == old and done["pruned"] == []
    new = done["new_kid"]
    assert new == upcoming  # published before it signs anything
    after = api.request("GET", "/v1/jwks", host.read).json()
    # Tokens signed before keep verifying; the next key is published already.
    assert sorted(k["kid"] for k in after["keys"]) == sorted([old, new, done["next_kid"]])
    assert after == json.loads(keyfiles.jwks_file(bridge.settings.data_dir).read_text())  # what the brokers read

    # A claim after the rotation, through the real bridge: its token carries the new kid, and the embedded broker
    # (which re-reads jwks.json) takes it. No restart anywhere.
    with Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk), answer
    mqtt = device.open(answer).mqtt
    assert mqtt.token is not None and kid_of(mqtt.token) == new
    assert can_connect(bridge.port, mqtt.client_id, mqtt.username, mqtt.token)

    listed = api.request("GET", "/v1/signing-keys", host.read)
    keys = {(k["kind"], k["kid"]): k for k in listed.json()["keys"]}
    assert keys[("token", new)]["status"] == "active" and keys[("token", new)]["retired_at"] is None
    retired = keys[("token", old)]
    assert retired["status"] == "retired" and retired["prunable_at"] == rotation.prunable_at(retired["retired_at"])
    assert keys[("cloud", bridge.keys.active_cloud)]["status"] == "active"
    assert all(set(k) == {"kind", "kid", "status", "retired_at", "prunable_at"} for k in keys.values())

    cloud = api.request("POST", "/v1/signing-keys/rotate", host.write, {"kind": "cloud"}).json()
    assert cloud["kind"] == "cloud" and cloud["old_kid"] == bridge.keys.active_cloud
    assert api.request("GET", "/v1/backend/cloud-key", host.tenant_write).json()["kid"] == cloud["new_kid"]
    bad = api.request("POST", "/v1/signing-keys/rotate", host.write, {"kind": "device"})
    assert (bad.status, bad.error_code) == (400, "invalid_request")

    assert [(e["event"], e["reason"], e["key_name"], e["actor"], e["tenant"]) for e in host.events("signing_key")] == [
        ("signing_key.rotated", "token", new, host.actor(host.write), "_"),
        ("signing_key.rotated", "cloud", cloud["new_kid"], host.actor(host.write), "_"),
    ]
    assert_nowhere(host, caplog, private_scalars(bridge.settings.data_dir), before, rotated, listed)


def test_prune_removes_only_retired_token_keys_whose_tokens_have_all_expired(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    api, data_dir = host.api, host.bridge.settings.data_dir
    first = host.bridge.keys.active_token
    now = int(time.time())
    long_ago = now - rotation.prunable_at(0) - 60  # every token the key then retired could sign has expired
    # `first` retires now (its tokens may still be live); the next one is retired long ago, as is a cloud key.
    second = api.request("POST", "/v1/signing-keys/rotate", host.write, {"kind": "token"}).json()["new_kid"]
    third_rotation = rotation.rotate(data_dir, "token", long_ago)
    third = third_rotation.new_kid
    old_cloud = rotation.rotate(data_dir, "cloud", long_ago).old_kid
    secrets = private_scalars(data_dir)

    refused = api.request("POST", "/v1/signing-keys/prune", host.read)
    assert (refused.status, refused.error_code) == (403, "forbidden")
    pruned = api.request("POST", "/v1/signing-keys/prune", host.write)
    assert (pruned.status, pruned.json()) == (200, {"pruned": [second]})
    assert not (keyfiles.keys_dir(data_dir) / f"token-{second}.pem").exists()
    listed = {
        (k["kind"], k["kid"]): k["status"] for k in api.request("GET", "/v1/signing-keys", host.read).json()["keys"]
    }
    assert listed[("token", first)] == "retired" and listed[("token", third)] == "active"
    assert ("token", second) not in listed and listed[("cloud", old_cloud)] == "retired"  # cloud keys stay
    published = sorted(k["kid"] for k in api.request("GET", "/v1/jwks", host.read).json()["keys"])
    assert published == sorted([first, third, third_rotation.next_kid])
    assert api.request("POST", "/v1/signing-keys/prune", host.write).json() == {"pruned": []}

    assert [(e["event"], e.get("count"), e.get("changes"), e["actor"]) for e in host.events("signing_key.pruned")] == [
        ("signing_key.pruned", 1, [second], host.actor(host.write)),
        ("signing_key.pruned", 0, [], host.actor(host.write)),
    ]
    assert_nowhere(host, caplog, secrets, pruned)


# --- ops accounts ------------------------------------------------------------------------------------------


def test_an_ops_user_made_over_http_reads_events_on_the_embedded_broker_until_deleted(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    api, bridge = host.api, host.bridge
    made = api.request("POST", "/v1/ops-users", host.write, {"name": "night-shift"})
    assert made.status == 201, made
    password = made.json()["password"]
    assert made.json()["username"] == "night-shift" and made.headers["cache-control"] == "no-store"
    listed = api.request("GET", "/v1/ops-users", host.read)
    assert listed.json() == {"ops_users": ["night-shift"]}
    again = api.request("POST", "/v1/ops-users", host.write, {"name": "night-shift"})
    assert (again.status, again.error_code) == (409, "conflict")
    for name in ("dev_x", "provision", "a/b", ""):
        bad = api.request("POST", "/v1/ops-users", host.write, {"name": name})
        assert (bad.status, bad.error_code) == (400, "invalid_request"), name
    assert password not in (bridge.settings.data_dir / "ops_users.json").read_text()  # its SHA-256 only
    assert "night-shift" in read_ops_hashes(bridge.settings.data_dir)  # for a Mosquitto configured later

    with MqttClient(bridge.port, "ops-watch", "night-shift", password) as ops:
        assert ops.connect()
        assert ops.subscribe(f"{bridge.prefix}/events/#") == [1]
        with Device(bridge) as device:
            answer = device.claim(bridge.provision_key)
        assert isinstance(answer, ClaimOk)
        topic, payload = ops.next_message()
    assert topic == f"{bridge.prefix}/events/default/device.provisioned"
    assert json.loads(payload)["device_id"] == answer.device_id

    deleted = api.request("DELETE", "/v1/ops-users/night-shift", host.write)
    assert (deleted.status, deleted.json()) == (200, {"deleted": "night-shift"})
    assert wait_for(lambda: not can_connect(bridge.port, "ops-watch", "night-shift", password), timeout=10)
    assert api.request("GET", "/v1/ops-users", host.read).json() == {"ops_users": []}
    gone = api.request("DELETE", "/v1/ops-users/night-shift", host.write)
    assert (gone.status, gone.error_code) == (404, "not_found")

    assert [(e["event"], e["key_name"], e["actor"], e["tenant"]) for e in host.events("ops_user")] == [
        ("ops_user.created", "night-shift", host.actor(host.write), "_"),
        ("ops_user.deleted", "night-shift", host.actor(host.write), "_"),
    ]
    assert_nowhere(host, caplog, {password}, listed, again, deleted)


@pytest.mark.parametrize("auth", ["jwt", "dynsec"])
def test_on_mosquitto_an_unreachable_broker_is_503_and_changes_nothing(settings: Settings, auth: str) -> None:
    # No Mosquitto listens on the broker port: both modes keep ops accounts in its dynamic security.
    broker = settings.broker.model_copy(
        update={"mode": "external", "mosquitto_auth": auth, "dynsec_timeout_seconds": 2}
    )
    external = settings.model_copy(update={"broker": broker})
    admin.create_ops_user(external, "day-shift")  # one to delete
    store = Store(external.database)
    try:
        write = tokens.create_admin_token(store, "ops", ["write"], None, int(time.time())).raw
        with api_server(external) as api:
            made = api.request("POST", "/v1/ops-users", write, {"name": "night-shift"})
            assert (made.status, made.error_code) == (503, "unavailable"), made
            deleted = api.request("DELETE", "/v1/ops-users/day-shift", write)
            assert (deleted.status, deleted.error_code) == (503, "unavailable"), deleted
            assert api.request("GET", "/v1/ops-users", write).json() == {"ops_users": ["day-shift"]}
        assert set(keyfiles.read_ops_users(external.data_dir)) == {"day-shift"}
        assert "night-shift" not in read_ops_hashes(external.data_dir)
        assert store.events(event="ops_user.created") == [] and store.events(event="ops_user.deleted") == []
    finally:
        store.close()


# --- the denylist ------------------------------------------------------------------------------------------


def test_the_denylist_is_rewritten_from_the_database(host: Host) -> None:
    api, bridge = host.api, host.bridge
    with Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk)
    assert api.request("POST", f"/v1/devices/{answer.device_id}/revoke", host.write).status == 200
    denylist = statefiles.denylist_file(bridge.settings.data_dir)
    denylist.unlink()

    published = api.request("POST", "/v1/denylist/publish", host.write)
    assert (published.status, published.json()) == (200, {"devices": 1, "older_credentials": 0})
    assert answer.device_id in denylist.read_text()
    (event,) = host.events("denylist")
    assert (event["event"], event["count"], event["actor"], event["tenant"]) == (
        "denylist.published",
        1,
        host.actor(host.write),
        "_",
    )


# --- who may ---------------------------------------------------------------------------------------------------


def test_tenant_tokens_are_refused_every_host_wide_action_and_read_tokens_every_change(host: Host) -> None:
    data_dir = host.bridge.settings.data_dir
    files = host_files(data_dir)
    events = len(host.bridge.store.events(limit=1000))
    for method, path, body in HOST_ROUTES:
        callers = [host.tenant_read, host.tenant_write] + ([host.read] if method != "GET" else [])
        for raw in callers:
            answer = host.api.request(method, path, raw, body)
            assert (answer.status, answer.error_code) == (403, "forbidden"), (method, path, answer)
        if method == "GET":
            assert host.api.request(method, path, host.read).status == 200, (method, path)
    assert host_files(data_dir) == files
    assert len(host.bridge.store.events(limit=1000)) == events
