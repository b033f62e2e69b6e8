"""Issue 12: the dashboard's server side through real HTTP: its page under a strict CSP, sessions that hold no
admin token and resist CSRF (a change needs the session's X-CSRF-Token; a revoked admin token ends its sessions),
and the live event stream (Server-Sent Events) fed by the bridge's event flow on the broker, on the embedded broker
and on Mosquitto with the provbridge_jwt plugin. The browser test is tests/test_dashboard.py."""

import http.client
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.api.sessions import COOKIE
from bridge.config import Settings
from bridge.ops import admin
from bridge.ops import admin_tokens as tokens
from tests.helpers.api import Api, Response, api_server
from tests.helpers.bridge import Bridge
from tests.helpers.brokers import EMBEDDED, JWT, bridge_on
from tests.helpers.mqtt import token_session
from tests.helpers.refresh import provisioned


@pytest.fixture(params=[EMBEDDED, JWT])
def verifying_broker(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bridge]:
    with bridge_on(request.param, initialised, monkeypatch) as bridge:
        yield bridge


def make_token(bridge: Bridge, *scopes: str, tenant: str | None = None) -> tokens.Created:
    return tokens.create_admin_token(bridge.store, f"t-{uuid.uuid4().hex[:6]}", list(scopes), tenant, int(time.time()))


@dataclass(frozen=True)
class Browser:
    """What a browser holds after logging in: the session cookie and the CSRF token the page keeps."""

    api: Api
    cookie: str
    csrf: str

    def request(self, method: str, path: str, body: Any = None, csrf: str | None = "own") -> Response:
        headers = {"Cookie": f"{COOKIE}={self.cookie}"}
        if csrf is not None:
            headers["X-CSRF-Token"] = self.csrf if csrf == "own" else csrf
        return self.api.request(method, path, body=body, headers=headers)


def log_in(api: Api, raw_token: str) -> Browser:
    answer = api.request("POST", "/ui/session", body={"token": raw_token})
    assert answer.status == 200, answer
    cookie = answer.headers["set-cookie"]
    value = cookie.split(";")[0].split("=", 1)[1]
    return Browser(api, value, answer.json()["csrf"])


@pytest.fixture
def api(bridge: Bridge) -> Iterator[Api]:
    with api_server(bridge.settings) as running:
        yield running


def test_the_page_is_served_under_a_strict_policy(api: Api) -> None:
    page = api.request("GET", "/ui/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert api.request("GET", "/ui/static/app.js").headers["content-type"].startswith("text/javascript")
    for path in ("/ui/static/..%2fdashboard.py", "/ui/static/index.py", "/ui/static/%2e%2e"):
        assert api.request("GET", path).status == 404, path
    assert api.request("GET", "/").status in (302, 307)


def test_logging_in_trades_the_token_for_a_session_that_holds_none(bridge: Bridge, api: Api) -> None:
    made = make_token(bridge, "write")
    answer = api.request("POST", "/ui/session", body={"token": made.raw})
    assert answer.status == 200
    cookie = answer.headers["set-cookie"]
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert made.raw not in cookie and made.raw not in answer.body.decode()
    assert answer.json()["token"] == {"id": made.token.id, "name": made.token.name, "scopes": ["write"], "tenant": None}
    browser = log_in(api, made.raw)
    assert browser.request("GET", "/ui/session").json()["csrf"] == browser.csrf
    assert browser.request("GET", "/v1/devices").status == 200


@pytest.mark.parametrize(
    ("presented", "status"),
    [("pba_" + "A" * 43, 401), ("garbage", 401), ("", 400), ("backend", 403), ("revoked", 401)],
    ids=["unknown", "malformed", "empty", "backend-only", "revoked"],
)
def test_logging_in_refuses_what_is_not_a_live_dashboard_token(
    bridge: Bridge, api: Api, presented: str, status: int
) -> None:
    if presented == "backend":
        presented = make_token(bridge, "backend").raw
    elif presented == "revoked":
        gone = make_token(bridge, "write")
        tokens.revoke_admin_token(bridge.store, gone.token.id, int(time.time()))
        presented = gone.raw
    answer = api.request("POST", "/ui/session", body={"token": presented})
    assert answer.status == status and "set-cookie" not in answer.headers
    assert set(answer.json()["error"]) == {"code", "message"}


def test_a_change_without_the_sessions_csrf_token_is_refused_and_changes_nothing(bridge: Bridge, api: Api) -> None:
    browser = log_in(api, make_token(bridge, "write").raw)
    keys = bridge.store.count("provision_keys")
    for csrf in (None, "", "wrong", browser.csrf + "x"):
        answer = browser.request("POST", "/v1/keys", {"name": "from-elsewhere"}, csrf=csrf)
        assert (answer.status, answer.error_code) == (403, "csrf_failed"), csrf
    assert bridge.store.count("provision_keys") == keys
    made = browser.request("POST", "/v1/keys", {"name": "from-the-page"})
    assert made.status == 201 and bridge.store.count("provision_keys") == keys + 1
    # A read needs no CSRF token (it changes nothing, and another site cannot read the answer).
    assert browser.request("GET", "/v1/keys", csrf=None).status == 200
    # Logging out needs it too, then the cookie is worth nothing.
    assert browser.request("DELETE", "/ui/session", csrf="wrong").status == 403
    assert browser.request("DELETE", "/ui/session").status == 204
    assert browser.request("GET", "/v1/keys").status == 401


def test_a_session_is_held_to_its_tokens_scope_and_ends_with_it(bridge: Bridge, api: Api) -> None:
    reader = make_token(bridge, "read")
    browser = log_in(api, reader.raw)
    assert browser.request("GET", "/v1/devices").status == 200
    assert browser.request("POST", "/v1/keys", {"name": "nope"}).status == 403
    tokens.revoke_admin_token(bridge.store, reader.token.id, int(time.time()))
    assert browser.request("GET", "/v1/devices").status == 401
    assert browser.request("GET", "/ui/session").status == 401
    forged = Browser(api, "not-a-session", "x")
    assert forged.request("GET", "/v1/devices").status == 401


# --- the live stream ---------------------------------------------------------------------------------------


class EventStream:
    """An open /ui/events/stream, read on a thread: (event type, data) as they come."""

    def __init__(self, browser: Browser) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._conn = http.client.HTTPConnection("127.0.0.1", browser.api.port, timeout=60)
        self._conn.request("GET", "/ui/events/stream", headers={"Cookie": f"{COOKIE}={browser.cookie}"})
        self.response = self._conn.getresponse()
        self._socket = self._conn.sock
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        kind = None
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: ") and kind is not None:
                    self.items.put((kind, json.loads(line[len("data: ") :])))
                    kind = None
        except (OSError, ValueError, AttributeError, http.client.HTTPException):  # closed under it
            return

    def next_where(self, kind: str, match: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got_kind, data = self.items.get(timeout=max(0.01, deadline - time.monotonic()))
            if got_kind == kind and all(data.get(k) == v for k, v in match.items()):
                return dict(data)

    def close(self) -> None:
        if self._socket is not None:  # wakes the reader at once (closing alone waits for its read to end)
            self._socket.shutdown(socket.SHUT_RDWR)
        self._conn.close()


def test_the_stream_carries_the_bridges_events_and_presence_as_they_happen(verifying_broker: Bridge) -> None:
    bridge = verifying_broker
    admin.create_tenant(bridge.store, bridge.settings, "acme", int(time.time()))
    with api_server(bridge.settings) as api:
        everyone = EventStream(log_in(api, make_token(bridge, "read").raw))
        acme_only = EventStream(log_in(api, make_token(bridge, "read", tenant="acme").raw))
        assert everyone.response.status == 200
        assert everyone.response.getheader("content-type", "").startswith("text/event-stream")
        everyone.next_where("ready", {})  # subscribed on the broker: nothing published from now on is missed
        acme_only.next_where("ready", {})
        device, creds = provisioned(bridge)
        made = everyone.next_where("event", {"event": "device.provisioned", "device_id": device.device_id})
        assert made["tenant"] == "default" and "api_key" not in made
        with token_session(bridge.port, creds.mqtt):
            everyone.next_where("presence", {"device_id": device.device_id, "online": True})
        everyone.next_where("presence", {"device_id": device.device_id, "online": False})
        # A token of another tenant hears nothing of this one's devices.
        assert all(data.get("device_id") != device.device_id for _, data in drain(acme_only))
        everyone.close()
        acme_only.close()


def drain(stream: EventStream) -> list[tuple[str, Any]]:
    out = []
    while True:
        try:
            out.append(stream.items.get(timeout=0.5))
        except queue.Empty:
            return out
