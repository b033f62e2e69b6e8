"""Pure functions and admin actions of the bridge (no broker needed)."""

import base64
import json
import os
import re
import stat
import string
import time
from pathlib import Path

import pytest

from bridge.claims import identifiers
from bridge.claims.decision import Action, Denial, key_denial, reclaim_action
from bridge.claims.provisioning import parse_claim
from bridge.cli.main import main as cli_main
from bridge.config import Settings, load_settings
from bridge.errors import ConfigError, UsageError
from bridge.ops import admin
from provwire.errors import ErrorCode
from provwire.models import ClaimError
from tests.helpers.bridge import device_row, provision_key_row


def test_key_denial_reasons() -> None:
    now = time.time()
    assert key_denial(None, "hw", now) is Denial.UNKNOWN_KEY
    assert key_denial(provision_key_row(status="revoked"), "hw", now) is Denial.KEY_REVOKED
    assert key_denial(provision_key_row(expires_at=int(now) - 1), "hw", now) is Denial.KEY_EXPIRED
    assert key_denial(provision_key_row(hardware_id_pattern=r"line-\d+"), "line-7x", now) is Denial.HARDWARE_ID_MISMATCH
    assert key_denial(provision_key_row(hardware_id_pattern=r"line-\d+"), "line-7", now) is None
    assert key_denial(provision_key_row(expires_at=int(now) + 60), "hw", now) is None


def test_reclaim_action_protects_known_devices() -> None:
    reject, rotate = provision_key_row(), provision_key_row(reclaim_policy="rotate")
    assert reclaim_action(None, b"pk", reject) is Action.CREATE
    assert reclaim_action(device_row(public_key=b"pk"), b"pk", reject) is Action.RECLAIM
    assert reclaim_action(device_row(public_key=b"pk"), b"other", reject) is Action.EXISTS
    assert reclaim_action(device_row(public_key=b"pk"), b"other", rotate) is Action.ROTATE
    assert reclaim_action(device_row(public_key=b"pk", status="revoked"), b"pk", rotate) is Action.REVOKED
    # Another key of the tenant, even a rotate one, cannot replace the public key of a device it did not create.
    assert (
        reclaim_action(device_row(public_key=b"pk"), b"other", provision_key_row(id="key_2", reclaim_policy="rotate"))
        is Action.EXISTS
    )


def test_parse_claim_reports_fields_without_echoing_input() -> None:
    payload = json.dumps({"request_id": "req-12345", "provision_key": "pk_SECRET", "hardware_id": 5}).encode()
    error = parse_claim(payload)
    assert isinstance(error, ClaimError) and error.code is ErrorCode.VALIDATION_ERROR
    assert error.request_id == "req-12345"
    assert {e.field for e in error.errors or []} == {"hardware_id", "public_key"}
    assert "pk_SECRET" not in error.model_dump_json()


def test_secrets_have_their_documented_shapes() -> None:
    assert identifiers.new_provision_key().startswith("pk_") and len(identifiers.new_provision_key()) == 46
    assert identifiers.new_api_key().startswith("dk_")
    device_id = identifiers.new_device_id(1_800_000_000.0)
    assert re.fullmatch(r"dev_[a-z2-7]{26}", device_id)
    code = identifiers.new_human_code()
    assert identifiers.CODE_RE.fullmatch(code)
    assert identifiers.normalise_key(code.lower().replace("-", "-")) == code
    assert identifiers.normalise_key("pk_abc") == "pk_abc"  # pk_ keys are case-sensitive


def test_device_ids_sort_by_creation_and_differ_within_a_millisecond() -> None:
    """Ids made later sort after (the devices' indexes are appended to, docs/BENCHMARKS.md); 80 random bits
    apart from the time, so ids made in the same millisecond still differ, in any order."""
    times = [1_700_000_000.0, 1_700_000_000.001, 1_700_000_000.5, 1_700_000_031.999, 1_800_000_000.0, 4_000_000_000.0]
    ids = [identifiers.new_device_id(now) for now in times]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    same_millisecond = {identifiers.new_device_id(1_700_000_000.0) for _ in range(1000)}
    assert len(same_millisecond) == 1000
    assert len({device_id[:13] for device_id in same_millisecond}) == 1  # 48 bits of time: 9 characters and 3 bits
    to_rfc4648 = str.maketrans(identifiers.SORTABLE_BASE32, string.ascii_uppercase + "234567")
    standard = ids[0].removeprefix("dev_").translate(to_rfc4648)
    value = int.from_bytes(base64.b32decode(standard + "======"), "big")
    assert value >> 80 == 1_700_000_000_000


def test_durations() -> None:
    assert admin.parse_duration("90s") == 90
    assert admin.parse_duration("30d") == 30 * 86400
    for bad in ("", "10", "0d", "1w", "-1h"):
        with pytest.raises(UsageError):
            admin.parse_duration(bad)


def test_settings_layering_and_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "p.toml"
    config.write_text('topic_prefix = "acme/prov/v1"\n[broker]\nport = 2883\n')
    assert load_settings(config).broker.port == 2883
    monkeypatch.setenv("PROVBRIDGE_BROKER__PORT", "3883")
    settings = load_settings(config)
    assert settings.broker.port == 3883 and settings.topic_prefix == "acme/prov/v1"
    monkeypatch.setenv("PROVBRIDGE_TOKEN__TTL_SECONDS", "999999")
    with pytest.raises(ConfigError, match="capped"):
        load_settings(config)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_shipped_config_file_matches_built_in_defaults() -> None:
    assert load_settings(Path("config/provbridge.toml")).model_dump() == Settings().model_dump()


def test_init_writes_private_files_owner_only(settings: Settings) -> None:
    private = [settings.data_dir / "bridge.secret", settings.database_file, *settings.data_dir.glob("keys/*.pem")]
    assert len(private) == 5  # the secret, the database, the cloud key, the token key and the next token key
    for path in private:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert admin.init_data_dir(settings).created is False  # idempotent


def test_key_creation_refuses_what_cannot_work(settings: Settings) -> None:
    store = admin.open_store(settings)
    now = int(time.time())
    for spec, message in [
        (admin.KeySpec(tenant="default", name="x", profile="nope"), "unknown profile"),
        (admin.KeySpec(tenant="default", name="x", hardware_id_pattern="("), "RE2 syntax"),
        (admin.KeySpec(tenant="default", name="x", max_registrations=0), "at least 1"),
        (admin.KeySpec(tenant="default", name="x", expires_at=now - 1), "future"),
        (admin.KeySpec(tenant="nobody", name="x"), "no tenant"),
    ]:
        with pytest.raises(Exception, match=message):
            admin.create_key(store, settings, spec, now)
    key, raw = admin.create_key(store, settings, admin.KeySpec(tenant="default", name="c", human_code=True), now)
    assert key.max_registrations == 1 and key.expires_at == now + settings.claims.code_ttl_seconds
    assert key.key_hash == identifiers.digest(raw)


def test_cli_errors_are_one_line_and_non_zero(
    settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = ["--data-dir", str(settings.data_dir)]
    assert cli_main([*data, "device", "show", "dev_missing"]) == 1
    assert capsys.readouterr().err == "provbridge: error: no device 'dev_missing'\n"
    assert cli_main(["--data-dir", str(tmp_path / "empty"), "key", "list"]) == 1
    assert "provbridge init" in capsys.readouterr().err
    assert cli_main([*data, "key", "create", "--name", "x", "--expires-in", "soon"]) == 2  # a usage error
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_key_create_prints_the_raw_key_once_and_lists_without_it(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(settings.data_dir)]
    assert cli_main([*data, "key", "create", "--name", "line-1", "--one-time", "--label", "site=ber", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["provision_key"].startswith("pk_") and created["labels"] == {"site": "ber"}
    assert cli_main([*data, "key", "list", "--json"]) == 0
    listing = capsys.readouterr().out
    assert created["id"] in listing and created["provision_key"] not in listing
    assert cli_main([*data, "key", "revoke", created["id"]]) == 0
    assert "revoked" in capsys.readouterr().out
