"""The whole-suite secret scan (tests/secret_scan.py) finds each kind of secret where it must not be, and
passes what is not secret: hashes, key ids, public keys, request ids, hardware ids, key files themselves.

These tests plant secrets on purpose, so they work in a directory of their own outside the basetemp
(removed afterwards), where the whole-suite scan does not look.
"""

import base64
import hashlib
import json
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.ops import admin
from bridge.storage import keyfiles
from bridge.storage.store import Store
from bridge.tokens import mint_token
from provwire import crypto
from provwire.models import ClaimOk, Event
from tests import secret_scan
from tests.helpers.bridge import Bridge, make_settings, serving_bridge
from tests.helpers.devices import Device


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="secret-scan-test-") as name:
        yield Path(name)


@pytest.fixture
def planted(scratch: Path) -> tuple[Settings, str]:
    """An initialised data dir in the scratch dir, and its first provisioning key."""
    settings = make_settings(scratch / "data")
    result = admin.init_data_dir(settings)
    assert result.provision_key
    return settings, result.provision_key


@pytest.fixture
def live(planted: tuple[Settings, str]) -> Iterator[Bridge]:
    """The bridge serving the scratch dir's data dir."""
    with serving_bridge(*planted) as running:
        yield running


def kinds(report: secret_scan.Report) -> dict[str, set[str]]:
    """Kind -> the prefixes found of it."""
    found: dict[str, set[str]] = {}
    for f in report.findings:
        found.setdefault(f.kind, set()).add(f.prefix)
    return found


def private_scalar(settings: Settings) -> tuple[str, bytes]:
    """The PEM text and raw scalar of the data dir's token-signing key."""
    ring = keyfiles.load_keys(settings.data_dir)
    pem_file = keyfiles.keys_dir(settings.data_dir) / f"token-{ring.active_token}.pem"
    key = ring.token_key
    return pem_file.read_text(), key.private_numbers().private_value.to_bytes(32, "big")


def test_an_initialised_data_dir_is_clean_though_its_key_files_hold_secrets(
    planted: tuple[Settings, str], scratch: Path
) -> None:
    report = secret_scan.scan(scratch)
    assert report.findings == []
    assert report.key_files >= 3  # cloud and token keys, bridge.secret: excluded, and learnt from
    assert report.databases == 1 and report.cells > 0


def test_a_raw_provisioning_key_in_an_event_row_is_found_with_its_table_column_and_row(
    planted: tuple[Settings, str], scratch: Path
) -> None:
    settings, key = planted
    store = Store(settings.database)
    try:
        store.add_events([Event(event="claim.rejected", time="2026-01-01T00:00:00.000Z", tenant="default", reason=key)])
    finally:
        store.close()
    report = secret_scan.scan(scratch)
    (finding,) = report.findings  # the cell, not again for the page that holds it
    assert finding.kind == "provisioning key" and finding.prefix == key[:6]
    assert finding.path == "data/provbridge.db" and finding.where.startswith("table events, column body, rowid ")


def test_a_deleted_row_still_in_the_files_pages_is_found(planted: tuple[Settings, str], scratch: Path) -> None:
    settings, key = planted
    db = sqlite3.connect(settings.database_file)
    db.execute("PRAGMA secure_delete = OFF")  # SQLite's default, whatever this build's is
    db.execute("INSERT INTO events (time, tenant, event, body) VALUES ('t', 'default', 'x', ?)", (key,))
    db.commit()
    db.execute("DELETE FROM events WHERE event = 'x'")
    db.commit()
    db.close()
    report = secret_scan.scan(scratch)
    assert kinds(report) == {"provisioning key": {key[:6]}}
    assert all(f.where.startswith("byte ") for f in report.findings)  # raw bytes: no cell holds it


def test_every_secret_format_in_a_log_is_found_with_its_line(planted: tuple[Settings, str], scratch: Path) -> None:
    settings, _ = planted
    keys = keyfiles.load_keys(settings.data_dir)
    token = mint_token(
        key=keys.token_key,
        kid=keys.active_token,
        issuer="provbridge",
        audience="provbridge-mqtt",
        device_id="dev_x",
        tenant="default",
        publish=[],
        subscribe=[],
        now=int(time.time()),
        ttl_seconds=60,
    ).token
    lines = [
        "INFO provbridge.service: claim on prov/v1/claim/hw-1: ok",
        f"DEBUG x: token {token}",
        "WARNING x: refused pk_guessed-key-that-does-not-exist",  # a presented key, guessed or not
        "INFO x: code prov-7k3m-q9zt",  # human codes, in any case
        "INFO x: api key dk_" + "A" * 43,
        "INFO x: ops password op_" + "b" * 43,
    ]
    (scratch / "serve.log").write_text("\n".join(lines) + "\n")
    report = secret_scan.scan(scratch)
    where = {f.kind: f.where for f in report.findings}
    assert where == {
        "token (JWT)": "line 2",
        "provisioning key": "line 3",
        "human code": "line 4",
        "API key": "line 5",
        "ops password": "line 6",
    }


def test_a_private_key_is_found_as_pem_as_bare_base64_and_as_its_scalar(
    planted: tuple[Settings, str], scratch: Path
) -> None:
    settings, _ = planted
    pem, scalar = private_scalar(settings)
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    (scratch / "a.log").write_text(f"loaded\n{pem}\n")
    (scratch / "b.log").write_text(f'{{"key": "{body}"}}\n')
    url = base64.urlsafe_b64encode(scalar).decode()
    (scratch / "c.json").write_text(json.dumps({"d": scalar.hex(), "e": url}))
    report = secret_scan.scan(scratch)
    found = {(f.path, f.kind) for f in report.findings}
    assert ("a.log", "private key (PEM)") in found
    assert ("b.log", "private key (DER)") in found
    in_json = {(f.where, f.kind, f.prefix) for f in report.findings if f.path == "c.json"}
    assert in_json == {("line 1", "private key (scalar)", form[:6]) for form in (scalar.hex(), url)}


def test_the_bridge_secret_and_a_devices_key_are_found_by_their_exact_value(live: Bridge, scratch: Path) -> None:
    with Device(live) as device:
        answer = device.claim(live.provision_key)
    assert isinstance(answer, ClaimOk)
    shared = crypto.shared_secret(device.private_key, live.keys.cloud_key.public_key())
    device_key = crypto.derive_device_key(shared)
    password = (live.settings.data_dir / "bridge.secret").read_text().strip()
    (scratch / "x.log").write_text(f"connect with {password}\nhmac key {device_key.hex()}\n")
    report = secret_scan.scan(scratch)
    assert {(f.where, f.kind) for f in report.findings} == {("line 1", "bridge.secret"), ("line 2", "device key")}


def test_hashes_key_ids_public_keys_and_ids_are_not_secrets(live: Bridge, scratch: Path) -> None:
    """A real claim's database (hashes, public keys, sealed answers), and a log of everything public."""
    with Device(live, hardware_id="hw-0123456789ab") as device:
        answer = device.claim(live.provision_key, request_id="r-0123456789abcdef")
    assert isinstance(answer, ClaimOk)
    creds = device.open(answer)
    digest = hashlib.sha256(live.provision_key.encode()).digest()
    public = (live.settings.data_dir / "cloud_public.pem").read_text()
    lines = [
        f"key hash {digest.hex()} {base64.b64encode(digest).decode()} {base64.urlsafe_b64encode(digest).decode()}",
        f"api key hash {hashlib.sha256(creds.api_key.encode()).hexdigest()}",
        f"cloud key {live.keys.active_cloud} token key {live.keys.active_token}",
        f"device public key {device.public_key_b64}",
        public,
        f"request {answer.request_id} device {answer.device_id} hardware id {device.hardware_id}",
        f"sealed {answer.sealed.ciphertext}",
        "topic prov/v1/claim/hw-0123456789ab, prefix prov/v1, keys pk_..., api keys dk_...",
        # A JWK coordinate that holds "pk_" by chance (seen in a real test run's jwks.json).
        '"x": "MUvtZ-vjTU9uKz_pk_u44q96J2e6h0uEybRcJV8qelw", "y": "nuW-Cgc4-dk_MErOtrwqY3lX4pLqG4M40yrhb4RazUC"',
    ]
    (scratch / "public.log").write_text("\n".join(lines) + "\n")
    live.store.connection().execute("PRAGMA wal_checkpoint(PASSIVE)")
    report = secret_scan.scan(scratch)
    assert report.findings == []
    assert report.databases == 1 and report.cells > 20  # it did read the device, its answer, its events


def test_claims_queued_in_mosquittos_persistence_are_a_note_other_secrets_there_fail(scratch: Path) -> None:
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJkZXZfeCJ9.c2lnbmF0dXJlc2lnbmF0dXJl"
    claim = b'{"provision_key": "pk_' + b"k" * 43 + b'"}'
    (scratch / "mosquitto.db").write_bytes(secret_scan.MOSQUITTO_MAGIC + b"\x00\x01" + claim)
    (scratch / "other.db").write_bytes(secret_scan.MOSQUITTO_MAGIC + b"\x00" + token.encode())
    report = secret_scan.scan(scratch)
    assert [(f.path, f.kind) for f in report.allowed] == [("mosquitto.db", "provisioning key")]
    assert [(f.path, f.kind) for f in report.findings] == [("other.db", "token (JWT)")]


def test_the_command_prints_six_characters_of_a_secret_and_fails(
    planted: tuple[Settings, str], scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, key = planted
    (scratch / "serve.log").write_text(f"oops {key}\n")
    assert secret_scan.main([str(scratch)]) == 1
    out = capsys.readouterr().out
    assert f"serve.log: line 1: provisioning key {key[:6]}..." in out
    assert key[:7] not in out


def test_the_command_passes_a_clean_tree_and_refuses_an_empty_one(
    planted: tuple[Settings, str], scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (scratch / "serve.log").write_text("INFO provbridge: bridge serving claims on prov/v1/claim/+\n")
    assert secret_scan.main([str(scratch)]) == 0
    assert "secret scan: clean:" in capsys.readouterr().out
    empty = scratch / "empty"
    empty.mkdir()
    assert secret_scan.main([str(empty)]) == 2  # a wrong directory must not pass
    assert secret_scan.main([str(scratch / "missing")]) == 2
