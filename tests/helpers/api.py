"""The admin HTTP API in tests: a real uvicorn server on a free loopback port (in a thread of the test process),
or the one a real `provbridge serve` subprocess starts, and a plain HTTP client (http.client), so requests go
over real sockets as a backend's would."""

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from bridge.api.server import server_config
from bridge.config import Settings
from bridge.ops import admin_tokens
from bridge.storage import keyfiles
from bridge.storage.store import Store
from tests.helpers.bridge import Bridge
from tests.helpers.network import free_port
from tests.helpers.processes import ServeProcesses
from tests.helpers.waiting import wait_for


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        return str(self.json()["error"]["code"])


@dataclass(frozen=True)
class Api:
    port: int
    settings: Settings

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Response:
        sent = {**(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", content_type)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=sent)
            answer = conn.getresponse()
            return Response(answer.status, answer.read(), {k.lower(): v for k, v in answer.getheaders()})
        finally:
            conn.close()


@contextmanager
def api_server(settings: Settings) -> Iterator[Api]:
    """`provbridge api` for `settings` (an initialised data dir), until the block ends."""
    port = free_port()
    settings = settings.model_copy(update={"api": settings.api.model_copy(update={"port": port})})
    server = uvicorn.Server(server_config(settings))
    thread = threading.Thread(target=server.run, name="admin-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the admin API did not start"
        time.sleep(0.01)
    try:
        yield Api(port, settings)
    finally:
        server.should_exit = True
        thread.join(30)
        server.config.app.state.context.live.stop()  # the dashboard's broker connection, if a stream opened it


@contextmanager
def serve_with_api(settings: Settings, first_key: str, scope: str) -> Iterator[tuple[Bridge, Api, str]]:
    """`provbridge serve` as a subprocess (its admin API in a process of its own) until the block ends: the
    bridge, its API, and an admin token with `scope` for every tenant."""
    store = Store(settings.database)
    token = admin_tokens.create_admin_token(store, f"test-{scope}", [scope], None, int(time.time())).raw
    with ServeProcesses(settings):
        api = Api(settings.api.port, settings)
        assert wait_for(lambda: _up(api), timeout=30), "serve did not start its admin API"
        try:
            yield Bridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key), api, token
        finally:
            store.close()


def _up(api: Api) -> bool:
    try:
        return api.request("GET", "/healthz").status == 200
    except OSError:
        return False
