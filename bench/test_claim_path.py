"""Micro-benchmarks of the pure claim path, step by step, so a regression shows where it is.

    .venv/bin/python -m pytest bench/test_claim_path.py --benchmark-only

The steps `Provisioner.handle` runs for a new device, in order, each on its own:
validate (pydantic, strict, including the P-256 point check) -> key lookup (SHA-256 of the key,
SELECT by hash) -> ECDH -> HKDF -> sign (the ES256 token) -> seal (AES-256-GCM of the credentials)
-> answer JSON -> the SQLite transaction (idempotency lookup, key, device lookup, insert, key use,
stored answer, event, COMMIT) on a real database file; then the whole `handle` for comparison.
No MQTT here: bench/run.py measures the end-to-end path. Not collected by `make test` (pytest's
testpaths is tests/); needs the `bench` extra (pytest-benchmark).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.claims import identifiers
from bridge.claims.provisioning import Provisioner, parse_claim
from bridge.config import Settings, load_settings
from bridge.ops import admin
from bridge.storage.keyfiles import KeyRing, load_keys
from bridge.storage.records import Device
from bridge.storage.store import Store, Transaction
from bridge.tokens import fill_scope, mint_token
from provwire import crypto, topics
from provwire.models import (
    Claim,
    ClaimOk,
    Credentials,
    Event,
    Hardware,
    MqttCredentials,
    Sealed,
    to_json,
)

HARDWARE = Hardware(board_model="provbridge-bench", cpu_cores=1, ram_mb=256, os="linux", arch="armv7l")
CLIENT_ID = "bench-micro"


@dataclass
class Env:
    settings: Settings
    store: Store
    keys: KeyRing
    raw_key: str
    provisioner: Provisioner
    counter: Iterator[int]

    def claim_payload(self) -> tuple[bytes, str, str]:
        """A fresh device's claim (new key pair, new hardware id), like the load generator's."""
        n = next(self.counter)
        private = crypto.generate_private_key()
        request_id = f"micro.{n:08d}"
        hardware_id = f"micro-{n:08d}"
        claim = Claim(
            request_id=request_id,
            provision_key=self.raw_key,
            hardware_id=hardware_id,
            public_key=crypto.b64encode(crypto.sec1(private.public_key())),
            cloud_key_id=self.keys.active_cloud,
            hardware=HARDWARE,
            agent_version="provbridge-bench/1",
        )
        return to_json(claim), request_id, hardware_id


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    data_dir: Path = tmp_path_factory.mktemp("micro") / "data"
    settings = load_settings(None).model_copy(update={"data_dir": data_dir})
    admin.init_data_dir(settings)
    store = Store(settings.database_file)
    _, raw = admin.create_key(store, settings, admin.KeySpec(tenant="default", name="micro"), int(time.time()))
    keys = load_keys(data_dir)
    yield Env(settings, store, keys, raw, Provisioner(settings, store, keys), itertools.count())
    store.close()


@pytest.fixture(scope="module")
def sample(env: Env) -> dict[str, Any]:
    """One claim taken through every step, so each benchmark can start from its inputs."""
    payload, request_id, _ = env.claim_payload()
    claim = parse_claim(payload)
    assert isinstance(claim, Claim)
    cloud = env.keys.cloud_key
    shared = crypto.shared_secret(cloud, crypto.public_key_from_sec1(claim.public_key_sec1))
    device_id = identifiers.new_device_id(time.time())
    grant = _sign(env, device_id)
    credentials = _credentials(env, device_id, grant.token, grant.expires_at, grant.publish, grant.subscribe)
    return {
        "payload": payload,
        "claim": claim,
        "request_id": request_id,
        "shared": shared,
        "seal_key": crypto.derive_seal_key(shared, request_id),
        "device_id": device_id,
        "credentials": credentials,
        "key_hash": identifiers.digest(identifiers.normalise_key(claim.provision_key)),
    }


def _sign(env: Env, device_id: str) -> Any:
    profile = env.settings.profiles["default"]
    return mint_token(
        key=env.keys.token_key,
        kid=env.keys.active_token,
        issuer=env.settings.token.issuer,
        audience=env.settings.token.audience,
        device_id=device_id,
        tenant="default",
        publish=fill_scope(profile.publish, device_id, "default"),
        subscribe=fill_scope(profile.subscribe, device_id, "default"),
        now=int(time.time()),
        ttl_seconds=env.settings.token.ttl_seconds,
    )


def _credentials(env: Env, device_id: str, token: str, exp: int, pub: list[str], sub: list[str]) -> Credentials:
    broker = env.settings.broker
    mqtt = MqttCredentials(
        host=broker.host,
        port=broker.port,
        tls=broker.tls,
        client_id=device_id,
        username=device_id,
        token=token,
        expires_at=exp,
        publish=pub,
        subscribe=sub,
    )
    return Credentials(api_key=identifiers.new_api_key(), mqtt=mqtt)


def _fresh(make: Callable[[], Any]) -> Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]:
    """A pedantic setup: each round gets new inputs, made outside the timed call."""
    return lambda: ((make(),), {})


# --- the steps, in the order handle() runs them ---------------------------------------------------


@pytest.mark.benchmark(group="claim path: steps")
def test_01_validate(benchmark: Any, sample: dict[str, Any]) -> None:
    result = benchmark(parse_claim, sample["payload"])
    assert isinstance(result, Claim)


@pytest.mark.benchmark(group="claim path: steps")
def test_02_key_lookup(benchmark: Any, env: Env, sample: dict[str, Any]) -> None:
    claim: Claim = sample["claim"]
    reads = Transaction(env.store.connection())  # a read outside a transaction: the lookup's cost alone

    def lookup() -> Any:
        return reads.key_by_hash(identifiers.digest(identifiers.normalise_key(claim.provision_key)))

    assert benchmark(lookup) is not None


@pytest.mark.benchmark(group="claim path: steps")
def test_03_ecdh(benchmark: Any, env: Env, sample: dict[str, Any]) -> None:
    claim: Claim = sample["claim"]
    cloud = env.keys.cloud_key

    def ecdh() -> bytes:
        return crypto.shared_secret(cloud, crypto.public_key_from_sec1(claim.public_key_sec1))

    assert benchmark(ecdh) == sample["shared"]


@pytest.mark.benchmark(group="claim path: steps")
def test_04_hkdf(benchmark: Any, sample: dict[str, Any]) -> None:
    assert len(benchmark(crypto.derive_seal_key, sample["shared"], sample["request_id"])) == 32


@pytest.mark.benchmark(group="claim path: steps")
def test_05_sign(benchmark: Any, env: Env, sample: dict[str, Any]) -> None:
    assert benchmark(_sign, env, sample["device_id"]).token.count(".") == 2


@pytest.mark.benchmark(group="claim path: steps")
def test_06_seal(benchmark: Any, sample: dict[str, Any]) -> None:
    key, request_id, credentials = sample["seal_key"], sample["request_id"], sample["credentials"]

    def seal() -> Sealed:
        box = crypto.seal(key, to_json(credentials), request_id)
        return Sealed(nonce=crypto.b64encode(box.nonce), ciphertext=crypto.b64encode(box.ciphertext))

    assert benchmark(seal).ciphertext


@pytest.mark.benchmark(group="claim path: steps")
def test_07_answer_json(benchmark: Any, env: Env, sample: dict[str, Any]) -> None:
    box = crypto.seal(sample["seal_key"], to_json(sample["credentials"]), sample["request_id"])
    sealed = Sealed(nonce=crypto.b64encode(box.nonce), ciphertext=crypto.b64encode(box.ciphertext))

    def answer() -> bytes:
        ok = ClaimOk(
            request_id=sample["request_id"],
            device_id=sample["device_id"],
            created=True,
            labels={},
            groups=[],
            profile="default",
            cloud_key_id=env.keys.active_cloud,
            sealed=sealed,
        )
        return to_json(ok)

    assert benchmark(answer).startswith(b"{")


@pytest.mark.benchmark(group="claim path: steps")
def test_08_transaction(benchmark: Any, env: Env, sample: dict[str, Any]) -> None:
    """Everything handle() does in its write transaction for a new device, on a real SQLite file."""
    claim: Claim = sample["claim"]
    key_hash = sample["key_hash"]
    answer = b"x" * 1448  # the size of a real answer
    retention = env.settings.claims.response_retention_seconds

    def transaction(n: int) -> None:
        now = int(time.time())
        hardware_id, request_id = f"tx-{n:08d}", f"tx.{n:08d}"
        with env.store.transaction() as tx:
            assert tx.stored_answer(CLIENT_ID, request_id, now - retention) is None
            key = tx.key_by_hash(key_hash)
            assert key is not None
            assert tx.device_by_hardware_id(key.tenant_id, hardware_id) is None
            device = Device(
                id=identifiers.new_device_id(now),
                tenant_id=key.tenant_id,
                tenant_name=key.tenant_name,
                hardware_id=hardware_id,
                name=None,
                public_key=claim.public_key_sec1,
                cloud_key_id=env.keys.active_cloud,
                labels={},
                groups=[],
                profile="default",
                hardware=HARDWARE.model_dump(exclude_none=True),
                network=None,
                agent_version="provbridge-bench/1",
                key_id=key.id,
                status="active",
                created_at=now,
                updated_at=now,
            )
            tx.insert_device(device, identifiers.digest(identifiers.new_api_key()))
            tx.spend_key_use(key.id)
            tx.store_answer(CLIENT_ID, request_id, b"d" * 32, answer, now)
            stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            event = Event(event="device.provisioned", time=stamp, tenant="default", device_id=device.id)
            tx.add_event(event)

    counter = itertools.count()
    benchmark.pedantic(transaction, setup=_fresh(lambda: next(counter)), rounds=300, warmup_rounds=5)


# --- the whole thing ------------------------------------------------------------------------------


@pytest.mark.benchmark(group="claim path: whole handle()")
def test_09_handle_new_device(benchmark: Any, env: Env) -> None:
    """Provisioner.handle for a new device: every step above plus the glue between them."""
    topic = topics.claim_topic(env.settings.topic_prefix, CLIENT_ID)
    outcomes = []

    def handle(payload: bytes) -> None:
        outcomes.append(env.provisioner.handle(topic, payload))

    benchmark.pedantic(handle, setup=_fresh(lambda: env.claim_payload()[0]), rounds=300, warmup_rounds=5)
    assert all(o.summary == "device.provisioned" for o in outcomes), {o.summary for o in outcomes}
