"""Fixtures: an initialised data dir and a running bridge with its embedded broker on loopback."""

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from bridge import admin, keyfiles
from bridge.config import Settings, load_settings
from bridge.keyfiles import KeyRing
from bridge.serve import serve
from bridge.store import ProvisionKey, Store
from provwire import crypto, topics
from provwire.models import Claim, ClaimError, ClaimOk, Credentials, to_json
from tests.mqtt_client import MqttClient


def pytest_configure(config: pytest.Config) -> None:
    # The session log below needs every record, so the root logger is opened to DEBUG; pytest's own
    # capture (caplog, failure reports) is kept at WARNING, where the closed root logger used to cut.
    if config.getoption("log_level") is None and not config.getini("log_level"):
        config.option.log_level = "WARNING"
    logging.getLogger().setLevel(logging.DEBUG)


@pytest.fixture(scope="session", autouse=True)
def session_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every log record of the pytest process, DEBUG up, in `<basetemp>/session-log/pytest.log`: what
    tests/secret_scan.py scans after the whole suite (records of claim workers arrive here too)."""
    path = tmp_path_factory.mktemp("session-log", numbered=False) / "pytest.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    base = load_settings(None)
    broker = base.broker.model_copy(update={"port": free_port()})
    # Most tests send many messages from one client id on purpose; tests/test_floods.py turns the
    # flood limits back on (they are on by default).
    claims = base.claims.model_copy(update={"rate_limits": False})
    # DEBUG: claim workers and `serve` subprocesses log everything, for the whole-suite secret scan.
    update = {"data_dir": data_dir, "broker": broker, "claims": claims, "log_level": "DEBUG", **overrides}
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


@pytest.fixture
def initialised(tmp_path: Path) -> tuple[Settings, str]:
    """Settings on a free port and a fresh data dir, with the raw first key `init` printed."""
    s = make_settings(tmp_path / "data")
    result = admin.init_data_dir(s)
    assert result.created and result.provision_key
    return s, result.provision_key


@pytest.fixture
def settings(initialised: tuple[Settings, str]) -> Settings:
    return initialised[0]


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
        store = Store(settings.database_file)
        try:
            yield Bridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key)
        finally:
            store.close()


@pytest.fixture
def bridge(initialised: tuple[Settings, str]) -> Iterator[Bridge]:
    with serving_bridge(*initialised) as running:
        yield running


class Device:
    """A device as firmware would be: a P-256 key pair, a hardware id, the cloud public key."""

    def __init__(self, bridge: Bridge, hardware_id: str | None = None, client_id: str | None = None) -> None:
        self.bridge = bridge
        self.hardware_id = hardware_id or f"hw-{uuid.uuid4().hex[:12]}"
        self.client_id = client_id or self.hardware_id
        self.private_key: ec.EllipticCurvePrivateKey = crypto.generate_private_key()
        self.conn = MqttClient(bridge.port, self.client_id)

    def __enter__(self) -> "Device":
        assert self.conn.connect()
        assert self.conn.subscribe(topics.response_topic(self.bridge.prefix, self.client_id)) == [1]
        return self

    def __exit__(self, *_exc: object) -> None:
        self.conn.close()

    @property
    def public_key_b64(self) -> str:
        return crypto.b64encode(crypto.sec1(self.private_key.public_key()))

    def claim_payload(self, key: str, request_id: str | None = None, **extra: object) -> bytes:
        claim = Claim(
            request_id=request_id or uuid.uuid4().hex,
            provision_key=key,
            hardware_id=self.hardware_id,
            public_key=self.public_key_b64,
            **extra,  # type: ignore[arg-type]
        )
        return to_json(claim)

    def send(self, payload: bytes) -> bytes:
        """Publish a raw payload on this device's claim topic; return the raw answer."""
        self.conn.publish(topics.claim_topic(self.bridge.prefix, self.client_id), payload)
        topic, answer = self.conn.next_message()
        assert topic == topics.response_topic(self.bridge.prefix, self.client_id)
        return answer

    def claim(self, key: str, request_id: str | None = None) -> ClaimOk | ClaimError:
        raw = self.send(self.claim_payload(key, request_id))
        data = json.loads(raw)
        return ClaimOk.model_validate(data) if data["status"] == "ok" else ClaimError.model_validate(data)

    def open(self, answer: ClaimOk) -> Credentials:
        cloud = self.bridge.keys.cloud[answer.cloud_key_id].public_key()
        shared = crypto.shared_secret(self.private_key, cloud)
        box = crypto.SealedBox(crypto.b64decode(answer.sealed.nonce), crypto.b64decode(answer.sealed.ciphertext))
        plain = crypto.open_sealed(crypto.derive_seal_key(shared, answer.request_id), box, answer.request_id)
        return Credentials.model_validate_json(plain)


def race_one_time_key(bridge: Bridge, contenders: int = 50) -> list[dict[str, object]]:
    """`contenders` distinct devices claim with one one-time key at the same moment; returns the answers.

    The core concurrency guarantee (exactly one device) is checked by the callers, per broker.
    """
    key = bridge.create_key(max_registrations=1)
    devices = [Device(bridge) for _ in range(contenders)]
    for d in devices:
        d.__enter__()
    payloads = [d.claim_payload(key) for d in devices]
    answers: list[bytes] = [b""] * contenders
    start = threading.Barrier(contenders)

    def go(i: int) -> None:
        start.wait()
        answers[i] = devices[i].send(payloads[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for d in devices:
        d.__exit__()
    statuses: list[dict[str, object]] = [json.loads(a) for a in answers]
    assert sum(s["status"] == "ok" for s in statuses) == 1
    assert sum(s.get("code") == "permission_denied" for s in statuses) == contenders - 1
    assert bridge.store.count("devices") == 1
    return statuses
