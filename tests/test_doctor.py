"""`provbridge doctor`: each check, broken for real, names what is wrong and what to do.

Every test runs the real command (`cli.main`) on a real data dir; the ones about the broker run the
real embedded broker. Breakages are real too: modes changed, files overwritten, the database damaged,
the clock behind the records, nothing listening.
"""

import json
import os
import time
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.claims.provisioning import Provisioner
from bridge.cli import main as cli
from bridge.config import Settings
from bridge.ops import admin, doctor
from bridge.storage import keyfiles, rotation
from bridge.storage.store import Store
from bridge.tls import certificates as tls
from bridge.tls.device_ca import DeviceCaFiles
from provwire import crypto, topics
from provwire.models import Claim, ClaimOk, to_json
from tests.helpers.bridge import Bridge
from tests.helpers.tls import initialise, running, tls_settings

CHECKS = list(doctor.CHECKS)


def config_file(settings: Settings, extra: str = "") -> Path:
    """The settings as a config file for the CLI (ports and data dir are per test)."""
    path = settings.data_dir.parent / f"doctor-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(
        f'data_dir = "{settings.data_dir}"\n{extra}\n'
        f"[broker]\nport = {settings.broker.port}\ntls_port = {settings.broker.tls_port}\n"
    )
    return path


def run_doctor(
    settings: Settings, capsys: pytest.CaptureFixture[str], *options: str, extra: str = ""
) -> tuple[int, dict[str, str], str]:
    """Exit code, {check name: its line}, stderr."""
    code = cli.main(["--config", str(config_file(settings, extra)), "doctor", *options])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == CHECKS, out
    return code, {line.split(": ", 1)[0]: line for line in lines}, err


def assert_only_failures(lines: dict[str, str], failed: set[str], skipped: Collection[str] = ()) -> None:
    for name, line in lines.items():
        if name in failed:
            assert line.startswith(f"{name}: FAIL: "), line
        elif name in skipped:
            assert line.startswith(f"{name}: skipped ("), line
        else:
            assert line.startswith(f"{name}: ok (") or line.startswith(f"{name}: skipped ("), line


def provision(settings: Settings, key: str) -> str:
    """One device claimed through the real claim path; returns its id."""
    store = Store(settings.database)
    try:
        private = crypto.generate_private_key()
        claim = Claim(
            request_id=f"r-{uuid.uuid4().hex}",
            provision_key=key,
            hardware_id=f"hw-{uuid.uuid4().hex[:8]}",
            public_key=crypto.b64encode(crypto.sec1(private.public_key())),
        )
        keys = keyfiles.load_keys(settings.data_dir)
        outcome = Provisioner(settings, store, keys).handle(topics.claim_topic("prov/v1", "c-doc"), to_json(claim))
        return ClaimOk.model_validate_json(outcome.answer or b"").device_id
    finally:
        store.close()


# --- healthy ---------------------------------------------------------------------------------------


def test_a_healthy_installation_passes_every_check(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    provision(bridge.settings, bridge.provision_key)
    code, lines, err = run_doctor(bridge.settings, capsys)
    assert code == 0 and err == ""
    assert_only_failures(lines, set())
    assert lines["broker"] == f"broker: ok (127.0.0.1:{bridge.port} accepts connections)"
    assert lines["broker tls"].startswith("broker tls: skipped (no TLS listener")
    assert "integrity ok, 1 devices" in lines["database"]

    assert cli.main(["--config", str(config_file(bridge.settings)), "doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert [(c["name"], c["status"]) for c in report["checks"]][:2] == [("config", "ok"), ("data dir", "ok")]


# --- the files ---------------------------------------------------------------------------------------


def test_a_key_file_others_can_read_fails_with_the_chmod_to_run(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud = next(keyfiles.keys_dir(settings.data_dir).glob("cloud-*.pem"))
    cloud.chmod(0o644)
    (settings.data_dir / "bridge.secret").chmod(0o640)
    code, lines, err = run_doctor(settings, capsys)
    assert code == 1 and err == f"provbridge: error: 2 of {len(CHECKS)} checks failed\n"
    assert_only_failures(lines, {"key files", "broker"})  # nothing listens: no bridge in this test
    assert f"{cloud} has mode 0644 (group or others may read it): run `chmod 600 {cloud}`" in lines["key files"]
    assert "bridge.secret has mode 0640" in lines["key files"]


def test_a_damaged_key_file_fails_to_parse_and_the_ring_does_not_load(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    token = next(keyfiles.keys_dir(settings.data_dir).glob("token-*.pem"))
    token.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    code, lines, _ = run_doctor(settings, capsys)
    assert code == 1
    assert_only_failures(lines, {"key files", "active keys", "broker"}, {"references"})
    assert f"{token} does not parse as a PEM private key" in lines["key files"]
    assert "restore it from a backup" in lines["key files"]
    assert lines["active keys"].startswith("active keys: FAIL: the key ring does not load")


def test_a_missing_active_key_and_a_stale_jwks_are_named(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks = settings.data_dir / "jwks.json"
    jwks.write_text(json.dumps({"keys": []}))
    _, lines, _ = run_doctor(settings, capsys)
    assert "jwks.json lacks the active token key" in lines["active keys"]
    assert "`provbridge keys rotate --token` rewrites it" in lines["active keys"]

    active = keyfiles.keys_dir(settings.data_dir) / "active.json"
    active.write_text(json.dumps({"cloud": "0" * 16, "token": "1" * 16}))
    code, lines, _ = run_doctor(settings, capsys)
    assert code == 1
    assert "active.json names a key that is missing" in lines["active keys"]


def test_a_devices_cloud_key_gone_from_disk_is_found(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    first = admin.create_key(Store(settings.database), settings, admin.KeySpec("default", "k"), int(time.time()))
    provision(settings, first[1])
    old = keyfiles.load_keys(settings.data_dir).active_cloud
    rotation.rotate(settings.data_dir, "cloud", int(time.time()))
    (keyfiles.keys_dir(settings.data_dir) / f"cloud-{old}.pem").unlink()
    code, lines, _ = run_doctor(settings, capsys)
    assert code == 1
    assert_only_failures(lines, {"references", "broker"})
    assert f"1 device(s) were provisioned with cloud key {old}" in lines["references"]
    assert f"restore cloud-{old}.pem" in lines["references"]


def test_a_certificate_key_without_its_device_ca_is_found(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = admin.KeySpec("default", "certs", credential_type="certificate")
    admin.create_key(Store(settings.database), settings, spec, int(time.time()))
    device_ca_key = DeviceCaFiles.of(settings.data_dir).key
    device_ca_key.chmod(0o640)
    code, lines, _ = run_doctor(settings, capsys)
    assert code == 1
    assert_only_failures(lines, {"key files", "broker"})
    assert f"{device_ca_key} has mode 0640" in lines["key files"]
    device_ca_key.unlink()
    code, lines, _ = run_doctor(settings, capsys)
    assert_only_failures(lines, {"references", "broker"})
    assert "1 key(s) and 0 device(s) use certificates, but the device CA does not load" in lines["references"]


# --- the database ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("header", "cannot be read (file is not a database)"),
        ("page", "integrity_check found 2 problem(s), first: On tree page 2 cell 0"),
        ("empty", "lacks the tables tenants, provision_keys, devices"),
    ],
)
def test_a_damaged_database_fails_its_check(
    settings: Settings, capsys: pytest.CaptureFixture[str], damage: str, expected: str
) -> None:
    database = settings.database_file
    data = bytearray(database.read_bytes())
    if damage == "header":
        data[:16] = b"not sqlite at all"[:16]
    elif damage == "page":
        page = int.from_bytes(data[16:18], "big")
        data[page + 8 : 2 * page] = b"\xa5" * (page - 8)  # the second page's cells, garbled
    else:
        data = bytearray()
    database.write_bytes(bytes(data))
    code, lines, _ = run_doctor(settings, capsys)
    assert code == 1
    assert expected in lines["database"], lines["database"]
    assert "restore" in lines["database"]
    assert lines["references"].startswith("references: skipped (")
    assert lines["clock"].startswith("clock: ok (")  # the key files still date the installation


# --- configuration ------------------------------------------------------------------------------------


def test_a_configuration_that_does_not_load_fails_first_and_skips_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[broker\nport = 1\n")
    code = cli.main(["--config", str(config), "doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False
    assert report["checks"][0]["status"] == "fail" and str(config) in report["checks"][0]["detail"]
    assert {c["status"] for c in report["checks"][1:]} == {"skipped"}


def test_an_unusable_profile_and_a_profile_no_longer_configured(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = '[profiles.default]\npublish = ["devices/#/x"]\n'
    _, lines, _ = run_doctor(settings, capsys, extra=broken)
    assert "'devices/#/x' is not a valid MQTT topic filter" in lines["config"]

    sensors = settings.model_copy(update={"profiles": {**settings.profiles, "sensors": settings.profiles["default"]}})
    admin.create_key(Store(settings.database), sensors, admin.KeySpec("default", "s", profile="sensors"), 1)
    _, lines, _ = run_doctor(settings, capsys)
    assert "profile 'sensors' is used by keys or devices but not configured" in lines["references"]
    assert "add [profiles.sensors]" in lines["references"]


def test_an_uninitialised_data_dir(tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    empty = settings.model_copy(update={"data_dir": tmp_path / "nothing-here"})
    code, lines, _ = run_doctor(empty, capsys)
    assert code == 1
    assert "run `provbridge init`" in lines["data dir"]
    assert_only_failures(lines, {"data dir", "broker"}, {"key files", "active keys", "database", "clock"})
    assert not (tmp_path / "nothing-here").exists()  # the doctor created nothing


# --- the broker ---------------------------------------------------------------------------------------


def test_no_broker_listening_says_how_to_start_one(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run_doctor(settings, capsys)
    assert code == 1
    assert lines["broker"].startswith(f"broker: FAIL: nothing accepts connections on 127.0.0.1:{settings.broker.port}")
    assert "start `provbridge serve`" in lines["broker"]


def test_the_tls_listener_is_checked_with_the_ca_devices_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tls_settings(tmp_path / "data")
    initialise(settings)
    with running(settings):
        code, lines, _ = run_doctor(settings, capsys)
        assert code == 0, lines
        port = settings.broker.tls_port
        assert lines["broker tls"].startswith(f"broker tls: ok (127.0.0.1:{port} accepts connections, TLSv1.")

        # Devices pinning another CA would refuse this broker: so does the doctor.
        other_ca = tls.new_ca(datetime.now(UTC))
        tls.TlsFiles.of(settings.data_dir).ca_cert.write_bytes(tls.certificate_pem(other_ca.certificate))
        code, lines, _ = run_doctor(settings, capsys)
        assert code == 1
        assert f"TLS handshake with 127.0.0.1:{port} failed" in lines["broker tls"]
        assert "certificate verify failed" in lines["broker tls"]
    code, lines, _ = run_doctor(settings, capsys)
    assert "nothing accepts connections" in lines["broker tls"]  # stopped


# --- the clock ----------------------------------------------------------------------------------------


def test_a_clock_behind_the_newest_record_fails(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(settings.database)
    with store.transaction() as tx:
        # written by a clock a day ahead
        tx.connection.execute("UPDATE provision_keys SET created_at = created_at + 86400")
    store.close()
    code, lines, _ = run_doctor(settings, capsys)
    assert code == 1
    assert "before provision_keys.created_at" in lines["clock"]
    assert "set it right (NTP)" in lines["clock"]


def test_a_clock_behind_the_key_files_fails(settings: Settings) -> None:
    active = keyfiles.keys_dir(settings.data_dir) / "active.json"
    an_hour_ago = time.time() - 3600
    report = doctor.run_checks(config_file(settings), None, now=an_hour_ago)
    clock = next(c for c in report.checks if c.name == "clock")
    assert clock.status == "fail" and "s before" in clock.detail
    ahead = time.time() + 7200
    os.utime(active, (ahead, ahead))
    clock = next(c for c in doctor.run_checks(config_file(settings), None).checks if c.name == "clock")
    assert clock.status == "fail" and str(active) in clock.detail
