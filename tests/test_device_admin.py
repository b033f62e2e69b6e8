"""Issue 12, devices: lists a page at a time with server-side filters (each query on an index), changing what
an operator owns (name, labels, groups, profile), and the `dk_` API keys devices get: verified by hash, and
rotated. Through the CLI as an operator runs it (in this process), on devices made by real claims."""

import io
import json
from typing import Any

import pytest

from bridge.config import Settings
from bridge.ops import devices
from bridge.storage.store import DeviceFilter, PageCursor, Store
from provwire.models import ClaimOk, Credentials
from tests.helpers.bridge import Bridge
from tests.helpers.cli import cli_json, cli_run
from tests.helpers.devices import claim_devices, provision
from tests.helpers.mqtt import MqttClient
from tests.helpers.refresh import RefreshingDevice
from tests.helpers.storage import database_bytes, on_postgres, postgres_plan, traced

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends

# --- lists -----------------------------------------------------------------------------------------------------


def test_a_list_pages_through_every_device_once_newest_first(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, key = initialised
    store = Store(settings.database)
    made = claim_devices(settings, store, key, 25)
    seen: list[str] = []
    after: list[str] = []
    pages = 0
    while True:
        page = cli_json(capsys, settings, "device", "list", "--limit", "10", *after)
        pages += 1
        seen += [d["id"] for d in page["devices"]]
        if page["next_cursor"] is None:
            break
        after = ["--after", page["next_cursor"]]
    assert pages == 3 and sorted(seen) == sorted(made) and len(seen) == 25
    created = {d.id: (d.created_at, d.id) for d in store.devices(limit=100)}
    assert [created[d] for d in seen] == sorted((created[d] for d in seen), reverse=True)
    store.close()


def test_lists_filter_on_the_server(initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]) -> None:
    settings, key = initialised
    store = Store(settings.database)
    made = claim_devices(settings, store, key, 6)
    for device_id in made[:2]:
        assert cli_run(capsys, settings, "device", "revoke", device_id)[0] == 0
    revoked = cli_json(capsys, settings, "device", "list", "--status", "revoked")
    assert sorted(d["id"] for d in revoked["devices"]) == sorted(made[:2])
    active = cli_json(capsys, settings, "device", "list", "--status", "active", "--tenant", "default")
    assert sorted(d["id"] for d in active["devices"]) == sorted(made[2:])
    one = store.device(made[3])
    by_hardware = cli_json(capsys, settings, "device", "list", "--hardware-id", one.hardware_id)
    assert [d["id"] for d in by_hardware["devices"]] == [one.id]
    store.close()


def test_lists_filter_by_label_search_and_presence(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, key = initialised
    store = Store(settings.database)
    made = claim_devices(settings, store, key, 5, prefix="line")
    other = claim_devices(settings, store, key, 2, prefix="bench")

    def listed(*argv: str) -> list[str]:
        return sorted(d["id"] for d in cli_json(capsys, settings, "device", "list", *argv)["devices"])

    for device_id in made[:3]:
        assert cli_run(capsys, settings, "device", "update", device_id, "--label", "line=7")[0] == 0
    assert listed("--label", "line=7") == sorted(made[:3])
    # A label's rows follow the device: changed, the old value no longer matches; deleted, nothing is left.
    assert cli_run(capsys, settings, "device", "update", made[0], "--label", "line=8")[0] == 0
    assert cli_run(capsys, settings, "device", "delete", made[1])[0] == 0
    assert listed("--label", "line=7") == [made[2]]
    assert listed("--label", "line=8") == [made[0]]
    assert listed("--label", "line=") == []

    assert listed("--search", "bench") == sorted(other)
    assert listed("--search", made[3]) == [made[3]]
    assert listed("--search", "zzz") == []

    store.record_presence([(made[3], True, 1_700_000_000), (made[4], False, 1_700_000_001)])
    assert listed("--presence", "online") == [made[3]]
    assert listed("--presence", "offline") == [made[4]]  # seen and gone; never seen is neither
    assert listed("--presence", "online", "--label", "line=7") == []
    assert cli_run(capsys, settings, "tenant", "create", "acme")[0] == 0
    assert listed("--presence", "online", "--tenant", "default") == [made[3]]  # the presence rows' tenant
    assert listed("--presence", "online", "--tenant", "acme") == []
    # Every list pages completely, one device at a time, whatever shares a creation second.
    for argv in (["--label", "line=7"], ["--search", "line"], ["--presence", "offline"], []):
        walked, after = [], []
        while True:
            page = cli_json(capsys, settings, "device", "list", "--limit", "1", *argv, *after)
            walked += [d["id"] for d in page["devices"]]
            if page["next_cursor"] is None:
                break
            after = ["--after", page["next_cursor"]]
        assert sorted(walked) == listed(*argv) and len(set(walked)) == len(walked), argv
    by_hardware = [
        d["hardware_id"] for d in cli_json(capsys, settings, "device", "list", "--search", "line")["devices"]
    ]
    assert by_hardware == sorted(by_hardware)  # a prefix alone lists in hardware-id order
    newest = cli_json(capsys, settings, "device", "list", "--limit", "1")["next_cursor"]
    code, out, err = cli_run(capsys, settings, "device", "list", "--search", "line", "--after", newest)
    assert code == 2 and "another order" in err
    code, out, err = cli_run(capsys, settings, "device", "list", "--label", "no-equals")
    assert code == 2 and "NAME=VALUE" in err and out == ""
    store.close()


@pytest.mark.parametrize(
    "where",
    [
        DeviceFilter(),
        DeviceFilter(tenant_id="ten_x"),
        DeviceFilter(status="revoked"),
        DeviceFilter(hardware_id="SN-1"),
        DeviceFilter(tenant_id="ten_x", status="active"),
        DeviceFilter(label=("line", "7")),
        DeviceFilter(tenant_id="ten_x", label=("line", "7"), status="active"),
        DeviceFilter(hardware_id_prefix="SN-"),
        DeviceFilter(online=True),
        DeviceFilter(online=False),
        DeviceFilter(tenant_id="ten_x", online=True, hardware_id_prefix="SN-"),
        DeviceFilter(tenant_id="ten_x", online=False),
    ],
    ids=[
        "all",
        "tenant",
        "status",
        "hardware-id",
        "tenant-and-status",
        "label",
        "label-tenant-status",
        "hardware-id-prefix",
        "online",
        "offline",
        "online-tenant-prefix",
        "offline-tenant",
    ],
)
def test_every_list_query_reads_an_index(initialised: tuple[Settings, str], where: DeviceFilter) -> None:
    """A page costs the same on a fleet of any size: no query of a list scans the devices table."""
    store = Store(initialised[0].database)
    if on_postgres(initialised[0]):
        _postgres_lists_read_an_index(store, where)
        return
    plans: list[str] = []
    connection = store.connection()
    cursor = PageCursor(0, "dev_x", "SN-9") if where.by_hardware_id else PageCursor(1_700_000_000, "dev_x")
    for after in (None, cursor):
        connection.set_trace_callback(lambda sql: plans.append(sql) if sql.lstrip().startswith("SELECT") else None)
        store.devices_page(where, after, 10)
        connection.set_trace_callback(None)
    assert len(plans) == 2
    for sql in plans:
        rows = [str(row[3]) for row in connection.execute("EXPLAIN QUERY PLAN " + sql)]
        on_tables = [row for row in rows if row.startswith(("SCAN ", "SEARCH "))]
        assert on_tables and all("INDEX" in row or "PRIMARY KEY" in row for row in on_tables), rows
        # The index gives the order, so a page reads a page (not every match, sorted); only the devices of one
        # hardware id (one per tenant) are put in order by id.
        if where.hardware_id is None:
            assert not any("TEMP B-TREE" in row and "RIGHT PART" not in row for row in rows), rows
        if where.online is not None and where.tenant_id is not None:  # a seek to the tenant, not a walk past others
            assert any("device_presence_tenant_page (tenant_id=? AND online=?" in row for row in rows), rows
    api = " ".join(
        str(row[3])
        for row in connection.execute("EXPLAIN QUERY PLAN SELECT id FROM devices WHERE api_key_hash = ?", (b"x",))
    )
    assert "devices_api_key" in api
    store.close()


def _postgres_lists_read_an_index(store: Store, where: DeviceFilter) -> None:
    cursor = PageCursor(0, "dev_x", "SN-9") if where.by_hardware_id else PageCursor(1_700_000_000, "dev_x")
    with traced(store) as statements:
        for after in (None, cursor):
            store.devices_page(where, after, 10)
    plans = [postgres_plan(store, sql) for sql in statements if sql.lstrip().startswith("SELECT")]
    assert len(plans) == 2
    for plan in plans:
        assert not any("Seq Scan on devices" in line or "Seq Scan on device_" in line for line in plan), plan
        if where.hardware_id is None:  # the index gives the order: a page reads a page, not every match sorted
            # (an Incremental Sort orders only the rows that tie on the index's columns: SQLite's "RIGHT PART")
            assert not any(line.strip().lstrip("-> ").startswith("Sort  (") for line in plan), plan  # a Sort node
        if where.online is not None and where.tenant_id is not None:  # a seek to the tenant, not a walk past others
            assert any("device_presence_tenant_page" in line for line in plan), plan
    assert any(
        "devices_api_key" in line for line in postgres_plan(store, "SELECT id FROM devices WHERE api_key_hash = ?")
    )
    store.close()


@pytest.mark.parametrize(
    "argv",
    [["--after", "not-a-cursor"], ["--after", "MTIzOmRldl94eA"[:-1]], ["--limit", "1001"], ["--status", "gone"]],
    ids=["garbage", "truncated", "page-too-large", "unknown-status"],
)
def test_a_bad_page_request_says_why(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = cli_run(capsys, initialised[0], "device", "list", *argv)
    assert code == 2 and out == "" and "Traceback" not in err


# --- update ------------------------------------------------------------------------------------------------------


def test_a_device_update_changes_what_it_names_with_one_event(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, key = initialised
    store = Store(settings.database)
    (device_id,) = claim_devices(settings, store, key, 1)
    before = store.device(device_id)
    view = cli_json(
        capsys,
        settings,
        *("device", "update", device_id, "--name", "boiler 7", "--label", "floor=2", "--group", "boilers"),
    )
    assert view["changed"] == ["name", "labels", "groups"]
    after = store.device(device_id)
    assert (after.name, after.labels, after.groups) == ("boiler 7", {"floor": "2"}, ["boilers"])
    assert (after.public_key, after.status, after.updated_at) == (before.public_key, before.status, before.updated_at)
    (event,) = store.events(event="device.updated")
    assert event["device_id"] == device_id and event["changes"] == view["changed"] and event["actor"] == "cli"
    cleared = cli_json(capsys, settings, "device", "update", device_id, "--clear-name", "--remove-group", "boilers")
    assert cleared["changed"] == ["name", "groups"] and store.device(device_id).name is None
    store.close()


def subscriptions(bridge: Bridge, credentials: Credentials, *filters: str) -> list[int]:
    """What the broker grants a device connected with `credentials` for each filter (a QoS, or a failure code)."""
    device_id = credentials.mqtt.client_id
    with MqttClient(bridge.port, device_id, device_id, credentials.mqtt.token) as conn:
        assert conn.connect()
        return [conn.subscribe(topic_filter)[0] for topic_filter in filters]


def test_a_new_profile_scopes_the_tokens_the_device_gets_next(
    profiled: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge = profiled
    device = RefreshingDevice(bridge)
    with device:
        held = device.provision()
    device_id = device.device_id
    mine, config = f"devices/{device_id}/#", f"config/{device_id}/#"
    assert subscriptions(bridge, held, mine, config) == [1, 0x80]
    view = cli_json(capsys, bridge.settings, "device", "update", device_id, "--profile", "sensor")
    assert view["changed"] == ["profile"] and view["profile"] == "sensor"
    assert bridge.store.device(device_id).profile == "sensor"

    with device:  # its next refresh
        answer = device.send_refresh(device.refresh_payload())
    assert isinstance(answer, ClaimOk) and answer.profile == "sensor"
    refreshed = device.open(answer)
    assert refreshed.mqtt.publish == [f"telemetry/default/{device_id}"] and refreshed.mqtt.subscribe == [config]
    assert subscriptions(bridge, refreshed, config, mine) == [1, 0x80]  # the broker holds it to the new scope
    assert subscriptions(bridge, held, mine) == [1]  # a token it held keeps its scope until it expires

    with device:  # a re-claim (the same key pair) gets the device's profile too
        again = device.claim(bridge.provision_key)
    assert isinstance(again, ClaimOk) and again.device_id == device_id and again.profile == "sensor"
    assert device.open(again).mqtt.subscribe == [config]


BAD_DEVICE_UPDATES = {
    "nothing to change": [],
    "unknown profile": ["--profile", "no-such-profile"],
    "a label it does not have": ["--remove-label", "nope"],
    "a name and no name": ["--name", "x", "--clear-name"],
    "an unprintable name": ["--name", "a\tb"],
    "a label with a NUL": ["--label", "floor=2\x00"],
    "a group that reverses the text after it": ["--group", "\u202eboilers"],
    "a label name with '='-like ';'": ["--label", "fl;oor=2"],
}


@pytest.mark.parametrize("argv", BAD_DEVICE_UPDATES.values(), ids=BAD_DEVICE_UPDATES.keys())
def test_a_refused_device_update_changes_nothing(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    settings, key = initialised
    store = Store(settings.database)
    (device_id,) = claim_devices(settings, store, key, 1)
    before = store.device(device_id)
    code, out, err = cli_run(capsys, settings, "device", "update", device_id, *argv)
    assert code == 2 and out == "" and "Traceback" not in err
    assert store.device(device_id) == before and store.events(event="device.updated") == []
    store.close()


# --- API keys ---------------------------------------------------------------------------------------------------


def verify(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, settings: Settings, key: str) -> Any:
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    code, out, err = cli_run(capsys, settings, "device", "verify-api-key", "--json")
    return json.loads(out) if code == 0 else (code, err)


def test_an_api_key_verifies_for_its_device_until_rotated_or_revoked(
    bridge: Bridge, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    device_id, credentials = provision(bridge)
    api_key = credentials.api_key
    assert verify(capsys, monkeypatch, bridge.settings, api_key) == {"device_id": device_id, "tenant": "default"}
    for wrong in ("", "dk_" + "A" * 43, api_key[:-1], api_key + "A", "pk_" + api_key[3:]):
        code, err = verify(capsys, monkeypatch, bridge.settings, wrong)
        assert code == 1 and "not a valid API key" in err and (not wrong or wrong not in err)

    rotated = cli_json(capsys, bridge.settings, "device", "rotate-api-key", device_id)
    assert rotated["device_id"] == device_id and rotated["api_key"] != api_key
    assert verify(capsys, monkeypatch, bridge.settings, api_key)[0] == 1  # the old key, at once
    assert verify(capsys, monkeypatch, bridge.settings, rotated["api_key"])["device_id"] == device_id
    (event,) = bridge.store.events(event="device.api_key_rotated")
    assert event["device_id"] == device_id and rotated["api_key"] not in json.dumps(event)
    assert rotated["api_key"].encode() not in database_bytes(bridge.settings)  # only its hash

    assert cli_run(capsys, bridge.settings, "device", "revoke", device_id)[0] == 0
    assert verify(capsys, monkeypatch, bridge.settings, rotated["api_key"])[0] == 1


def test_verify_reads_nothing_from_a_key_that_is_not_one(initialised: tuple[Settings, str]) -> None:
    store = Store(initialised[0].database)
    with traced(store) as statements:
        assert devices.verify_api_key(store, "'; DROP TABLE devices; --") is None
    assert statements == [] and store.count("devices") == 0
    store.close()
