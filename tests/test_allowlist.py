"""Issue 12: pre-provisioning. The allowlist of hardware ids, one at a time or imported from CSV, keys that admit
only it, and the admin-made device id and API key; through the CLI, claims over a real broker, real SQLite."""

import io
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bridge.errors import AlreadyExists
from bridge.ops import allowlist
from bridge.storage.records import AllowlistEntry
from bridge.storage.store import Store
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.cli import cli_json, cli_run
from tests.helpers.devices import Device
from tests.helpers.storage import postgres_plan, sorts_or_scans, sqlite_store_only
from tests.helpers.storage import traced as traced_statements

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


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
    assert done == {"dry_run": False, "entries": 3, "skipped": []}
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


# --- CSV import: its transactions, visibility, dead imports, entries taken by a device meanwhile ---------------


@pytest.fixture
def store(tmp_path: Path, storage_url: str | None) -> Iterator[Store]:
    """A bare database with the tenant `default`: imports need no broker."""
    opened = Store(storage_url or tmp_path / "provbridge.db")
    opened.create_tenant("ten_default", "default", 1_000, "test")
    try:
        yield opened
    finally:
        opened.close()


@dataclass
class WriteTransaction:
    statements: list[str]
    changes: int  # rows inserted, updated or deleted
    steps: int  # SQLite virtual-machine instructions run: the work done, reads included, as a count


@dataclass
class Traced:
    """The write transactions run on this thread's connection, one WriteTransaction each."""

    transactions: list[WriteTransaction] = field(default_factory=list)
    steps: int = 0
    _open: list[str] | None = None
    _changes: int = 0
    _steps: int = 0

    def statement(self, connection: sqlite3.Connection, sql: str) -> None:
        # Called before each statement runs: the counts at COMMIT are those of every statement before it.
        if sql.startswith("BEGIN IMMEDIATE"):
            self._open, self._changes, self._steps = [], connection.total_changes, self.steps
        elif self._open is not None and sql == "COMMIT":
            done = WriteTransaction(self._open, connection.total_changes - self._changes, self.steps - self._steps)
            self.transactions.append(done)
            self._open = None
        elif self._open is not None:
            self._open.append(sql)

    def step(self) -> int:
        self.steps += 1
        return 0  # go on


@contextmanager
def traced(store: Store) -> Iterator[Traced]:
    connection = store.connection()
    trace = Traced()
    connection.set_trace_callback(lambda sql: trace.statement(connection, sql))
    connection.set_progress_handler(trace.step, 1)
    try:
        yield trace
    finally:
        connection.set_trace_callback(None)
        connection.set_progress_handler(None, 1)


def csv_of(hardware_ids: Iterable[str]) -> bytes:
    return ("hardware_id\n" + "".join(f"{hw}\n" for hw in hardware_ids)).encode()


def listed(store: Store) -> list[str]:
    found: list[str] = []
    after: str | None = None
    while True:
        page = allowlist.list_entries(store, "default", after, 1000)
        found += [e.hardware_id for e in page.entries]
        if page.next_cursor is None:
            return found
        after = page.next_cursor


def admitted(store: Store, hardware_id: str) -> bool:
    """Whether a claim would find the hardware id on the allowlist (the claim path's own lookup)."""
    with store.transaction() as tx:
        return tx.allowlist_entry("ten_default", hardware_id) is not None


def test_the_last_transaction_of_an_import_is_the_same_for_1k_and_20k_rows(store: Store) -> None:
    """The import becomes visible in one transaction that changes one row and writes its event, reading no more for
    20,000 rows than for 1,000; every transaction before it is one slice of at most IMPORT_BATCH entries. Counted
    (statements, rows changed, SQLite instructions run), not timed."""
    sqlite_store_only(store, "counts the work of each transaction with SQLite's own counters")
    last: dict[int, WriteTransaction] = {}
    for rows in (1_000, 20_000):
        with traced(store) as trace:
            done = allowlist.import_csv(store, "default", csv_of(f"R{rows}-{n:06d}" for n in range(rows)))
        assert done.entries == rows and not done.skipped
        *slices, last[rows] = trace.transactions
        assert any("SET status = 'done'" in sql for sql in last[rows].statements)
        assert max(t.changes for t in slices) <= allowlist.IMPORT_BATCH + 1  # + the import's counter
        staging = [t for t in slices if any("INSERT INTO allowlist " in sql for sql in t.statements)]
        assert len(staging) == -(-rows // allowlist.IMPORT_BATCH)
    small, large = ([re.sub(r"'[^']*'|\b\d+\b", "?", sql) for sql in last[n].statements] for n in (1_000, 20_000))
    assert small == large  # the same statements, values aside
    assert last[1_000].changes == last[20_000].changes == 2  # the import's status and its `allowlist.imported` event
    assert last[20_000].steps == last[1_000].steps  # and no more work: nothing in it visits the entries
    assert last[20_000].steps < min(t.steps for t in staging)


def test_an_import_is_invisible_until_its_end_and_then_wholly_visible(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    allowlist.add_entry(store, "default", allowlist.NewEntry("SN-SINGLE"), False, 2_000)
    monkeypatch.setattr(allowlist, "IMPORT_BATCH", 10)
    staged: list[int] = []
    seen_while_staging: list[tuple[list[str], bool]] = []
    stage = store.stage_entries

    def stage_and_look(import_id: str, entries: list[AllowlistEntry]) -> list[str]:
        skipped = stage(import_id, entries)
        staged.append(len(entries))
        seen_while_staging.append((listed(store), any(admitted(store, e.hardware_id) for e in entries)))
        return skipped

    monkeypatch.setattr(store, "stage_entries", stage_and_look)
    hardware_ids = [f"BULK-{n:03d}" for n in range(35)]
    done = allowlist.import_csv(store, "default", csv_of(hardware_ids), now=3_000)
    assert staged == [10, 10, 10, 5]
    assert seen_while_staging == [(["SN-SINGLE"], False)] * 4  # every entry staged, none listed or admitted
    assert done.entries == 35
    assert listed(store) == [*sorted(hardware_ids, reverse=True), "SN-SINGLE"]  # newest first
    assert all(admitted(store, hw) for hw in hardware_ids)


def test_an_import_cut_short_leaves_nothing_visible_and_is_removed_in_slices(store: Store) -> None:
    """A process that dies mid-import leaves staged rows no one sees; the next import (or `remove_dead_imports`)
    removes them, ABORT_BATCH rows a transaction, and an abort can no longer be finished."""
    sqlite_store_only(store, "counts the work of each transaction with SQLite's own counters")
    entries = [AllowlistEntry("ten_default", f"DEAD-{n:04d}", None, created_at=5_000) for n in range(2_500)]
    store.begin_import("imp_dead", "ten_default", len(entries), 5_000)
    for start in range(0, len(entries), 500):
        store.stage_entries("imp_dead", entries[start : start + 500])
    assert listed(store) == [] and not admitted(store, "DEAD-0000")
    assert allowlist.remove_dead_imports(store, started_before=5_000) == 0  # not old enough to be dead
    with traced(store) as trace:
        assert allowlist.remove_dead_imports(store, started_before=5_001) == 1
    assert max(t.changes for t in trace.transactions) <= allowlist.ABORT_BATCH
    assert len(trace.transactions) >= 2_500 // allowlist.ABORT_BATCH
    db = store.connection()
    assert [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("allowlist", "allowlist_imports")] == [0, 0]
    with pytest.raises(AlreadyExists):
        store.finish_import("imp_dead", lambda listed, skipped: [])
    assert store.allowlist_conflicts("ten_default", ["DEAD-0000"]) == {}  # the ids can be imported again


def test_an_import_that_fails_midway_is_removed_and_a_finished_one_cannot_be(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(allowlist, "IMPORT_BATCH", 10)
    stage = store.stage_entries

    def stage_then_someone_adds(import_id: str, entries: list[AllowlistEntry]) -> list[str]:
        skipped = stage(import_id, entries)
        if entries[0].hardware_id == "BULK-000":  # meanwhile an operator adds one of the later lines by hand
            allowlist.add_entry(store, "default", allowlist.NewEntry("BULK-025"), False, 6_000)
        return skipped

    monkeypatch.setattr(store, "stage_entries", stage_then_someone_adds)
    with pytest.raises(AlreadyExists, match="nothing was imported"):
        allowlist.import_csv(store, "default", csv_of(f"BULK-{n:03d}" for n in range(30)))
    assert listed(store) == ["BULK-025"]
    db = store.connection()
    assert db.execute("SELECT COUNT(*) FROM allowlist_imports").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM allowlist").fetchone()[0] == 1

    monkeypatch.setattr(store, "stage_entries", stage)
    allowlist.import_csv(store, "default", csv_of(["DONE-1"]))
    (import_id,) = db.execute("SELECT id FROM allowlist_imports").fetchone()
    assert store.abort_import(import_id, allowlist.ABORT_BATCH) is False
    assert "DONE-1" in listed(store)


def test_an_entry_whose_hardware_id_becomes_a_device_mid_import_is_skipped_and_reported(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim with an ordinary key does not see staged entries and creates its device; the import then skips
    that entry (whether it was staged before the device, or came after), names it and counts it in an event."""
    store = bridge.store
    monkeypatch.setattr(allowlist, "IMPORT_BATCH", 10)
    stage = store.stage_entries

    def stage_while_devices_claim(import_id: str, entries: list[AllowlistEntry]) -> list[str]:
        skipped = stage(import_id, entries)
        if entries[0].hardware_id == "BULK-000":
            for hardware_id in ("BULK-003", "BULK-027"):  # staged already; not staged yet
                answer = claim(bridge, hardware_id, bridge.provision_key)
                assert isinstance(answer, ClaimOk) and answer.created
        return skipped

    monkeypatch.setattr(store, "stage_entries", stage_while_devices_claim)
    done = allowlist.import_csv(store, "default", csv_of(f"BULK-{n:03d}" for n in range(30)), with_credentials=True)
    assert done.skipped == ["BULK-003", "BULK-027"]
    assert done.entries == 28 and len(done.credentials) == 28
    assert {a.entry.hardware_id for a in done.credentials}.isdisjoint(done.skipped)
    on_list = entries(bridge)
    assert len(on_list) == 28 and not set(on_list) & set(done.skipped)
    imported = store.events(event="allowlist.imported")[-1]
    assert imported["count"] == 28
    skipped = store.events(event="allowlist.import_skipped")[-1]
    assert (skipped["count"], skipped["reason"]) == (2, allowlist.SKIPPED_REASON)
    with store.transaction() as tx:  # the devices are their own, not made with the import's device ids
        devices = [tx.device_by_hardware_id(store.tenant_id("default"), hw) for hw in done.skipped]
    assert all(d is not None for d in devices)
    made = {a.entry.device_id for a in done.credentials}
    assert not made & {d.id for d in devices if d is not None}


def test_every_allowlist_query_reads_an_index(store: Store) -> None:
    """A page of the list, a claim's lookup and the trigger's costs the same whatever the allowlist's size, and
    a page never walks past an import's staged rows."""
    allowlist.add_entry(store, "default", allowlist.NewEntry("SN-1"), False, 100)
    allowlist.import_csv(store, "default", csv_of(["IMP-1", "IMP-2"]), now=100)
    store.begin_import("imp_staging", "ten_default", 1, 200)
    store.stage_entries("imp_staging", [AllowlistEntry("ten_default", "STAGED-1", None, created_at=200)])
    if isinstance(store.location, str):  # PostgreSQL: its generic plans, sorts and scans priced out
        with traced_statements(store) as statements:
            for after in (None, (100, "IMP-2")):
                store.allowlist_page("ten_default", after, 1)
            with store.transaction() as tx:
                tx.allowlist_entry("ten_default", "SN-1")
        selects = [sql for sql in statements if sql.lstrip().startswith("SELECT")]
        assert len(selects) >= 6
        for sql in selects:
            plan = postgres_plan(store, sql)
            assert not sorts_or_scans(plan, ("allowlist", "allowlist_imports")), (sql, plan)
        return
    connection = store.connection()
    plans: list[str] = []
    for after in (None, (100, "IMP-2")):
        connection.set_trace_callback(lambda sql: plans.append(sql) if sql.lstrip().startswith("SELECT") else None)
        store.allowlist_page("ten_default", after, 1)
        connection.set_trace_callback(None)
    assert len(plans) >= 5
    with store.transaction() as tx:
        connection.set_trace_callback(plans.append)
        tx.allowlist_entry("ten_default", "SN-1")
        connection.set_trace_callback(None)
    for sql in plans:
        rows = [str(row[3]) for row in connection.execute("EXPLAIN QUERY PLAN " + sql)]
        on_tables = [row for row in rows if row.startswith(("SCAN ", "SEARCH "))]
        assert on_tables and all("INDEX" in row or "PRIMARY KEY" in row for row in on_tables), (sql, rows)
        assert not any("TEMP B-TREE" in row for row in rows), (sql, rows)
    trigger_lookup = (
        "SELECT 1 FROM allowlist a JOIN allowlist_imports i ON i.id = a.import_id"
        " WHERE a.tenant_id = ? AND a.hardware_id = ? AND i.status = 'staging' AND i.aborted_at IS NULL"
    )
    rows = [str(row[3]) for row in connection.execute("EXPLAIN QUERY PLAN " + trigger_lookup, ("t", "h"))]
    assert any("sqlite_autoindex_allowlist_1 (tenant_id=? AND hardware_id=?)" in row for row in rows), rows


def test_the_list_merges_added_entries_and_imports_in_order_across_pages(store: Store) -> None:
    for hardware_id, now in (("A-OLD", 50), ("A-100", 100), ("Z-100", 100), ("A-300", 300)):
        allowlist.add_entry(store, "default", allowlist.NewEntry(hardware_id), False, now)
    allowlist.import_csv(store, "default", csv_of(["M-1", "M-2", "M-3"]), now=100)
    allowlist.import_csv(store, "default", csv_of(["K-1", "K-2"]), now=200)
    allowlist.import_csv(store, "default", csv_of(["E-1"]), now=20)
    store.begin_import("imp_staging", "ten_default", 1, 250)
    store.stage_entries("imp_staging", [AllowlistEntry("ten_default", "STAGED", None, created_at=250)])
    expected = ["A-300", "K-2", "K-1", "Z-100", "M-3", "M-2", "M-1", "A-100", "A-OLD", "E-1"]
    for limit in (1, 2, 3, 4, 1000):
        seen: list[str] = []
        after: str | None = None
        while True:
            page = allowlist.list_entries(store, "default", after, limit)
            assert len(page.entries) <= limit
            seen += [e.hardware_id for e in page.entries]
            if page.next_cursor is None:
                break
            after = page.next_cursor
        assert seen == expected, limit
