"""Issue 12: the dashboard's server side through real HTTP: its page under a strict CSP, sessions that hold no
admin token and resist CSRF (a change needs the session's X-CSRF-Token; a revoked admin token ends its sessions),
and the live event stream (Server-Sent Events) fed by the bridge's event flow on the broker, on the embedded broker
and on Mosquitto with the provbridge_jwt plugin. The browser test is tests/test_dashboard.py."""

import http.client
import json
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.api.live import MAX_STREAMS_PER_TOKEN
from bridge.api.server import server_config
from bridge.api.sessions import COOKIE, IDLE_SECONDS, MAX_SECONDS, MAX_SESSIONS_PER_TOKEN, Sessions
from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.ops import admin
from bridge.ops import admin_tokens as tokens
from bridge.storage.store import Store
from bridge.tls.certificates import TlsFiles
from tests.helpers.api import Api, Response, api_server
from tests.helpers.bridge import Bridge
from tests.helpers.mqtt import token_session
from tests.helpers.refresh import provisioned
from tests.helpers.tls import initialise, tls_settings
from tests.helpers.waiting import wait_for


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
        self.finished = threading.Event()  # the server ended the stream
        self._conn = http.client.HTTPConnection("127.0.0.1", browser.api.port, timeout=60)
        self._conn.request("GET", "/ui/events/stream", headers={"Cookie": f"{COOKIE}={browser.cookie}"})
        self.response = self._conn.getresponse()
        self._socket = self._conn.sock
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._lines()
        finally:
            self.finished.set()

    def _lines(self) -> None:
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


def test_an_open_stream_ends_once_its_admin_token_is_revoked(bridge: Bridge) -> None:
    with api_server(bridge.settings) as api:
        reader = make_token(bridge, "read")
        stream = EventStream(log_in(api, reader.raw))
        stream.next_where("ready", {})
        tokens.revoke_admin_token(bridge.store, reader.token.id, int(time.time()))
        stream.next_where("ended", {}, timeout=30)
        assert stream.finished.wait(30)  # and the server closed it: nothing more reaches a revoked token
        stream.close()


def test_a_token_holds_a_bounded_number_of_open_streams(bridge: Bridge) -> None:
    """Each stream is a queue and a connection: one token cannot open them without end (429 too_many_streams),
    another token is not held back by it, and a closed stream makes room again."""
    with api_server(bridge.settings) as api:
        browser = log_in(api, make_token(bridge, "read").raw)
        streams = [EventStream(browser) for _ in range(MAX_STREAMS_PER_TOKEN)]
        assert all(stream.response.status == 200 for stream in streams)
        cookie = {"Cookie": f"{COOKIE}={browser.cookie}"}
        refused = api.request("GET", "/ui/events/stream", headers=cookie)
        assert refused.status == 429, refused
        assert refused.json()["error"]["code"] == "too_many_streams"
        other = EventStream(log_in(api, make_token(bridge, "read").raw))
        assert other.response.status == 200
        other.next_where("ready", {})
        streams.pop().close()
        assert wait_for(lambda: _opens(browser), timeout=30)  # once the server has seen that one go
        for stream in [*streams, other]:
            stream.close()


def _opens(browser: Browser) -> bool:
    """Whether a stream opens for `browser` now (closed again at once)."""
    stream = EventStream(browser)
    status = stream.response.status
    stream.close()
    return status == 200


def drain(stream: EventStream) -> list[tuple[str, Any]]:
    out = []
    while True:
        try:
            out.append(stream.items.get(timeout=0.5))
        except queue.Empty:
            return out


# --- HTTPS ----------------------------------------------------------------------------------------------------


def test_with_api_tls_the_api_speaks_https_with_the_broker_certificate_and_secure_cookies(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data")
    initialise(settings)
    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"tls": True})})
    raw = tokens.create_admin_token(Store(settings.database), "tls", ["read"], None, int(time.time())).raw
    ca = ssl.create_default_context(cafile=str(TlsFiles.of(settings.data_dir).ca_cert))  # hostname checked
    with api_server(settings) as api:
        conn = http.client.HTTPSConnection("127.0.0.1", api.port, timeout=30, context=ca)
        conn.request(
            "POST", "/ui/session", body=json.dumps({"token": raw}), headers={"Content-Type": "application/json"}
        )
        answer = conn.getresponse()
        assert answer.status == 200
        cookie = answer.getheader("set-cookie", "")
        assert cookie.startswith("__Host-")  # set by this origin over HTTPS only; no sibling domain can plant it
        assert "secure" in {part.strip().lower() for part in cookie.split(";")}  # never sent over plain HTTP
        assert answer.getheader("strict-transport-security", "").startswith("max-age=")
        answer.read()
        conn.close()
        with pytest.raises((http.client.HTTPException, OSError)):  # no plain HTTP on the HTTPS port
            api.request("GET", "/healthz")


def test_api_tls_without_the_certificate_is_refused_with_a_clear_message(initialised: tuple[Settings, str]) -> None:
    settings = initialised[0]
    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"tls": True})})
    with pytest.raises(ConfigError, match="provbridge tls init"):
        server_config(settings)


# --- the session table ------------------------------------------------------------------------------------------


def test_sessions_end_when_idle_or_old_and_one_token_cannot_crowd_out_the_others() -> None:
    table = Sessions()
    mine = table.open("adm_mine", 0.0)
    assert table.find(mine.cookie, IDLE_SECONDS - 1) is mine.session
    assert table.find(mine.cookie, 2 * IDLE_SECONDS - 2, touch=False) is mine.session  # a stream's check: no touch
    assert table.find(mine.cookie, 2 * IDLE_SECONDS) is None  # idle since its last request
    busy = table.open("adm_busy", 0.0)
    for n in range(1, MAX_SESSIONS_PER_TOKEN + 5):
        assert table.find(busy.cookie, float(n)) is not None  # kept in use, so it is not the oldest
        table.open("adm_flood", float(n))
    assert table.find(busy.cookie, 100.0) is not None  # another token's logins never pushed it out
    assert table.held_by("adm_flood") == MAX_SESSIONS_PER_TOKEN
    old = table.open("adm_old", 0.0)
    for n in range(1, int(MAX_SECONDS // IDLE_SECONDS) + 2):
        table.find(old.cookie, n * IDLE_SECONDS - 1)  # in use all along
    assert table.find(old.cookie, MAX_SECONDS + 1) is None  # but no session outlives MAX_SECONDS
