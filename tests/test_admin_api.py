"""Issue 12: the admin HTTP API, through real HTTP (uvicorn on a loopback port), a running bridge, real SQLite.

- every route refuses a missing, malformed, wrong, revoked or out-of-scope admin token, and one of another tenant
  finds nothing of this one (a table-driven walk over every route the app has), and such refusals change nothing;
- hostile input (malformed JSON, huge bodies, wrong types and members, bad CSV, injection attempts in strings)
  gets the documented error shape and changes nothing;
- the admin actions do what the CLI's do, as events naming the admin token; the backend endpoints give the cloud
  key, purpose keys the device can derive itself, tokens that work on the broker, API-key checks;
- /healthz, /readyz, /openapi.json.
"""

import base64
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bridge.api.app import MAX_BODY_BYTES, create_app
from bridge.config import TOKEN_TTL_CAP_SECONDS, load_settings
from bridge.ops import admin
from bridge.ops import admin_tokens as tokens
from provwire import crypto
from provwire.models import ClaimOk
from tests.helpers.api import Api, api_server
from tests.helpers.bridge import Bridge
from tests.helpers.mqtt import can_connect
from tests.helpers.refresh import RefreshingDevice, provisioned


@dataclass(frozen=True)
class World:
    api: Api
    bridge: Bridge
    read: str
    write: str
    backend: str
    revoked: str
    other_tenant: str  # write and backend, on tenant "acme"
    device: RefreshingDevice
    key_id: str


@pytest.fixture
def world(bridge: Bridge) -> Iterator[World]:
    store, now = bridge.store, int(time.time())
    admin.create_tenant(store, bridge.settings, "acme", now)

    def token(*scopes: str, tenant: str | None = None) -> str:
        return tokens.create_admin_token(store, f"t-{uuid.uuid4().hex[:6]}", list(scopes), tenant, now).raw

    revoked = tokens.create_admin_token(store, "gone", ["read", "write", "backend"], None, now)
    tokens.revoke_admin_token(store, revoked.token.id, now)
    device, _ = provisioned(bridge)
    key_id = store.keys(store.tenant_id("default"))[0].id
    with api_server(bridge.settings) as api:
        yield World(
            api,
            bridge,
            read=token("read"),
            write=token("write"),
            backend=token("backend"),
            revoked=revoked.raw,
            other_tenant=token("write", "backend", tenant="acme"),
            device=device,
            key_id=key_id,
        )


# --- every route, every kind of token --------------------------------------------------------------------


def routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from its OpenAPI document: the walk below covers routes added later
    without being told."""
    document = create_app(load_settings(None)).openapi()
    return sorted((method.upper(), path) for path, item in document["paths"].items() for method in item)


PUBLIC = {("GET", "/healthz"), ("GET", "/readyz")}


def scope_of(method: str, path: str) -> str:
    if path.startswith("/v1/backend/"):
        return "backend"
    return "read" if method == "GET" else "write"


def concrete(world: World, path: str) -> str:
    return (
        path.replace("{key_id}", world.key_id)
        .replace("{device_id}", world.device.device_id)
        .replace("{hardware_id}", "SN-nothing")
    )


def test_every_route_is_walked() -> None:
    paths = {path for _, path in routes()}
    assert {"/v1/devices/{device_id}", "/v1/backend/devices/{device_id}/token", "/v1/allowlist/import"} <= paths
    assert len(routes()) >= 28


@pytest.mark.parametrize(("method", "path"), [r for r in routes() if r not in PUBLIC and "openapi" not in r[1]])
def test_every_route_refuses_every_wrong_token_and_changes_nothing(world: World, method: str, path: str) -> None:
    store = world.bridge.store
    before = store.count("devices"), store.count("provision_keys"), store.count("tenants"), store.count("events")
    url = concrete(world, path)
    body = {} if method in ("POST", "PATCH") else None
    wrong = "pba_" + base64.urlsafe_b64encode(b"\0" * 32).decode().rstrip("=")
    for presented, why in [(None, "none"), ("garbage", "malformed"), (wrong, "unknown"), (world.revoked, "revoked")]:
        answer = world.api.request(method, url, presented, body)
        assert (answer.status, answer.error_code) == (401, "unauthorized"), (why, answer)
        assert answer.headers.get("www-authenticate") == "Bearer"
    lacking = {"read": world.backend, "write": world.read, "backend": world.write}[scope_of(method, path)]
    answer = world.api.request(method, url, lacking, body)
    assert (answer.status, answer.error_code) == (403, "forbidden"), answer
    if "{" in path:  # another tenant's token finds nothing here
        answer = world.api.request(method, url, world.other_tenant, body)
        assert answer.status in (400, 403, 404), answer
        assert answer.status != 400 or method in ("POST", "PATCH"), answer  # an empty body may be refused first
    assert (store.count("devices"), store.count("provision_keys"), store.count("tenants"), store.count("events")) == (
        before
    )


def test_a_tenant_token_sees_only_its_tenant(world: World) -> None:
    api, acme = world.api, world.other_tenant  # write implies read
    assert api.request("GET", "/v1/devices", acme).json() == {"devices": [], "next_cursor": None}
    assert api.request("GET", "/v1/devices?tenant=default", acme).status == 404
    assert [t["name"] for t in api.request("GET", "/v1/tenants", acme).json()] == ["acme"]
    assert {k["tenant"] for k in api.request("GET", "/v1/keys", acme).json()["keys"]} == {"acme"}
    assert api.request("POST", "/v1/tenants", acme, {"name": "mine"}).status == 403
    made = api.request("POST", "/v1/keys", acme, {"name": "k", "tenant": "default"})
    assert made.status == 404  # not its tenant


# --- the admin actions -------------------------------------------------------------------------------------


def test_keys_through_the_api(world: World) -> None:
    api, write, read = world.api, world.write, world.read
    made = api.request("POST", "/v1/keys", write, {"name": "line-9", "max_registrations": 5, "labels": {"a": "1"}})
    assert made.status == 201 and made.json()["provision_key"].startswith("pk_")
    key_id = made.json()["id"]
    listed = api.request("GET", "/v1/keys", read).json()["keys"]
    assert key_id in [k["id"] for k in listed] and all("provision_key" not in k for k in listed)
    changed = api.request("PATCH", f"/v1/keys/{key_id}", write, {"max_registrations": 9, "preprovisioned_only": True})
    assert changed.status == 200 and changed.json()["changed"] == ["max_registrations", "preprovisioned_only"]
    assert api.request("POST", f"/v1/keys/{key_id}/revoke", write).json()["status"] == "revoked"
    assert api.request("POST", f"/v1/keys/{key_id}/reinstate", write).json()["status"] == "active"
    codes = api.request("POST", "/v1/keys/codes", write, {"name": "batch-1", "count": 3})
    assert codes.status == 201 and len({c["code"] for c in codes.json()}) == 3
    writer = tokens.authenticate(world.bridge.store, write)
    assert writer is not None
    assert world.bridge.store.events(event="key.updated")[-1]["actor"] == f"api:{writer.id}"


def test_devices_through_the_api_end_sessions_and_free_hardware_ids(world: World) -> None:
    api, write, device = world.api, world.write, world.device
    page = api.request("GET", "/v1/devices?limit=10", world.read).json()
    assert device.device_id in [d["id"] for d in page["devices"]] and page["next_cursor"] is None
    changed = api.request("PATCH", f"/v1/devices/{device.device_id}", write, {"name": "pump", "set_labels": {"x": "1"}})
    assert changed.json()["changed"] == ["name", "labels"]
    with device:
        fresh = device.send_refresh(device.refresh_payload())
    assert isinstance(fresh, ClaimOk)
    token = device.open(fresh).mqtt.token
    port = world.bridge.port
    assert can_connect(port, device.device_id, device.device_id, token)
    assert api.request("POST", f"/v1/devices/{device.device_id}/revoke", write).json()["status"] == "revoked"
    assert not can_connect(port, device.device_id, device.device_id, token)
    assert api.request("POST", f"/v1/devices/{device.device_id}/reinstate", write).json()["status"] == "active"
    assert not can_connect(port, device.device_id, device.device_id, token)  # what it held stays refused
    conflict = api.request("POST", f"/v1/devices/{device.device_id}/reinstate", write)
    assert (conflict.status, conflict.error_code) == (400, "invalid_request")
    rotated = api.request("POST", f"/v1/devices/{device.device_id}/api-key", write).json()
    assert rotated["api_key"].startswith("dk_")
    gone = api.request("DELETE", f"/v1/devices/{device.device_id}", write)
    assert gone.json()["deleted"] == device.device_id
    assert api.request("GET", f"/v1/devices/{device.device_id}", world.read).status == 404


def test_the_allowlist_through_the_api(world: World) -> None:
    api, write = world.api, world.write
    added = api.request("POST", "/v1/allowlist", write, {"hardware_id": "SN-1", "with_credentials": True})
    assert added.status == 201 and added.json()["api_key"].startswith("dk_")
    assert api.request("POST", "/v1/allowlist", write, {"hardware_id": "SN-1"}).error_code == "conflict"
    csv = b"hardware_id,name\nSN-2,two\nSN-3,three\n"
    dry = api.request("POST", "/v1/allowlist/import?dry_run=true", write, raw=csv, content_type="text/csv")
    assert dry.json() == {"dry_run": True, "entries": 2, "credentials": []}
    done = api.request("POST", "/v1/allowlist/import", write, raw=csv, content_type="text/csv")
    assert done.json()["entries"] == 2
    again = api.request("POST", "/v1/allowlist/import", write, raw=csv, content_type="text/csv")
    assert again.status == 400 and "nothing was imported" in again.json()["error"]["message"]
    # Each bad line is named, with what is wrong with it: the operator fixes the file without guessing.
    message = again.json()["error"]["message"]
    assert "line 2" in message and "line 3" in message and "SN-2" in message, message
    wrong_type = api.request("POST", "/v1/allowlist/import", write, raw=csv, content_type="application/json")
    assert (wrong_type.status, wrong_type.error_code) == (415, "unsupported_media_type")
    listed = api.request("GET", "/v1/allowlist", world.read).json()
    assert sorted(e["hardware_id"] for e in listed["entries"]) == ["SN-1", "SN-2", "SN-3"]
    assert api.request("DELETE", "/v1/allowlist/SN-2", write).json() == {"removed": "SN-2"}


# --- the backend endpoints -----------------------------------------------------------------------------------


def test_the_backend_endpoints(world: World) -> None:
    api, backend, device = world.api, world.backend, world.device
    cloud = api.request("GET", "/v1/backend/cloud-key", backend).json()
    assert cloud["kid"] == world.bridge.keys.active_cloud

    purpose = api.request("POST", f"/v1/backend/devices/{device.device_id}/purpose-key", backend, {"label": "payload"})
    # The device derives the same key from its own device key; the backend never sees the device key.
    mine = crypto.derive_purpose_key(device.device_key, "payload")
    assert crypto.b64decode(purpose.json()["key"]) == mine and mine != device.device_key
    assert (
        api.request("POST", f"/v1/backend/devices/{device.device_id}/purpose-key", backend, {"label": "a b"}).status
        == 400
    )

    minted = api.request("POST", f"/v1/backend/devices/{device.device_id}/token", backend, {"ttl_seconds": 120})
    token = minted.json()
    assert minted.status == 200 and token["expires_at"] <= time.time() + 121
    assert can_connect(world.bridge.port, device.device_id, device.device_id, token["token"])
    over = api.request(
        "POST", f"/v1/backend/devices/{device.device_id}/token", backend, {"ttl_seconds": TOKEN_TTL_CAP_SECONDS + 1}
    )
    assert (over.status, over.error_code) == (400, "invalid_request")

    rotated = world.api.request("POST", f"/v1/devices/{device.device_id}/api-key", world.write).json()["api_key"]
    checked = api.request("POST", "/v1/backend/api-keys/verify", backend, {"api_key": rotated}).json()
    assert checked == {"valid": True, "device_id": device.device_id, "tenant": "default"}
    assert api.request("POST", "/v1/backend/api-keys/verify", backend, {"api_key": "dk_nope"}).json() == {
        "valid": False
    }
    foreign = api.request("POST", "/v1/backend/api-keys/verify", world.other_tenant, {"api_key": rotated}).json()
    assert foreign == {"valid": False}

    names = [e["event"] for e in world.bridge.store.events(limit=200) if e["event"].startswith("backend.")]
    assert names[:3] == ["backend.purpose_key_derived", "backend.token_minted", "backend.api_key_checked"]
    assert token["token"] not in json.dumps(world.bridge.store.events(limit=200))


# --- hostile input ------------------------------------------------------------------------------------------------


INJECTIONS = ["'; DROP TABLE devices; --", "<script>alert(1)</script>", "../../etc/passwd", "a\0b", "\u202e", "%s%n"]


def test_hostile_input_gets_the_error_shape_and_changes_nothing(world: World) -> None:
    api, write, store = world.api, world.write, world.bridge.store
    before = store.count("devices"), store.count("provision_keys"), store.count("tenants")
    cases = [
        api.request("POST", "/v1/keys", write, raw=b"{not json"),
        api.request("POST", "/v1/keys", write, raw=b"[]"),
        api.request("POST", "/v1/keys", write, {"name": "x", "unknown": 1}),
        api.request("POST", "/v1/keys", write, {"name": 5}),
        api.request("POST", "/v1/keys", write, {"name": "x", "max_registrations": "5"}),
        api.request("POST", "/v1/keys", write, {"name": "x", "profile": "nope"}),
        api.request("POST", "/v1/keys", write, {"name": "x", "hardware_id_pattern": "(a"}),
        api.request("GET", "/v1/devices?limit=0", write),
        api.request("GET", "/v1/devices?after=garbage", write),
        api.request("PATCH", f"/v1/keys/{world.key_id}", write, {}),
    ]
    for injected in INJECTIONS:
        cases.append(api.request("POST", "/v1/tenants", write, {"name": injected}))
        cases.append(api.request("POST", "/v1/allowlist", write, {"hardware_id": injected + "/"}))
        cases.append(api.request("GET", "/v1/devices?tenant=" + urllib.parse.quote(injected), write))
    for answer in cases:
        assert answer.status in (400, 404), answer
        assert set(answer.json()) == {"error"} and set(answer.json()["error"]) == {"code", "message"}, answer
    huge = api.request("POST", "/v1/keys", write, raw=b"{" + b" " * (MAX_BODY_BYTES + 1) + b"}")
    assert (huge.status, huge.error_code) == (413, "payload_too_large")
    assert (store.count("devices"), store.count("provision_keys"), store.count("tenants")) == before


# --- health, the OpenAPI document -----------------------------------------------------------------------------


def test_health_needs_no_token_and_readyz_says_what_is_down(world: World) -> None:
    assert world.api.request("GET", "/healthz").json() == {"status": "ok"}
    ready = world.api.request("GET", "/readyz")
    assert ready.status == 200 and ready.json()["checks"] == {"broker": "ok", "database": "ok"}
    elsewhere = world.bridge.settings.model_copy(
        update={"broker": world.bridge.settings.broker.model_copy(update={"port": 1})}
    )
    with api_server(elsewhere) as down:
        answer = down.request("GET", "/readyz")
    assert answer.status == 503 and answer.json()["checks"]["broker"].startswith("unreachable")


def test_the_served_openapi_document_describes_every_route(world: World) -> None:
    document = world.api.request("GET", "/openapi.json").json()
    listed = sorted((method.upper(), path) for path, item in document["paths"].items() for method in item)
    assert listed == routes()
    assert all(operation.get("summary") for item in document["paths"].values() for operation in item.values())
    assert world.api.request("GET", "/docs").status == 200


def test_events_page_back_through_history_and_filter_by_device(world: World) -> None:
    api, write, read = world.api, world.write, world.read
    for n in range(5):
        assert api.request("POST", "/v1/keys", write, {"name": f"paged-{n}"}).status == 201
    every = world.bridge.store.events(limit=1000)
    walked: list[dict[str, object]] = []
    before: str = ""
    while True:
        page = api.request("GET", f"/v1/events?limit=2{before}", read).json()
        walked = page["events"] + walked  # each page oldest first, each older than the one before
        if page["next_before"] is None:
            break
        before = f"&before={page['next_before']}"
    assert walked == every and len(every) >= 6
    device = world.device.device_id
    mine = api.request("GET", f"/v1/events?device_id={device}", read).json()["events"]
    assert mine and all(e.get("device_id") == device for e in mine)
    assert api.request("GET", f"/v1/events?device_id={device}", world.other_tenant).status == 404
    assert api.request("GET", "/v1/events?before=0", read).status == 400
