"""Key files and the bridge secret shared through PostgreSQL by the bridges of several hosts
(bridge/storage/sharedfiles.py): two data dirs ("hosts") on one database of a real PostgreSQL server."""

import base64
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest

from bridge.config import Settings, StorageSettings
from bridge.errors import CheckFailed, CheckWarning, NotInitialised
from bridge.ops import admin, lifecycle
from bridge.ops.doctor import check_shared_keys
from bridge.storage import keyfiles, rotation, sharedfiles, statefiles
from bridge.storage.rotation import prunable_at
from bridge.storage.store import Store
from broker.denylist import parse_denylist
from tests.helpers.bridge import Bridge, make_settings, serving_bridge
from tests.helpers.devices import provision
from tests.helpers.postgres import PostgresServer
from tests.helpers.waiting import wait_for


@pytest.fixture
def url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


def host(root: Path, url: str, **overrides: object) -> Settings:
    storage = StorageSettings(url=url, key_sync_seconds=0.2)
    return make_settings(root / "data", storage=storage, **overrides)


def joined(first: Settings, root: Path, url: str) -> Settings:
    """Another host of `first`'s deployment: given its storage key, `init` takes the keys from the database."""
    other = host(root, url)
    other.data_dir.mkdir(parents=True)
    shutil.copy(first.storage_key_file, other.storage_key_file)
    result = admin.init_data_dir(other)
    assert result.joined and not result.created and result.provision_key is None
    return other


def pems(settings: Settings) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in keyfiles.keys_dir(settings.data_dir).glob("*.pem")}


def rows(settings: Settings) -> dict[str, bytes | None]:
    store = Store(settings.database)
    try:
        return store.shared_files()
    finally:
        store.close()


def sync(settings: Settings) -> list[str]:
    store = Store(settings.database)
    try:
        return sharedfiles.sync(settings, store)
    finally:
        store.close()


def test_a_second_host_joins_with_the_storage_key_and_gets_the_same_keys(tmp_path: Path, url: str) -> None:
    a = host(tmp_path / "a", url)
    first = admin.init_data_dir(a)
    assert first.created and first.provision_key
    b = joined(a, tmp_path / "b", url)
    assert pems(b) == pems(a) and len(pems(a)) == 3  # cloud, token and the next token key: byte for byte
    assert keyfiles.read_secret(b.bridge_secret_file) == keyfiles.read_secret(a.bridge_secret_file)
    assert (b.data_dir / "jwks.json").read_bytes() == (a.data_dir / "jwks.json").read_bytes()
    assert (b.data_dir / "cloud_public.pem").read_bytes() == (a.data_dir / "cloud_public.pem").read_bytes()
    store = Store(url)
    try:
        assert len(store.keys()) == 1  # joining made no tenant and no provisioning key
    finally:
        store.close()


def test_a_host_without_the_deployment_s_storage_key_is_refused_and_nothing_is_written(
    tmp_path: Path, url: str
) -> None:
    a = host(tmp_path / "a", url)
    admin.init_data_dir(a)
    b = host(tmp_path / "b", url)
    with pytest.raises(NotInitialised, match=r"storage\.key"):
        admin.init_data_dir(b)
    assert not keyfiles.is_initialised(b.data_dir)
    sharedfiles.create_host_key(b)  # another key: nothing opens with it
    with pytest.raises(NotInitialised, match="does not open"):
        admin.init_data_dir(b)
    assert not keyfiles.is_initialised(b.data_dir) and not pems(b)


def test_the_database_holds_every_shared_file_sealed_never_in_clear(tmp_path: Path, url: str) -> None:
    a = host(tmp_path / "a", url)
    admin.init_data_dir(a)
    stored = rows(a)
    assert (
        set(stored)
        == set(sharedfiles.local_files(a))
        == {
            *(f"keys/{name}" for name in pems(a)),
            "keys/active.json",
            "bridge.secret",
        }
    )
    secret = keyfiles.read_secret(a.bridge_secret_file).encode()
    body = {name: b"".join(pem.splitlines()[1:-1]) for name, pem in pems(a).items()}  # each key's base64
    for data in stored.values():
        assert data is not None
        assert b"PRIVATE KEY" not in data and secret not in data
        assert not any(key in data or base64.b64decode(key)[-32:] in data for key in body.values())
    assert (a.storage_key_file.stat().st_mode & 0o077) == 0  # the storage key: the owner's only


def test_a_rotation_on_one_host_reaches_the_other_and_a_pruned_key_leaves_both(tmp_path: Path, url: str) -> None:
    a = host(tmp_path / "a", url)
    admin.init_data_dir(a)
    b = joined(a, tmp_path / "b", url)
    now = int(time.time())
    done = sharedfiles.rotate(a, "token", now)
    assert keyfiles.load_keys(b.data_dir).active_token == done.old_kid  # b has not looked yet
    assert "keys/active.json" in sync(b)
    ring = keyfiles.load_keys(b.data_dir)
    assert ring.active_token == done.new_kid
    assert done.next_kid in {k["kid"] for k in json.loads((b.data_dir / "jwks.json").read_text())["keys"]}
    assert sync(b) == []  # nothing new: nothing written
    pruned = sharedfiles.prune(a, prunable_at(now))
    assert pruned == (done.old_kid,)
    assert f"keys/token-{done.old_kid}.pem" in sync(b)
    assert pems(b) == pems(a) and f"token-{done.old_kid}.pem" not in pems(b)


def test_rotations_on_two_hosts_at_once_take_turns(tmp_path: Path, url: str) -> None:
    a = host(tmp_path / "a", url)
    admin.init_data_dir(a)
    b = joined(a, tmp_path / "b", url)
    start = threading.Barrier(2)
    done: list[rotation.Rotation] = []

    def rotate(settings: Settings) -> None:
        start.wait()
        done.append(sharedfiles.rotate(settings, "token", int(time.time())))

    threads = [threading.Thread(target=rotate, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(done) == 2
    first, second = done
    assert second.old_kid == first.new_kid  # the second started from the first one's result, not from the same state
    sync(a), sync(b)
    assert pems(a) == pems(b)
    assert rotation.read_active(a.data_dir) == rotation.read_active(b.data_dir)
    assert keyfiles.load_keys(a.data_dir).active_token == second.new_kid
    retired = rotation.read_active(a.data_dir)["retired"]["token"]
    assert {first.old_kid, second.old_kid} <= set(retired)


@contextmanager
def serving_on_a_second_host(tmp_path: Path, url: str) -> Iterator[tuple[Settings, Bridge]]:
    """Host a made the deployment; host b joined it and runs a bridge. Yields a's settings and b's bridge."""
    a = host(tmp_path / "a", url)
    key = admin.init_data_dir(a).provision_key
    assert key
    b = joined(a, tmp_path / "b", url)
    with serving_bridge(b, key) as bridge:
        yield a, bridge


def test_a_running_bridge_signs_with_a_key_rotated_on_another_host(tmp_path: Path, url: str) -> None:
    with serving_on_a_second_host(tmp_path, url) as (a, bridge):
        b = bridge.settings
        _, before = provision(bridge)
        done = sharedfiles.rotate(a, "token", int(time.time()))
        assert jwt.get_unverified_header(before.mqtt.token or "")["kid"] == done.old_kid
        assert wait_for(lambda: keyfiles.load_keys(b.data_dir).active_token == done.new_kid, timeout=30)
        _, after = provision(bridge)
        assert jwt.get_unverified_header(after.mqtt.token or "")["kid"] == done.new_kid


def test_a_device_revoked_on_one_host_is_denied_by_the_other_host_s_broker(tmp_path: Path, url: str) -> None:
    with serving_on_a_second_host(tmp_path, url) as (a, bridge):
        b = bridge.settings
        device_id, _ = provision(bridge)
        store = Store(a.database)
        try:
            lifecycle.revoke_device(a, store, device_id)  # on host a: its own denylist at once
        finally:
            store.close()
        assert device_id in parse_denylist(statefiles.denylist_file(a.data_dir).read_bytes()).devices

        def denied_on_b() -> bool:
            return device_id in parse_denylist(statefiles.denylist_file(b.data_dir).read_bytes()).devices

        assert wait_for(denied_on_b, timeout=30)  # host b's bridge took it from the database


def test_the_doctor_compares_a_host_s_key_files_with_the_database_s(tmp_path: Path, url: str) -> None:
    a = host(tmp_path / "a", url)
    admin.init_data_dir(a)
    b = joined(a, tmp_path / "b", url)
    assert "the same as the database's" in check_shared_keys(b)
    sharedfiles.rotate(a, "token", int(time.time()))
    with pytest.raises(CheckWarning, match=r"keys/active\.json"):
        check_shared_keys(b)  # until b takes them
    sync(b)
    assert "the same as the database's" in check_shared_keys(b)
    b.storage_key_file.unlink()
    sharedfiles.create_host_key(b)
    with pytest.raises(CheckFailed, match="storage key"):
        check_shared_keys(b)


def test_a_deployment_from_before_sharing_puts_its_files_in_the_database_at_its_first_sync(
    tmp_path: Path, url: str
) -> None:
    a = host(tmp_path / "a", url)
    admin.init_data_dir(a)
    store = Store(url)
    try:
        store.connection().execute("DELETE FROM shared_files")  # as a database from before migration 12 is
        a.storage_key_file.unlink()
        assert sync(a) == []
        assert set(store.shared_files()) == set(sharedfiles.local_files(a))  # a's files, sealed with a new key
    finally:
        store.close()
    b = joined(a, tmp_path / "b", url)
    assert pems(b) == pems(a)


def test_a_host_whose_bridge_secret_is_elsewhere_never_deletes_the_shared_one(tmp_path: Path, url: str) -> None:
    a = host(tmp_path / "a", url)
    admin.init_data_dir(a)
    b = joined(a, tmp_path / "b", url)
    elsewhere = tmp_path / "b" / "bridge.secret"
    shutil.copy(b.bridge_secret_file, elsewhere)
    b = b.model_copy(update={"broker": b.broker.model_copy(update={"password_file": elsewhere})})
    sharedfiles.rotate(b, "token", int(time.time()))  # b has no data-dir secret to share
    assert rows(a)["bridge.secret"] is not None
    sync(a)
    assert keyfiles.read_secret(a.bridge_secret_file) == keyfiles.read_secret(elsewhere)
