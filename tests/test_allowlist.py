"""Issue 12: pre-provisioning. The allowlist of hardware ids, one at a time or imported from CSV, keys that admit
only it, and the admin-made device id and API key; through the CLI, claims over a real broker, real SQLite."""

import io
import json
import threading
import time
from pathlib import Path

import pytest

from bridge.ops import allowlist
from bridge.storage.records import AllowlistEntry
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.cli import cli_json, cli_run
from tests.helpers.devices import Device


def claim(bridge: Bridge, hardware_id: str, key: str) -> ClaimOk | ClaimError:
    with Device(bridge, hardware_id=hardware_id) as device:
        return device.claim(key)


def verify(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bridge: Bridge, api_key: str) -> str:
    """The device `device verify-api-key` names for `api_key` (read on stdin, as operators give it)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(api_key + "\n"))
    code, out, err = cli_run(capsys, bridge.settings, "device", "verify-api-key", "--json")
    assert code == 0, err
    return str(json.loads(out)["device_id"])


def entries(bridge: Bridge) -> list[str]:
    return [e.hardware_id for e in bridge.store.allowlist_page(bridge.store.tenant_id("default"), None, 1000)]


# --- one at a time ---------------------------------------------------------------------------------


def test_a_preprovisioned_only_key_creates_only_allowlisted_devices_with_their_name_and_labels(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    key = bridge.create_key(preprovisioned_only=True, labels={"site": "ber"})
    code, _, err = cli_run(capsys, bridge.settings, "allowlist", "add", "SN-1", "--name", "pump 1", "--label", "line=7")
    assert code == 0, err

    refused = claim(bridge, "SN-2", key)
    assert isinstance(refused, ClaimError) and refused.code is ErrorCode.PERMISSION_DENIED
    assert bridge.store.events(event="claim.rejected")[-1]["reason"] == "not_preprovisioned"
    assert bridge.store.count("devices") == 0

    with Device(bridge, hardware_id="SN-1") as sn1:
        answer = sn1.claim(key)
    assert isinstance(answer, ClaimOk) and answer.created and answer.labels == {"site": "ber", "line": "7"}
    device = bridge.store.device(answer.device_id)
    assert device.name == "pump 1" and device.hardware_id == "SN-1"
    assert entries(bridge) == []  # used up: the device row is the record now
    # Other keys still create any device, and a re-claim of an allowlisted device needs no entry.
    assert isinstance(claim(bridge, "SN-3", bridge.provision_key), ClaimOk)
    with sn1:
        assert isinstance(sn1.claim(key), ClaimOk)


def test_an_admin_made_device_id_and_api_key_are_what_the_device_gets(
    bridge: Bridge, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = cli_json(capsys, bridge.settings, "allowlist", "add", "SN-9", "--with-credentials")
    assert made["device_id"].startswith("dev_") and made["api_key"].startswith("dk_")
    assert made["api_key"] not in json.dumps(bridge.store.events(limit=100))  # shown once, nowhere else

    with Device(bridge, hardware_id="SN-9") as device:
        answer = device.claim(bridge.provision_key)
        assert isinstance(answer, ClaimOk) and answer.created and answer.device_id == made["device_id"]
        assert device.open(answer).api_key == ""  # the device has it already: it was flashed with it
    assert verify(capsys, monkeypatch, bridge, made["api_key"]) == made["device_id"]


def test_add_and_remove_refuse_what_cannot_be_and_change_nothing(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = claim(bridge, "SN-1", bridge.provision_key)
    assert isinstance(existing, ClaimOk)
    assert cli_run(capsys, bridge.settings, "allowlist", "add", "SN-2")[0] == 0
    for argv, exit_code, reason in [
        (("add", "SN-1"), 1, "is a device already"),
        (("add", "SN-2"), 1, "is on the allowlist already"),
        (("add", "a/b"), 2, "without '+', '#' or '/'"),
        (("add", "SN-3", "--label", "novalue"), 2, "must look like name=value"),
        (("add", "SN-3", "--tenant", "nope"), 1, "no tenant"),
        (("remove", "SN-3"), 1, "not on the allowlist"),
    ]:
        code, _, err = cli_run(capsys, bridge.settings, "allowlist", *argv)
        assert code == exit_code and reason in err and "Traceback" not in err, (argv, err)
    assert entries(bridge) == ["SN-2"]
    assert cli_run(capsys, bridge.settings, "allowlist", "remove", "SN-2")[0] == 0
    assert entries(bridge) == []
    names = [e["event"] for e in bridge.store.events(limit=100) if e["event"].startswith("allowlist.")]
    assert names == ["allowlist.added", "allowlist.removed"]


def test_the_key_option_can_be_turned_on_and_off(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    key_id = cli_json(capsys, bridge.settings, "key", "create", "--name", "line-1")["id"]
    raw = cli_json(capsys, bridge.settings, "key", "list")["keys"]
    assert not next(k for k in raw if k["id"] == key_id)["preprovisioned_only"]
    changed = cli_json(capsys, bridge.settings, "key", "update", key_id, "--preprovisioned-only")
    assert changed["changed"] == ["preprovisioned_only"] and changed["preprovisioned_only"] is True
    changed = cli_json(capsys, bridge.settings, "key", "update", key_id, "--any-hardware-id")
    assert changed["changed"] == ["preprovisioned_only"] and changed["preprovisioned_only"] is False


def test_allowlist_pages(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    for n in range(5):
        assert cli_run(capsys, bridge.settings, "allowlist", "add", f"SN-{n}")[0] == 0
    seen: list[str] = []
    after: list[str] = []
    while True:
        page = cli_json(capsys, bridge.settings, "allowlist", "list", "--limit", "2", *after)
        seen += [e["hardware_id"] for e in page["entries"]]
        if page["next_cursor"] is None:
            break
        after = ["--after", page["next_cursor"]]
    assert sorted(seen) == [f"SN-{n}" for n in range(5)] and len(seen) == 5


# --- CSV import ------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "allowlist.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_a_csv_import_checks_with_a_dry_run_then_puts_every_entry_on(
    bridge: Bridge, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    csv_file = write(tmp_path, '\ufeffhardware_id,name,labels\nSN-1,pump 1,line=7;site=ber\nSN-2,,\n\nSN-3,"a, b",\n')
    dry = cli_json(capsys, bridge.settings, "allowlist", "import", csv_file, "--dry-run")
    assert dry == {"dry_run": True, "entries": 3} and entries(bridge) == []
    done = cli_json(capsys, bridge.settings, "allowlist", "import", csv_file)
    assert done == {"dry_run": False, "entries": 3}
    assert sorted(entries(bridge)) == ["SN-1", "SN-2", "SN-3"]
    page = bridge.store.allowlist_page(bridge.store.tenant_id("default"), None, 10)
    one = next(e for e in page if e.hardware_id == "SN-1")
    assert (one.name, one.labels) == ("pump 1", {"line": "7", "site": "ber"})
    assert next(e for e in page if e.hardware_id == "SN-3").name == "a, b"
    assert bridge.store.events(event="allowlist.imported")[-1]["count"] == 3


def test_a_csv_import_with_credentials_prints_each_api_key_once(
    bridge: Bridge, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_file = write(tmp_path, "hardware_id\nSN-1\nSN-2\n")
    code, out, _ = cli_run(capsys, bridge.settings, "allowlist", "import", csv_file, "--with-credentials")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0] == "hardware_id,device_id,api_key" and len(lines) == 3
    hardware_id, device_id, api_key = lines[1].split(",")
    with Device(bridge, hardware_id=hardware_id) as device:
        answer = device.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk) and answer.device_id == device_id
    assert verify(capsys, monkeypatch, bridge, api_key) == device_id


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("hardware_id\nSN-1\nSN-1\n", "line 3: hardware_id 'SN-1' is on line 2 already"),
        ("hardware_id\nSN-1\na/b\n", "line 3: hardware_id must be"),
        ("hardware_id,name\nSN-1\n", "line 2: 1 fields, the header has 2"),
        ("hardware_id,labels\nSN-1,site\n", "line 2: label 'site' must look like name=value"),
        ("hardware_id,labels\nSN-1,a=1;a=2\n", "label 'a' given twice"),
        ("serial\nSN-1\n", "line 1: the header must name hardware_id"),
        ("hardware_id,hardware_id\nSN-1,SN-1\n", "line 1: the header must name hardware_id"),
        ("", "empty file"),
        ("hardware_id\n", "no entries"),
        (b"hardware_id\nSN-\xff\n", "line 2: not UTF-8"),
        ("hardware_id\nSN-EXISTS\n", "line 2: hardware_id 'SN-EXISTS' is a device already"),
        ("hardware_id\nSN-LISTED\n", "line 2: hardware_id 'SN-LISTED' is on the allowlist already"),
        ("hardware_id,name\nSN-1,\x07bell\n", "name must be 1-128 printable characters"),
        ('hardware_id,name\nSN-1,"unterminated\n', "not CSV"),
    ],
)
def test_a_csv_with_any_problem_imports_nothing_and_names_the_line(
    bridge: Bridge, capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str | bytes, problem: str
) -> None:
    assert isinstance(claim(bridge, "SN-EXISTS", bridge.provision_key), ClaimOk)
    assert cli_run(capsys, bridge.settings, "allowlist", "add", "SN-LISTED")[0] == 0
    before = sorted(entries(bridge)), bridge.store.count("events")
    for extra in ([], ["--dry-run"]):
        code, _, err = cli_run(capsys, bridge.settings, "allowlist", "import", write(tmp_path, content), *extra)
        assert code == 2 and problem in err and "nothing was imported" in err and "Traceback" not in err, err
    assert (sorted(entries(bridge)), bridge.store.count("events")) == before


def test_an_unfinished_import_is_invisible_to_claims_and_removed_when_it_fails(bridge: Bridge) -> None:
    store, tenant_id, now = bridge.store, bridge.store.tenant_id("default"), int(time.time())
    key = bridge.create_key(preprovisioned_only=True)
    store.begin_import("imp_test", tenant_id, 2, now)
    store.stage_entries("imp_test", [AllowlistEntry(tenant_id, "SN-1", None), AllowlistEntry(tenant_id, "SN-2", None)])
    assert entries(bridge) == []
    refused = claim(bridge, "SN-1", key)
    assert isinstance(refused, ClaimError) and refused.code is ErrorCode.PERMISSION_DENIED
    store.abort_import("imp_test", batch=1)
    assert store.allowlist_conflicts(tenant_id, ["SN-1", "SN-2"]) == {}  # its rows are gone, not just hidden


def test_claims_are_answered_while_a_large_import_runs(bridge: Bridge, tmp_path: Path) -> None:
    """The import writes in short transactions: claims interleave (their speed is in docs/BENCHMARKS.md)."""
    rows = 20_000
    data = ("hardware_id\n" + "".join(f"BULK-{n:06d}\n" for n in range(rows))).encode()
    result: list[allowlist.Imported] = []
    importer = threading.Thread(target=lambda: result.append(allowlist.import_csv(bridge.store, "default", data)))
    importer.start()
    answered, while_staging = 0, 0
    while importer.is_alive() or answered < 3:
        assert isinstance(claim(bridge, f"LIVE-{answered}", bridge.provision_key), ClaimOk)
        answered += 1
        staging = (
            bridge.store.connection()
            .execute("SELECT COUNT(*) FROM allowlist_imports WHERE status = 'staging'")
            .fetchone()[0]
        )
        while_staging += bool(staging)
    importer.join()
    assert result and result[0].entries == rows
    assert while_staging >= 1, "no claim was answered while the import's rows were being written"
    assert len(bridge.store.allowlist_page(bridge.store.tenant_id("default"), None, 1000)) == 1000
    assert bridge.store.allowlist_conflicts(bridge.store.tenant_id("default"), [f"BULK-{rows - 1:06d}"])
