"""The bridge under test: settings on a free port, `serve()` on a thread, the handles tests use, and a
provisioning-key row for the pure decisions' unit tests."""

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bridge.config import Settings, load_settings
from bridge.edges.serve import serve
from bridge.ops import admin
from bridge.storage import keyfiles
from bridge.storage.keyfiles import KeyRing
from bridge.storage.records import Device, ProvisionKey
from bridge.storage.store import Store
from tests.helpers.network import free_port


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    base = load_settings(None)
    broker = base.broker.model_copy(update={"port": free_port()})
    # Most tests send many messages from one client id on purpose; tests/test_floods.py turns the
    # flood limits back on (they are on by default).
    claims = base.claims.model_copy(update={"rate_limits": False})
    # DEBUG: claim workers and `serve` subprocesses log everything, for the whole-suite secret scan.
    api = base.api.model_copy(update={"port": free_port()})  # `serve` starts the admin API: never on a shared port
    update = {"data_dir": data_dir, "broker": broker, "claims": claims, "api": api, "log_level": "DEBUG", **overrides}
    return base.model_copy(update=update)


@dataclass
class Bridge:
    settings: Settings
    store: Store
    keys: KeyRing
    provision_key: str  # the unlimited first key made by init

    @property
    def port(self) -> int:
        return self.settings.broker.port

    @property
    def prefix(self) -> str:
        return self.settings.topic_prefix

    def create_key(self, **spec: object) -> str:
        spec.setdefault("tenant", "default")
        spec.setdefault("name", f"k-{uuid.uuid4().hex[:6]}")
        _, raw = admin.create_key(self.store, self.settings, admin.KeySpec(**spec), int(time.time()))  # type: ignore[arg-type]
        return raw


def provision_key_row(**overrides: object) -> ProvisionKey:
    """A provisioning key as the store returns it, for the pure decisions' unit tests."""
    fields: dict[str, object] = dict(
        id="key_1",
        tenant_id="ten_1",
        tenant_name="t",
        name="k",
        kind="key",
        key_hash=b"h",
        profile="default",
        hardware_id_pattern=None,
        expires_at=None,
        max_registrations=None,
        registrations=0,
        labels={},
        groups=[],
        reclaim_policy="reject",
        status="active",
        created_at=0,
    )
    return ProvisionKey(**(fields | overrides))  # type: ignore[arg-type]


def device_row(**overrides: object) -> Device:
    """A device as the store returns it, for the pure decisions' unit tests."""
    fields: dict[str, object] = dict(
        id="dev_1",
        tenant_id="ten_1",
        tenant_name="t",
        hardware_id="hw",
        name=None,
        public_key=b"pk",
        cloud_key_id="c",
        labels={},
        groups=[],
        profile="default",
        hardware=None,
        network=None,
        agent_version=None,
        key_id="key_1",
        status="active",
        created_at=0,
        updated_at=0,
    )
    return Device(**(fields | overrides))  # type: ignore[arg-type]


@contextmanager
def serving(settings: Settings) -> Iterator[None]:
    """`serve()` on its own thread and event loop until the block ends (SIGINT-free, as tests need)."""
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(settings, stop=stop, ready=ready))
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name="serve", daemon=True)
    thread.start()
    assert ready.wait(30), "bridge did not become ready"
    assert not errors, errors
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
        assert not errors, errors


@contextmanager
def serving_bridge(settings: Settings, first_key: str) -> Iterator[Bridge]:
    """`serving`, with the handles tests use: a store on the same file, the keys, the first key."""
    with serving(settings):
        store = Store(settings.database)
        try:
            yield Bridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key)
        finally:
            store.close()
