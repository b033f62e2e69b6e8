"""Issue 12: the admin HTTP API, through real HTTP (uvicorn on a loopback port), a running bridge, real SQLite.

- every route that takes an admin token (the OpenAPI document and /docs, the dashboard's event stream included)
  refuses a missing, malformed, wrong, revoked or out-of-scope one, and one of another tenant finds nothing of
  this one (a table-driven walk over every route the app has); such refusals change nothing, and every error
  answered is one the OpenAPI document lists for the route; only health and the dashboard's page need none;
- hostile input (malformed JSON, huge bodies, wrong types and members, bad or oversized CSV, injection attempts
  in every string the OpenAPI document declares) gets the documented error shape and changes nothing;
- the admin actions do what the CLI's do, as events naming the admin token; a tenant's token acts on its own
  tenant without naming it; the backend endpoints give the cloud key, purpose keys the device can derive itself,
  tokens that work on the broker, API-key checks, each an event naming the token;
- /healthz, /readyz, the OpenAPI document (real error responses, the bearer scheme), and docs/API.md, which must
  name every route the app serves.
"""

import base64
import csv
import http.client
import io
import itertools
import json
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.api.app import MAX_BODY_BYTES, MAX_IMPORT_BODY_BYTES, create_app, served_routes
from bridge.api.context import scope_of_route
from bridge.api.sessions import COOKIE
from bridge.config import TOKEN_TTL_CAP_SECONDS, load_settings
from bridge.ops import admin
from bridge.ops import admin_tokens as tokens
from bridge.storage.store import Store
from provwire import crypto
from provwire.models import ClaimOk
from tests.helpers.api import Api, Response, api_server
from tests.helpers.bridge import Bridge
from tests.helpers.mqtt import can_connect
from tests.helpers.refresh import RefreshingDevice, provisioned

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


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


def served() -> list[tuple[str, str]]:
    """Every (method, path) the app serves: the walk below covers routes added later without being told."""
    return sorted((method, route.path) for route in served_routes() for method in route.methods or ())


def in_schema() -> list[tuple[str, str]]:
    document = create_app(load_settings(None)).openapi()
    return sorted((method.upper(), path) for path, item in document["paths"].items() for method in item)


PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/.well-known/jwks.json")}
DASHBOARD_FILES = {("GET", "/"), ("GET", "/ui"), ("GET", "/ui/"), ("GET", "/ui/static/{name}")}  # the login page
SESSION = {("POST", "/ui/session"), ("GET", "/ui/session"), ("DELETE", "/ui/session")}  # tests/test_dashboard_session
DOCUMENTS = {("GET", "/openapi.json")}


def takes_token(method: str, path: str) -> tuple[bool, str | None]:
    """Whether the route takes an admin token, and the scope it declares (None: any), as the app says."""
    for route in served_routes():
        if route.path == path and method in (route.methods or ()):
            return scope_of_route(route.dependant.dependencies)
    raise AssertionError(f"no route {method} {path}")


GUARDED = [r for r in served() if takes_token(*r)[0]]


def scope_of(method: str, path: str) -> str | None:
    """The scope a route needs, by the rule README and docs/API.md state (not read from the code)."""
    if (method, path) in DOCUMENTS:
        return None
    if path.startswith("/v1/backend/"):
        return "backend"
    return "read" if method == "GET" else "write"


def concrete(world: World, path: str) -> str:
    return (
        path.replace("{key_id}", world.key_id)
        .replace("{device_id}", world.device.device_id)
        .replace("{hardware_id}", "SN-nothing")
        .replace("{name}", "ops-nobody")
    )


def rows(world: World) -> dict[str, int]:
    """How many rows the tables an admin request may change hold, read beside the API (read-only)."""
    store = Store(world.bridge.settings.database)
    with closing(store):
        db = store.connection()
        return {
            table: int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # names from the tuple below
            for table in ("tenants", "provision_keys", "devices", "allowlist", "admin_tokens")
        } | {
            # A refused API-key check is recorded (as such: the backend asked); it changes nothing.
            "events": int(
                db.execute(
                    "SELECT COUNT(*) FROM events WHERE NOT (event = 'backend.api_key_checked'"
                    """ AND body LIKE '%"reason":"invalid"%')"""  # the body as stored: compact JSON, either engine
                ).fetchone()[0]
            )
        }


def documented(document: dict[str, Any], method: str, path: str, answer: Response) -> None:
    """`answer` is an error the OpenAPI document lists for the route, in the one documented shape."""
    assert set(answer.json()) == {"error"} and set(answer.json()["error"]) == {"code", "message"}, answer
    operation = document["paths"].get(path, {}).get(method.lower())
    if operation is not None:  # the dashboard's and the documents' own routes are in docs/API.md only
        assert str(answer.status) in operation["responses"], (method, path, answer)


def test_every_route_is_walked_and_only_health_and_the_dashboards_page_are_anonymous() -> None:
    guarded = set(GUARDED)
    assert {
        ("GET", "/v1/devices/{device_id}"),
        ("POST", "/v1/backend/devices/{device_id}/token"),
        ("POST", "/v1/allowlist/import"),
        ("GET", "/ui/events/stream"),
        ("GET", "/metrics"),
        ("POST", "/v1/signing-keys/rotate"),  # the host-wide ones (tests/test_api_host_actions.py)
        ("DELETE", "/v1/ops-users/{name}"),
    } | DOCUMENTS <= guarded
    assert len(guarded) >= 29
    # A route added without an admin token fails here: no anonymous access but health (and the login page).
    assert set(served()) - guarded == PUBLIC | DASHBOARD_FILES | SESSION
    # The app's own list agrees with what FastAPI puts in the OpenAPI document.
    assert set(in_schema()) <= set(served())
    for method, path in GUARDED:  # the rule the README states is the one the code declares
        assert takes_token(method, path)[1] == scope_of(method, path), (method, path)


@pytest.mark.parametrize(("method", "path"), GUARDED)
def test_every_route_refuses_every_wrong_token_and_changes_nothing(world: World, method: str, path: str) -> None:
    document = world.api.request("GET", "/openapi.json", world.read).json()
    before = rows(world)
    url = concrete(world, path)
    body: dict[str, Any] | None = {} if method in ("POST", "PATCH") else None
    wrong = "pba_" + base64.urlsafe_b64encode(b"\0" * 32).decode().rstrip("=")
    for presented, why in [(None, "none"), ("garbage", "malformed"), (wrong, "unknown"), (world.revoked, "revoked")]:
        answer = world.api.request(method, url, presented, body)
        assert (answer.status, answer.error_code) == (401, "unauthorized"), (why, answer)
        assert answer.headers.get("www-authenticate") == "Bearer"
        documented(document, method, path, answer)
    scope = scope_of(method, path)
    if scope is not None:
        lacking = {"read": world.backend, "write": world.read, "backend": world.write}[scope]
        answer = world.api.request(method, url, lacking, body)
        assert (answer.status, answer.error_code) == (403, "forbidden"), answer
        documented(document, method, path, answer)
    if "{" in path:  # another tenant's token finds nothing here
        answer = world.api.request(method, url, world.other_tenant, body)
        assert answer.status in (400, 403, 404), answer
        assert answer.status != 400 or method in ("POST", "PATCH"), answer  # an empty body may be refused first
        documented(document, method, path, answer)
    assert rows(world) == before


def test_the_openapi_document_needs_an_admin_token_and_no_page_runs_anothers_script(world: World) -> None:
    wrong = "pba_" + base64.urlsafe_b64encode(b"\1" * 32).decode().rstrip("=")
    for path in ("/openapi.json",):
        for presented in (None, "garbage", wrong, world.revoked):
            answer = world.api.request("GET", path, presented)
            assert (answer.status, answer.error_code) == (401, "unauthorized"), (path, presented, answer)
            assert set(answer.json()) == {"error"} and set(answer.json()["error"]) == {"code", "message"}
        for scoped in (world.read, world.backend, world.other_tenant):  # any scope, any tenant
            assert world.api.request("GET", path, scoped).status == 200
    # In a browser, the dashboard's session lets the document in.
    login = world.api.request("POST", "/ui/session", body={"token": world.read})
    cookie = {"Cookie": login.headers["set-cookie"].split(";")[0]}
    assert world.api.request("GET", "/openapi.json", headers=cookie).json()["info"]["title"]
    # No Swagger UI: its script would come from a CDN and run beside the dashboard's session.
    assert world.api.request("GET", "/docs", world.read).status == 404


def test_the_live_event_stream_refuses_without_a_session(world: World) -> None:
    """The dashboard's stream takes its session cookie (or a bearer token: the walk above): without a live
    session it is 401 and opens nothing."""
    login = world.api.request("POST", "/ui/session", body={"token": world.read})
    cookie = login.headers["set-cookie"].split(";")[0]
    csrf = login.json()["csrf"]
    ended = world.api.request("DELETE", "/ui/session", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert ended.status == 204
    for headers in ({}, {"Cookie": f"{COOKIE}=not-a-session"}, {"Cookie": cookie}):
        answer = world.api.request("GET", "/ui/events/stream", headers=headers)
        assert (answer.status, answer.error_code) == (401, "unauthorized"), (headers, answer)
        assert answer.headers.get("content-type") == "application/json"


def test_every_answer_carries_the_security_headers(world: World) -> None:
    """Answers, errors and refusals of the body limit alike: nothing is cached (a secret shown once), sniffed or
    framed; the dashboard's pages have their strict CSP, /docs (Swagger UI's CDN and inline script) does not."""
    huge = {"Content-Length": str(MAX_BODY_BYTES + 1)}
    answers = {
        "ok": world.api.request("GET", "/v1/keys", world.read),
        "401": world.api.request("GET", "/v1/keys"),
        "413": world.api.request("POST", "/v1/keys", world.write, raw=b"{}", headers=huge),
        "page": world.api.request("GET", "/ui/"),
        "document": world.api.request("GET", "/openapi.json", world.read),
    }
    assert answers["413"].status == 413
    for what, answer in answers.items():
        assert answer.headers["cache-control"] == "no-store", what
        assert answer.headers["x-content-type-options"] == "nosniff", what
        assert answer.headers["x-frame-options"] == "DENY", what
        assert ("content-security-policy" in answer.headers) == (what == "page"), what


def test_a_wrong_method_is_405_with_the_methods_the_path_has(world: World) -> None:
    for presented in (None, world.write):  # routing comes first: no token is looked at
        answer = world.api.request("PUT", "/v1/keys", presented, {})
        assert (answer.status, answer.error_code) == (405, "method_not_allowed"), answer
        assert set(answer.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert world.api.request("GET", "/v1/nothing-here", world.read).error_code == "not_found"


def test_a_tenant_token_sees_only_its_tenant(world: World) -> None:
    api, acme = world.api, world.other_tenant  # write implies read
    assert api.request("GET", "/v1/devices", acme).json() == {"devices": [], "next_cursor": None}
    assert api.request("GET", "/v1/devices?tenant=default", acme).status == 404
    assert [t["name"] for t in api.request("GET", "/v1/tenants", acme).json()["tenants"]] == ["acme"]
    assert {k["tenant"] for k in api.request("GET", "/v1/keys", acme).json()["keys"]} == {"acme"}
    assert api.request("POST", "/v1/tenants", acme, {"name": "mine"}).status == 403
    made = api.request("POST", "/v1/keys", acme, {"name": "k", "tenant": "default"})
    assert made.status == 404  # not its tenant


def test_tenants_come_a_page_at_a_time_by_name(world: World) -> None:
    api = world.api
    for name in ("t-c", "t-a", "t-b"):
        made = api.request("POST", "/v1/tenants", world.write, {"name": name})
        assert made.status == 201 and made.json()["name"] == name
        # Its default key, shown once: stored only as its hash, listed without its value.
        raw, key_id = made.json()["provision_key"], made.json()["default_key"]["id"]
        assert raw.startswith("pk_") and made.json()["default_key"]["name"] == "default"
        listed = api.request("GET", f"/v1/keys/{key_id}", world.read)
        assert listed.status == 200 and raw not in listed.body.decode()
    names: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        query = "/v1/tenants?limit=2" + (f"&after={after}" if after else "")
        page = api.request("GET", query, world.read).json()
        assert len(page["tenants"]) <= 2
        names += [t["name"] for t in page["tenants"]]
        pages += 1
        after = page["next_cursor"]
        if after is None:
            break
    assert names == sorted(names) and {"t-a", "t-b", "t-c", "default", "acme"} <= set(names)
    assert pages == (len(names) + 1) // 2
    assert api.request("GET", "/v1/tenants?limit=0", world.read).error_code == "invalid_request"
    own = api.request("GET", "/v1/tenants?after=a", world.other_tenant).json()  # a tenant's token: its own only
    assert [t["name"] for t in own["tenants"]] == ["acme"] and own["next_cursor"] is None


def test_a_tenant_token_acts_on_its_own_tenant_when_it_names_none(world: World) -> None:
    """Where a change or a list is about one tenant, a tenant's token need not name it (its own is the only one
    it may name); a token of every tenant still means "default" when it names none."""
    api, acme, everyone = world.api, world.other_tenant, world.write
    key = api.request("POST", "/v1/keys", acme, {"name": "acme-line"})
    assert (key.status, key.json()["tenant"]) == (201, "acme"), key
    codes = api.request("POST", "/v1/keys/codes", acme, {"name": "acme-codes", "count": 2})
    assert codes.status == 201, codes
    assert {api.request("GET", f"/v1/keys/{c['key_id']}", acme).json()["tenant"] for c in codes.json()} == {"acme"}
    assert api.request("POST", "/v1/allowlist", acme, {"hardware_id": "SN-acme-1"}).status == 201
    csv = b"hardware_id\nSN-acme-2\n"
    imported = api.request("POST", "/v1/allowlist/import", acme, raw=csv, content_type="text/csv")
    assert imported.json()["entries"] == 1, imported

    def allowlist(token: str, query: str = "") -> list[str]:
        answer = api.request("GET", f"/v1/allowlist{query}", token)
        assert answer.status == 200, answer
        return sorted(e["hardware_id"] for e in answer.json()["entries"])

    assert allowlist(acme) == ["SN-acme-1", "SN-acme-2"] == allowlist(everyone, "?tenant=acme")
    assert allowlist(everyone) == []  # "default"'s
    assert api.request("DELETE", "/v1/allowlist/SN-acme-2", acme).json() == {"removed": "SN-acme-2"}
    assert allowlist(acme) == ["SN-acme-1"]
    assert api.request("DELETE", "/v1/allowlist/SN-acme-1", everyone).status == 404  # not in "default"
    assert api.request("GET", "/v1/allowlist?tenant=default", acme).status == 404
    mine = api.request("POST", "/v1/keys", everyone, {"name": "default-line"})
    assert (mine.status, mine.json()["tenant"]) == (201, "default")


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
    assert dry.json() == {"dry_run": True, "entries": 2, "credentials": [], "skipped": []}
    done = api.request("POST", "/v1/allowlist/import", write, raw=csv, content_type="text/csv")
    assert done.json()["entries"] == 2 and done.json()["skipped"] == []
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

    # Every call that was answered is an event naming the admin token that made it; refused ones (the bad label,
    # the TTL over the cap) made nothing, so left none.
    store = world.bridge.store

    def actor(raw: str) -> str:
        token = tokens.authenticate(store, raw)
        assert token is not None
        return f"api:{token.id}"

    recorded = [(e["event"], e.get("reason"), e["actor"]) for e in store.events(limit=200) if "backend" in e["event"]]
    assert recorded == [
        ("backend.cloud_key_read", None, actor(backend)),
        ("backend.purpose_key_derived", None, actor(backend)),
        ("backend.token_minted", None, actor(backend)),
        ("backend.api_key_checked", "valid", actor(backend)),
        ("backend.api_key_checked", "invalid", actor(backend)),
        ("backend.api_key_checked", "invalid", actor(world.other_tenant)),
    ]
    events = json.dumps(store.events(limit=200))
    assert token["token"] not in events and rotated not in events and purpose.json()["key"] not in events


# --- hostile input ------------------------------------------------------------------------------------------------


INJECTIONS = ["'; DROP TABLE devices; --", "<script>alert(1)</script>", "../../etc/passwd", "a\0b", "\u202e", "%s%n"]


def test_hostile_input_gets_the_error_shape_and_changes_nothing(world: World) -> None:
    api, write = world.api, world.write
    document = api.request("GET", "/openapi.json", world.read).json()
    before = rows(world)
    cases = [
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, raw=b"{not json")),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, raw=b"[]")),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, raw=b'{"name": "x"')),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, raw=b'{"name": "\\ud800"}')),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, {"name": "x", "unknown": 1})),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, {"name": 5})),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, {"name": "x", "max_registrations": "5"})),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, {"name": "x", "profile": "nope"})),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, {"name": "x", "hardware_id_pattern": "(a"})),
        ("POST", "/v1/keys", api.request("POST", "/v1/keys", write, raw=b'{"name": "x"}', content_type="text/plain")),
        ("GET", "/v1/devices", api.request("GET", "/v1/devices?limit=0", write)),
        ("GET", "/v1/devices", api.request("GET", "/v1/devices?after=garbage", write)),
        ("PATCH", "/v1/keys/{key_id}", api.request("PATCH", f"/v1/keys/{world.key_id}", write, {})),
    ]
    for method, path, answer in cases:
        assert answer.status == 400, answer
        documented(document, method, path, answer)
    huge = api.request("POST", "/v1/keys", write, raw=b"{" + b" " * (MAX_BODY_BYTES + 1) + b"}")
    assert (huge.status, huge.error_code) == (413, "payload_too_large")
    documented(document, "POST", "/v1/keys", huge)
    assert rows(world) == before


# --- injection attempts in every string the OpenAPI document declares -----------------------------------------


@dataclass(frozen=True)
class Injection:
    """One request with one hostile string in one place (`where`) of one operation."""

    method: str
    path: str  # as in the OpenAPI document
    where: str
    value: str
    url: str
    body: dict[str, Any] | None = None
    csv: bytes | None = None


def _schema(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _shape(schema: dict[str, Any]) -> str | None:
    """ "string", "array" (of strings), "object" (of strings), or None (not text) for a member's schema,
    `X | None` included."""
    for option in [schema, *schema.get("anyOf", [])]:
        kind = option.get("type")
        if kind == "string":
            return "string"
        if kind == "array" and option.get("items", {}).get("type") == "string":
            return "array"
        if kind == "object" and option.get("additionalProperties", {}).get("type") == "string":
            return "object"
    return None


def _placed(shape: str, value: str) -> list[Any]:
    """`value` where a member of `shape` holds text: the string itself, in a list, as a name and as a value."""
    if shape == "string":
        return [value]
    if shape == "array":
        return [[value]]
    return [{value: "v"}, {"k": value}]


def _valid(schema: dict[str, Any]) -> dict[str, Any]:
    """A body with each required member set to a harmless value of its own, so that the hostile member is what
    is tried."""
    body: dict[str, Any] = {}
    for name in schema.get("required", []):
        member = schema["properties"][name]
        if _shape(member) == "string":
            body[name] = f"safe-{uuid.uuid4().hex[:8]}"
        elif member.get("type") == "integer":
            body[name] = int(member.get("minimum", 1))
        else:
            raise AssertionError(f"no harmless value for {name}: {member}")
    return body


def _csv(cells: dict[str, str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(list(cells))
    writer.writerow(list(cells.values()))
    return out.getvalue().encode()


def injections(document: dict[str, Any], world: World) -> list[Injection]:
    """Every hostile string in every string of every JSON body member (and CSV cell), query parameter and path
    parameter of every operation, from the served OpenAPI document: a route added later is tried too."""
    return [
        case
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for value in INJECTIONS
        for case in _injections(document, world, method.upper(), path, operation, value)
    ]


def _injections(
    document: dict[str, Any], world: World, method: str, path: str, operation: dict[str, Any], value: str
) -> Iterator[Injection]:
    content = operation.get("requestBody", {}).get("content", {})
    schema = _schema(document, content["application/json"]["schema"]) if "application/json" in content else {}
    takes_csv = "text/csv" in content
    query = {"dry_run": "true"} if takes_csv else {}  # an import only checks: nothing is meant to change
    body = _valid(schema) if "application/json" in content else None
    csv_body = _csv({"hardware_id": f"SN-{uuid.uuid4().hex[:8]}"}) if takes_csv else None

    def url(url_path: str, extra: dict[str, str] | None = None) -> str:
        sent = {**query, **(extra or {})}
        return concrete(world, url_path) + ("?" + urllib.parse.urlencode(sent) if sent else "")

    for parameter in operation.get("parameters", []):
        name = parameter["name"]
        if _shape(parameter["schema"]) != "string":
            continue
        if parameter["in"] == "query":
            yield Injection(method, path, f"query {name}", value, url(path, {name: value}), body, csv_body)
        elif parameter["in"] == "path":
            hostile = path.replace("{" + name + "}", urllib.parse.quote(value, safe=""))
            yield Injection(method, path, f"path {name}", value, url(hostile), body, csv_body)
    for name, member in schema.get("properties", {}).items():
        shape = _shape(member)
        for placed in _placed(shape, value) if shape else []:
            # Fresh required members for each: a hardware id taken by the case before would be refused first.
            yield Injection(method, path, f"body {name}", value, url(path), {**_valid(schema), name: placed})
    if takes_csv:
        for column in ("hardware_id", "name", "labels"):
            cells = {"hardware_id": f"SN-{uuid.uuid4().hex[:8]}", column: value}
            yield Injection(method, path, f"csv {column}", value, url(path), None, _csv(cells))


# What an accepted request makes, beside its one event: a hostile string that is valid text (a key's or a
# device's name, a label, a group, a hardware-id pattern) is taken as the data it is, nothing more.
MAKES: dict[tuple[str, str], dict[str, int]] = {
    ("POST", "/v1/keys"): {"provision_keys": 1},
    ("POST", "/v1/keys/codes"): {"provision_keys": 1},
    ("POST", "/v1/allowlist"): {"allowlist": 1},
    ("DELETE", "/v1/allowlist/{hardware_id}"): {"allowlist": -1},  # one an earlier case put there
}


def _holds(answer: Any, value: str) -> bool:
    if isinstance(answer, dict):
        return any(_holds(k, value) or _holds(v, value) for k, v in answer.items())
    if isinstance(answer, list):
        return any(_holds(v, value) for v in answer)
    return bool(answer == value)


def _read_back(world: World, answer: Response) -> Any:
    """What an accepted change stored, as the API shows it: its answer, or for codes (whose answer is their
    values only) each code's key."""
    made = answer.json()
    if isinstance(made, list):
        return [world.api.request("GET", f"/v1/keys/{code['key_id']}", world.read).json() for code in made]
    return made


def test_injection_attempts_in_every_declared_string_change_nothing_they_should_not(world: World) -> None:
    """Each case: refused with an error the OpenAPI document lists for the route, and then nothing changed
    (tenants, keys, devices, allowlist, admin tokens, events but the refusals the API records); or, where the
    string is valid text, accepted with it stored verbatim and only the request's own row and event written.
    A read changes nothing either way."""
    api = world.api
    document = api.request("GET", "/openapi.json", world.read).json()
    both = tokens.create_admin_token(world.bridge.store, "hostile", ["write", "backend"], None, int(time.time())).raw
    cases = injections(document, world)
    tried = {(case.method, case.path) for case in cases}
    operations = {(m.upper(), p) for p, item in document["paths"].items() for m, op in item.items()}
    without_text = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/.well-known/jwks.json")} | {
        ("POST", "/v1/denylist/publish"),
        ("GET", "/v1/jwks"),
        ("GET", "/v1/signing-keys"),
        ("POST", "/v1/signing-keys/prune"),
        ("GET", "/v1/ops-users"),
    }
    assert tried == operations - without_text - {("GET", "/v1/backend/cloud-key")}
    refused = accepted = 0
    for case in cases:
        before = rows(world)
        if case.csv is not None:
            answer = api.request(case.method, case.url, both, raw=case.csv, content_type="text/csv")
        else:
            answer = api.request(case.method, case.url, both, case.body)
        change = {table: n - before[table] for table, n in rows(world).items() if n != before[table]}
        if answer.status >= 400:
            refused += 1
            documented(document, case.method, case.path, answer)
            assert answer.status in (400, 404, 409), (case, answer)
            assert change == {}, (case, answer)
        elif case.method == "GET" or case.path == "/v1/backend/api-keys/verify" or case.csv is not None:
            assert change == {}, (case, answer)
        else:
            accepted += 1
            assert change == {**MAKES.get((case.method, case.path), {}), "events": 1}, (case, answer)
            if not case.where.startswith("body remove_"):
                assert _holds(_read_back(world, answer), case.value), (case, answer)
    assert refused > 100 and accepted > 0  # both outcomes were tried


# --- CSV through the API ---------------------------------------------------------------------------------------


def test_a_csv_body_over_the_import_limit_is_413_and_imports_nothing(world: World) -> None:
    """The import's limit (bridge/api/app.py MAX_IMPORT_BODY_BYTES, the CLI's too) holds whether the body
    declares its length or is streamed in chunks without one."""
    before = rows(world)
    url = "/v1/allowlist/import?dry_run=false"
    declared = http.client.HTTPConnection("127.0.0.1", world.api.port, timeout=60)
    try:  # only the headers: the length alone is refused, before any of the body is read
        declared.putrequest("POST", url)
        for name, value in (("Authorization", f"Bearer {world.write}"), ("Content-Type", "text/csv")):
            declared.putheader(name, value)
        declared.putheader("Content-Length", str(MAX_IMPORT_BODY_BYTES + 1))
        declared.endheaders()
        answer = declared.getresponse()
        status, body = answer.status, json.loads(answer.read())
    finally:
        declared.close()
    assert (status, body["error"]["code"]) == (413, "payload_too_large"), body
    assert set(body["error"]) == {"code", "message"}

    block = b"".join(b"SN-%08d\n" % n for n in range(1024 * 1024 // 12))  # valid lines, about 1 MiB

    def stream() -> Iterator[bytes]:
        """One byte over the limit, no more: the server reads all of it before it answers."""
        left = MAX_IMPORT_BODY_BYTES + 1
        for piece in itertools.chain([b"hardware_id\n"], itertools.repeat(block)):
            yield piece[:left]
            left -= len(piece[:left])
            if not left:
                return

    streamed = http.client.HTTPConnection("127.0.0.1", world.api.port, timeout=120)
    try:
        headers = {"Authorization": f"Bearer {world.write}", "Content-Type": "text/csv", "Transfer-Encoding": "chunked"}
        streamed.request("POST", url, body=stream(), headers=headers, encode_chunked=True)
        answer = streamed.getresponse()
        status, body = answer.status, json.loads(answer.read())
    finally:
        streamed.close()
    assert (status, body["error"]["code"]) == (413, "payload_too_large"), body
    assert rows(world) == before
    assert world.api.request("GET", "/healthz").status == 200  # and the API goes on


MALFORMED_CSV = {
    "not UTF-8": b"hardware_id\nSN-\xff\xfe\n",
    "no header": b"",
    "unknown column": b"hardware_id,colour\nSN-1,red\n",
    "no hardware_id column": b"name\npump\n",
    "a column twice": b"hardware_id,hardware_id\nSN-1,SN-1\n",
    "fields short": b"hardware_id,name\nSN-1,one\nSN-2\n",
    "fields over": b"hardware_id\nSN-1,extra\n",
    "a line twice": b"hardware_id\nSN-1\nSN-1\n",
    "bad labels": b"hardware_id,labels\nSN-1,novalue\n",
    "bad hardware id": b"hardware_id\nSN/1\n",
    "unterminated quote": b'hardware_id,name\nSN-1,"open\n',
    "NUL": b"hardware_id\nSN-\x001\n",
    "header only": b"hardware_id\n",
}


def test_a_malformed_csv_is_400_naming_its_lines_and_imports_nothing(world: World) -> None:
    document = world.api.request("GET", "/openapi.json", world.read).json()
    before = rows(world)
    for what, csv_body in MALFORMED_CSV.items():
        for dry_run in ("true", "false"):
            url = f"/v1/allowlist/import?dry_run={dry_run}"
            answer = world.api.request("POST", url, world.write, raw=csv_body, content_type="text/csv")
            assert (answer.status, answer.error_code) == (400, "invalid_request"), (what, answer)
            documented(document, "POST", "/v1/allowlist/import", answer)
            message = answer.json()["error"]["message"]
            assert "nothing was imported" in message and re.search(r"line \d+:", message), (what, message)
    assert rows(world) == before


# --- health, the OpenAPI document -----------------------------------------------------------------------------


def test_health_needs_no_token_and_readyz_says_what_is_down(world: World) -> None:
    assert world.api.request("GET", "/healthz").json() == {"status": "ok"}
    # The bridge here runs on a thread of this process, which shares its connection state with no API (a `serve`
    # does): to this API no bridge of its data dir is connected. tests/test_metrics.py has a real `serve` lose its
    # broker and get it back.
    answer = world.api.request("GET", "/readyz")
    assert (answer.status, answer.error_code) == (503, "unavailable")
    assert answer.json()["checks"]["database"] == "ok"
    assert answer.json()["checks"]["broker"].startswith("not connected")


def test_the_served_openapi_document_describes_every_route(world: World) -> None:
    document = world.api.request("GET", "/openapi.json", world.read).json()
    listed = sorted((method.upper(), path) for path, item in document["paths"].items() for method in item)
    assert listed == in_schema()
    assert set(served()) - set(listed) == DASHBOARD_FILES | SESSION | DOCUMENTS | {("GET", "/ui/events/stream")}
    assert document["components"]["securitySchemes"] == {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "pba_...",
            "description": document["components"]["securitySchemes"]["bearer"]["description"],
        }
    }
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    codes = set(schemas["ErrorDetail"]["properties"]["code"]["enum"])
    assert {"method_not_allowed", "too_many_streams", "csrf_failed", "payload_too_large"} <= codes
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation.get("summary"), (method, path)
            guarded = (method.upper(), path) in GUARDED
            assert operation.get("security") == ([{"bearer": []}] if guarded else None), (method, path)
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            if guarded:
                assert {"401", "403", "500", "503"} <= set(responses), (method, path)
            if "requestBody" in operation:
                assert "413" in responses and "400" in responses, (method, path)
            for status, response in responses.items():
                if int(status) >= 400 and (path, status) != ("/readyz", "503"):  # /readyz: its own answer
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorAnswer"}, (method, path, status)
    # What validation refuses is 400 invalid_request, as the document now says (not FastAPI's 422).
    refused = world.api.request("GET", "/v1/devices?limit=nope", world.read)
    assert (refused.status, refused.error_code) == (400, "invalid_request")


def _api_md() -> dict[tuple[str, str], tuple[str, set[int]]]:
    """docs/API.md's endpoint tables: (method, path) -> (scope, the error statuses of its last column)."""
    found: dict[tuple[str, str], tuple[str, set[int]]] = {}
    text = (Path(__file__).parent.parent / "docs" / "API.md").read_text()
    for match in re.finditer(r"^\| (GET|POST|PATCH|DELETE) \| `([^`]+)` \| (\w+) \|.*\| ([^|]*) \|$", text, re.M):
        method, path, scope, statuses = match.groups()
        assert (method, path) not in found, f"{method} {path} twice in docs/API.md"
        found[(method, path)] = (scope, {int(n) for n in re.findall(r"\d{3}", statuses)})
    return found


def test_docs_api_md_names_every_route_with_its_scope_and_errors() -> None:
    """docs/API.md cannot drift: it lists exactly the routes the app serves, each with the scope the route
    declares, and for those in the OpenAPI document the same errors beside 401, 403, 500 and 503."""
    listed = _api_md()
    assert set(listed) == set(served()), set(listed) ^ set(served())
    document = create_app(load_settings(None)).openapi()
    for (method, path), (scope, statuses) in listed.items():
        guarded, needs = takes_token(method, path)
        expected = (needs or "any") if guarded else ("session" if (method, path) in SESSION else "none")
        assert scope == expected, (method, path, scope)
        operation = document["paths"].get(path, {}).get(method.lower())
        if operation is not None:
            errors = {int(s) for s in operation["responses"] if int(s) >= 400} - {401, 403, 500, 503}
            assert statuses == errors, (method, path, sorted(statuses), sorted(errors))


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
