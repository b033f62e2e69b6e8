"""Secrets at rest: the device key and the credentials vault are 0600, survive runs, and detect tampering."""

import os
import stat
from pathlib import Path

import pytest

from device_sim import vault as vault_mod
from device_sim.errors import VaultError
from device_sim.vault import Vault, load_or_create_private_key
from provwire import crypto
from tests.helpers.credentials import sample_credentials


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_and_file_modes(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    v = Vault(state)
    assert v.load() is None  # nothing stored yet
    v.store(sample_credentials("dev-1"))
    assert Vault(state).load() == sample_credentials("dev-1")
    assert _mode(state) == 0o700
    assert _mode(state / vault_mod.VAULT_KEY_FILE) == 0o600
    assert _mode(state / vault_mod.VAULT_FILE) == 0o600
    assert len((state / vault_mod.VAULT_KEY_FILE).read_bytes()) == 32


def test_vault_file_holds_no_plaintext_secret(tmp_path: Path) -> None:
    Vault(tmp_path).store(sample_credentials("dev-1"))
    blob = (tmp_path / vault_mod.VAULT_FILE).read_bytes()
    assert b"ak_secret" not in blob and b"tok_secret" not in blob and b"dev-1" not in blob


def test_store_overwrites_and_reuses_the_key(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    v.store(sample_credentials("dev-1", "first"))
    key = (tmp_path / vault_mod.VAULT_KEY_FILE).read_bytes()
    v.store(sample_credentials("dev-1", "second"))
    assert (tmp_path / vault_mod.VAULT_KEY_FILE).read_bytes() == key
    loaded = v.load()
    assert loaded is not None and loaded.api_key == "second"
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


@pytest.mark.parametrize("offset", [0, len(vault_mod.MAGIC), len(vault_mod.MAGIC) + 12, -1])
def test_tampered_vault_fails(tmp_path: Path, offset: int) -> None:
    Vault(tmp_path).store(sample_credentials("dev-1"))
    path = tmp_path / vault_mod.VAULT_FILE
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VaultError):
        Vault(tmp_path).load()


def test_truncated_vault_and_foreign_key_fail(tmp_path: Path) -> None:
    Vault(tmp_path).store(sample_credentials("dev-1"))
    path = tmp_path / vault_mod.VAULT_FILE
    good = path.read_bytes()
    path.write_bytes(good[:20])
    with pytest.raises(VaultError):
        Vault(tmp_path).load()
    path.write_bytes(good)
    (tmp_path / vault_mod.VAULT_KEY_FILE).write_bytes(os.urandom(32))
    with pytest.raises(VaultError, match="does not decrypt"):
        Vault(tmp_path).load()


def test_missing_key_is_an_error_not_an_empty_vault(tmp_path: Path) -> None:
    Vault(tmp_path).store(sample_credentials("dev-1"))
    (tmp_path / vault_mod.VAULT_KEY_FILE).unlink()
    with pytest.raises(VaultError, match="key"):
        Vault(tmp_path).load()


def test_group_readable_secret_is_refused(tmp_path: Path) -> None:
    Vault(tmp_path).store(sample_credentials("dev-1"))
    os.chmod(tmp_path / vault_mod.VAULT_KEY_FILE, 0o640)
    with pytest.raises(VaultError, match="group or others"):
        Vault(tmp_path).load()


def test_secret_files_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Vault(tmp_path).store(sample_credentials("dev-1"))
        load_or_create_private_key(tmp_path)
    finally:
        os.umask(old)
    for name in (vault_mod.VAULT_FILE, vault_mod.VAULT_KEY_FILE, vault_mod.PRIVATE_KEY_FILE):
        assert _mode(tmp_path / name) == 0o600, name


def test_private_key_is_created_once_and_reused(tmp_path: Path) -> None:
    first = load_or_create_private_key(tmp_path / "dev")
    path = tmp_path / "dev" / vault_mod.PRIVATE_KEY_FILE
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = load_or_create_private_key(tmp_path / "dev")
    assert crypto.sec1(again.public_key()) == crypto.sec1(first.public_key())


def test_garbage_private_key_file_is_refused(tmp_path: Path) -> None:
    vault_mod.write_secret_file(tmp_path / vault_mod.PRIVATE_KEY_FILE, b"not a key")
    with pytest.raises(VaultError, match="PEM"):
        load_or_create_private_key(tmp_path)
