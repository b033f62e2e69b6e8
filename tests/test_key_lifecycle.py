"""Issue 12, provisioning keys after creation: update, revoke and reinstate, a default key with every tenant,
one-time codes in bulk. Each change is one transaction with its event; a change that is refused changes
nothing. Through the CLI as an operator runs it (in this process), on the same SQLite file as a running
bridge (the embedded broker), with real claims wherever a change decides what a claim gets."""

import csv
import io
import time
from typing import Any

import pytest

from bridge.config import Settings
from bridge.ops import admin
from bridge.storage.records import ProvisionKey
from bridge.storage.store import PageCursor, Store
from provwire import crypto
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.cli import cli_json, cli_run
from tests.helpers.devices import Device
from tests.helpers.storage import database_bytes, on_postgres, postgres_plan, sorts_or_scans, traced
from tests.helpers.waiting import wait_for

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


def keys_named(store: Store, name: str) -> list[ProvisionKey]:
    stored = store.keys()
    return [k for k in stored if k.name == name]


def key_row(store: Store, key_id: str) -> ProvisionKey:
    stored = store.keys()
    (key,) = [k for k in stored if k.id == key_id]
    return key


def events(store: Store, name: str) -> list[dict[str, Any]]:
    return store.events(event=name, limit=1000)


def new_key(store: Store, settings: Settings, **spec: Any) -> ProvisionKey:
    spec.setdefault("tenant", "default")
    spec.setdefault("name", "line-7")
    return admin.create_key(store, settings, admin.KeySpec(**spec), int(time.time()))[0]


def refused(answer: ClaimOk | ClaimError) -> ErrorCode:
    assert isinstance(answer, ClaimError), answer
    return answer.code


def granted(answer: ClaimOk | ClaimError) -> ClaimOk:
    assert isinstance(answer, ClaimOk), answer
    return answer


# --- update -----------------------------------------------------------------------------------------------


def test_an_update_changes_what_it_names_and_nothing_else_with_one_event(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = initialised[0]
    store = Store(settings.database)
    key = new_key(store, settings, labels={"site": "lyon", "line": "7"}, groups=["eu"], max_registrations=10)
    view = cli_json(
        capsys,
        settings,
        *("key", "update", key.id, "--name", "line-8", "--max-registrations", "3", "--expires-in", "2d"),
        *("--label", "line=8", "--remove-label", "site", "--group", "fr", "--reclaim", "rotate"),
    )
    after = key_row(store, key.id)
    assert (after.name, after.max_registrations, after.reclaim_policy) == ("line-8", 3, "rotate")
    assert after.labels == {"line": "8"} and after.groups == ["eu", "fr"]
    assert after.expires_at is not None and abs(after.expires_at - (int(time.time()) + 2 * 86400)) < 60
    assert (after.profile, after.key_hash, after.status, after.kind) == (key.profile, key.key_hash, "active", "key")
    assert view["changed"] == ["name", "max_registrations", "expires_at", "labels", "groups", "reclaim_policy"]
    (event,) = events(store, "key.updated")
    assert event["changes"] == view["changed"] and event["actor"] == "cli"
    assert event["key_id_prefix"] == key.id[:12] and event["key_name"] == "line-8" and event["tenant"] == "default"
    # The same update again changes nothing, and says so.
    again = cli_json(capsys, settings, "key", "update", key.id, "--name", "line-8", "--reclaim", "rotate")
    assert again["changed"] == []
    store.close()


BAD_UPDATES = {
    "nothing to change": [],
    "unknown profile": ["--profile", "no-such-profile"],
    "zero registrations": ["--max-registrations", "0"],
    "a limit and no limit": ["--max-registrations", "2", "--unlimited"],
    "expiry in the past": ["--expires-at", "2001-01-01T00:00:00Z"],
    "an expiry and none": ["--expires-in", "1d", "--no-expiry"],
    "a label it does not have": ["--name", "other", "--remove-label", "nope"],
    "a group it does not have": ["--remove-group", "nope"],
    "an empty name": ["--name", ""],
    "a label that is no pair": ["--label", "novalue"],
    "an unknown re-claim policy": ["--reclaim", "sometimes"],
    "a label with a NUL": ["--label", "site=ly\x00on"],
    "a group that reverses the text after it": ["--group", "ops\u202etxt.exe"],
    "a label name with ';'": ["--label", "a;b=c"],
    "a label name too long": ["--label", "n" * 129 + "=v"],
}


@pytest.mark.parametrize("argv", BAD_UPDATES.values(), ids=BAD_UPDATES.keys())
def test_a_refused_update_says_why_and_changes_nothing(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    settings = initialised[0]
    store = Store(settings.database)
    key = new_key(store, settings, labels={"site": "lyon"})
    code, out, err = cli_run(capsys, settings, "key", "update", key.id, *argv)
    assert code == 2 and out == ""
    assert "error" in err and "Traceback" not in err
    assert key_row(store, key.id) == key
    assert events(store, "key.updated") == []
    store.close()


@pytest.mark.parametrize(
    "argv",
    [["--label", "si;te=lyon"], ["--group", "ops\u202etxt"], ["--label", "a=b"]],
    ids=["semicolon-label-name", "bidi-group", "fine"],
)
def test_a_new_keys_labels_and_groups_are_checked_as_an_allowlist_entrys(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    settings = initialised[0]
    code, out, err = cli_run(capsys, settings, "key", "create", "--name", "labelled", *argv)
    store = Store(settings.database)
    made = keys_named(store, "labelled")
    store.close()
    if argv[1] == "a=b":
        assert code == 0 and [k.labels for k in made] == [{"a": "b"}]
    else:
        assert code == 2 and out == "" and "printable" in err and made == []


def test_updating_an_unknown_key_fails_with_its_id(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli_run(capsys, initialised[0], "key", "update", "key_doesnotexist", "--name", "x")
    assert code == 1 and "no provisioning key 'key_doesnotexist'" in err


def test_a_human_code_stays_one_time_and_can_only_be_shortened(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = initialised[0]
    store = Store(settings.database)
    code_key = new_key(store, settings, human_code=True)
    for argv in (["--max-registrations", "2"], ["--unlimited"], ["--no-expiry"], ["--expires-in", "30d"]):
        code, _, err = cli_run(capsys, settings, "key", "update", code_key.id, *argv)
        assert code == 2 and "human code" in err, argv
    assert key_row(store, code_key.id) == code_key
    shortened = cli_json(capsys, settings, "key", "update", code_key.id, "--expires-in", "1h")
    assert shortened["changed"] == ["expires_at"]
    assert (key_row(store, code_key.id).expires_at or 0) < (code_key.expires_at or 0)
    store.close()


def test_the_registration_limit_applies_to_the_next_claim(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    made = cli_json(capsys, bridge.settings, "key", "create", "--name", "limited", "--max-registrations", "1")
    pk = made["provision_key"]
    with Device(bridge) as first:
        assert isinstance(first.claim(pk), ClaimOk)
    with Device(bridge) as second:
        assert refused(second.claim(pk)) is ErrorCode.PERMISSION_DENIED  # used up
        cli_json(capsys, bridge.settings, "key", "update", made["id"], "--max-registrations", "2")
        assert isinstance(second.claim(pk), ClaimOk)
    with Device(bridge) as third:
        assert refused(third.claim(pk)) is ErrorCode.PERMISSION_DENIED
        cli_json(capsys, bridge.settings, "key", "update", made["id"], "--unlimited")
        assert isinstance(third.claim(pk), ClaimOk)
    assert key_row(bridge.store, made["id"]).registrations == 3


def test_a_new_profile_scopes_the_devices_the_key_makes_from_then_on(
    profiled: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge = profiled
    made = cli_json(capsys, bridge.settings, "key", "create", "--name", "fleet")
    with Device(bridge) as before:
        answer = granted(before.claim(made["provision_key"]))
        assert answer.profile == "default"
        assert before.open(answer).mqtt.publish == [f"devices/{answer.device_id}/#"]
    made_before = answer.device_id
    assert cli_json(capsys, bridge.settings, "key", "update", made["id"], "--profile", "sensor")["changed"] == [
        "profile"
    ]
    with Device(bridge) as after:
        answer = granted(after.claim(made["provision_key"]))
        mqtt = after.open(answer).mqtt
    assert answer.profile == "sensor" and bridge.store.device(answer.device_id).profile == "sensor"
    assert mqtt.publish == [f"telemetry/default/{answer.device_id}"]
    assert mqtt.subscribe == [f"config/{answer.device_id}/#"]
    # A key's profile is the template of the devices it makes: one made before keeps its own, re-claimed too.
    with before:
        again = granted(before.claim(made["provision_key"]))
    assert again.device_id == made_before and again.profile == "default"
    assert bridge.store.device(made_before).profile == "default"


def test_an_expiry_set_by_update_stops_the_key_and_lifting_it_starts_it_again(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    made = cli_json(capsys, bridge.settings, "key", "create", "--name", "season")
    pk = made["provision_key"]
    with Device(bridge) as first:
        granted(first.claim(pk))
    ends = cli_json(capsys, bridge.settings, "key", "update", made["id"], "--expires-in", "2s")
    assert ends["changed"] == ["expires_at"]
    expires_at = key_row(bridge.store, made["id"]).expires_at
    assert expires_at is not None
    assert wait_for(lambda: time.time() >= expires_at + 1, timeout=30)  # the clock past it, not a measure of speed
    with Device(bridge) as late:
        assert refused(late.claim(pk)) is ErrorCode.PERMISSION_DENIED
        rejected = [e for e in events(bridge.store, "claim.rejected") if e.get("hardware_id") == late.hardware_id]
        assert [e["reason"] for e in rejected] == ["key_expired"]
        cli_json(capsys, bridge.settings, "key", "update", made["id"], "--expires-in", "1d")
        granted(late.claim(pk))
    assert key_row(bridge.store, made["id"]).registrations == 2


def test_new_labels_and_groups_go_to_the_devices_the_key_makes_from_then_on(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = bridge.settings
    made = cli_json(capsys, settings, "key", "create", "--name", "lyon", "--label", "site=lyon", "--group", "eu")
    with Device(bridge) as first:
        old = granted(first.claim(made["provision_key"])).device_id
    cli_json(
        capsys,
        settings,
        *("key", "update", made["id"], "--label", "line=8", "--remove-label", "site", "--group", "fr"),
        *("--remove-group", "eu"),
    )
    with Device(bridge) as second:
        new = granted(second.claim(made["provision_key"])).device_id
    shown = cli_json(capsys, settings, "device", "show", new)
    assert (shown["labels"], shown["groups"]) == ({"line": "8"}, ["fr"])
    kept = bridge.store.device(old)
    assert (kept.labels, kept.groups) == ({"site": "lyon"}, ["eu"])  # a device made before keeps its own

    def labelled(label: str) -> list[str]:
        return [d["id"] for d in cli_json(capsys, settings, "device", "list", "--label", label)["devices"]]

    assert labelled("line=8") == [new] and labelled("site=lyon") == [old]


def test_the_reclaim_policy_decides_whether_a_wiped_device_gets_back_in(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    made = cli_json(capsys, bridge.settings, "key", "create", "--name", "line-3")
    pk = made["provision_key"]
    with Device(bridge) as original:
        device_id = granted(original.claim(pk)).device_id
    hardware_id = original.hardware_id
    with Device(bridge, hardware_id) as wiped:  # the same hardware, a new key pair
        assert refused(wiped.claim(pk)) is ErrorCode.DEVICE_EXISTS
        cli_json(capsys, bridge.settings, "key", "update", made["id"], "--reclaim", "rotate")
        answer = granted(wiped.claim(pk))
        assert answer.device_id == device_id and not answer.created
        assert wiped.open(answer).mqtt.client_id == device_id
    assert bridge.store.device(device_id).public_key == crypto.sec1(wiped.private_key.public_key())
    assert [e["device_id"] for e in events(bridge.store, "device.reprovisioned")] == [device_id]
    cli_json(capsys, bridge.settings, "key", "update", made["id"], "--reclaim", "reject")
    with Device(bridge, hardware_id) as wiped_again:
        assert refused(wiped_again.claim(pk)) is ErrorCode.DEVICE_EXISTS
    assert bridge.store.count("devices") == 1


# --- revoke and reinstate -------------------------------------------------------------------------------------


def test_a_revoked_key_refuses_claims_until_it_is_reinstated(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    made = cli_json(capsys, bridge.settings, "key", "create", "--name", "paused")
    pk = made["provision_key"]
    with Device(bridge) as device:
        assert cli_json(capsys, bridge.settings, "key", "revoke", made["id"])["status"] == "revoked"
        assert refused(device.claim(pk)) is ErrorCode.PERMISSION_DENIED
        rejected = [e for e in events(bridge.store, "claim.rejected") if e.get("hardware_id") == device.hardware_id]
        assert [e["reason"] for e in rejected] == ["key_revoked"]
        assert cli_json(capsys, bridge.settings, "key", "reinstate", made["id"])["status"] == "active"
        assert isinstance(device.claim(pk), ClaimOk)
    assert [e["actor"] for e in events(bridge.store, "key.revoked") + events(bridge.store, "key.reinstated")] == [
        "cli",
        "cli",
    ]
    code, _, err = cli_run(capsys, bridge.settings, "key", "reinstate", made["id"])
    assert code == 2 and "is not revoked" in err
    assert len(events(bridge.store, "key.reinstated")) == 1


# --- a default key with every tenant --------------------------------------------------------------------------


def test_a_new_tenant_comes_with_a_default_key_its_devices_claim_with(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    created = cli_json(capsys, bridge.settings, "tenant", "create", "acme")
    assert created["default_key"]["name"] == "default" and created["default_key"]["tenant"] == "acme"
    assert created["default_key"]["max_registrations"] is None  # like a project's default registration token
    with Device(bridge) as device:
        answer = device.claim(created["provision_key"])
    assert isinstance(answer, ClaimOk)
    assert bridge.store.device(answer.device_id).tenant_name == "acme"
    tenant_events = bridge.store.events(tenant="acme", limit=10)
    assert [e["event"] for e in tenant_events[:2]] == ["tenant.created", "key.created"]
    code, _, err = cli_run(capsys, bridge.settings, "tenant", "create", "acme")
    assert code == 1 and "already exists" in err
    assert len(bridge.store.keys(bridge.store.tenant_id("acme"))) == 1  # nothing half made


# --- one-time codes in bulk -----------------------------------------------------------------------------------


def test_codes_in_bulk_are_shown_once_stored_as_hashes_and_each_claims_once(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli_run(capsys, bridge.settings, "key", "codes", "--count", "5", "--name", "batch-42")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 5 and list(rows[0]) == ["key_id", "code", "expires_at"]
    assert len({row["code"] for row in rows}) == 5
    stored = {k.id: k for k in keys_named(bridge.store, "batch-42")}
    assert set(stored) == {row["key_id"] for row in rows}
    assert all(k.kind == "code" and k.max_registrations == 1 and k.expires_at for k in stored.values())
    database = database_bytes(bridge.settings)
    assert all(row["code"].encode() not in database for row in rows)  # only hashes are kept
    (event,) = events(bridge.store, "key.codes_created")
    assert event["count"] == 5 and event["key_name"] == "batch-42" and event["actor"] == "cli"
    created = [e for e in events(bridge.store, "key.created") if e["key_name"] == "batch-42"]
    assert created == []  # one event for the batch, not one per code
    with Device(bridge) as first, Device(bridge) as second:
        assert isinstance(first.claim(rows[0]["code"]), ClaimOk)
        assert refused(second.claim(rows[0]["code"])) is ErrorCode.PERMISSION_DENIED
        assert isinstance(second.claim(rows[1]["code"]), ClaimOk)


@pytest.mark.parametrize("count", ["0", "10001"])
def test_codes_beyond_the_bounds_are_refused_and_none_made(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str], count: str
) -> None:
    settings = initialised[0]
    code, out, err = cli_run(capsys, settings, "key", "codes", "--count", count, "--name", "x")
    assert code == 2 and out == "" and "Traceback" not in err
    store = Store(settings.database)
    assert keys_named(store, "x") == [] and events(store, "key.codes_created") == []
    store.close()


def test_keys_list_a_page_at_a_time_in_index_order(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = initialised[0]
    assert cli_run(capsys, settings, "key", "codes", "--count", "7", "--name", "paged")[0] == 0
    store = Store(settings.database)
    every = [k.id for k in store.keys(None)]
    seen: list[str] = []
    after: list[str] = []
    while True:
        page = cli_json(capsys, settings, "key", "list", "--limit", "3", *after)
        seen += [k["id"] for k in page["keys"]]
        if page["next_cursor"] is None:
            break
        after = ["--after", page["next_cursor"]]
    assert seen == every and len(every) == 8  # the first key and the codes, each once, oldest first
    code, out, err = cli_run(capsys, settings, "key", "list", "--after", "garbage")
    assert code == 2 and out == "" and "cursor" in err
    if on_postgres(settings):
        with traced(store) as statements:
            for tenant_id in (None, "ten_x"):
                store.keys_page(tenant_id, PageCursor(1_700_000_000, "key_x"), 10)
        for sql in statements:
            plan = postgres_plan(store, sql)
            assert any("provision_keys_" in line for line in plan) and not sorts_or_scans(plan, ("provision_keys",))
        store.close()
        return
    connection = store.connection()
    plans: list[str] = []
    connection.set_trace_callback(lambda sql: plans.append(sql) if sql.lstrip().startswith("SELECT") else None)
    for tenant_id in (None, "ten_x"):
        store.keys_page(tenant_id, PageCursor(1_700_000_000, "key_x"), 10)
    connection.set_trace_callback(None)
    for sql in plans:
        rows = [str(row[3]) for row in connection.execute("EXPLAIN QUERY PLAN " + sql)]
        assert any("provision_keys_" in row for row in rows) and not any("TEMP B-TREE" in row for row in rows), rows
    store.close()
