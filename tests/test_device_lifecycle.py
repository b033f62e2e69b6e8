"""Issue 12: a device's credentials stay honest through its life cycle, on every broker.

`device reset` (the wiped-device flow), `device reinstate` and `device delete`, each from the CLI against a
running bridge on the embedded broker and on a real Mosquitto 2.0 (jwt mode, where the provbridge_jwt plugin
reads the denylist, and dynamic-security mode, where the bridge deletes the device's client):

- after reset, reinstate or delete, every credential the device held before is refused, and a live session
  holding one is ended;
- after a reset, the next valid claim for the hardware id may bring a new key pair, once; refreshes are refused
  until then; the new credentials work;
- after a reinstatement, a refresh gives credentials that work; after a delete, the hardware id makes a new device;
- certificates held before a reset or reinstatement are refused by serial; new ones are accepted;
- refused commands (reinstate an active device, reset a revoked one, an unknown device) change nothing.

Real brokers on 127.0.0.1, real paho clients, the CLI in process; waits poll with generous deadlines.
"""

import json
import time
from collections.abc import Iterator

import pytest

from bridge.config import TOKEN_TTL_CAP_SECONDS, Settings
from bridge.errors import NotFound
from bridge.ops import lifecycle
from bridge.storage.records import IssuedCertificate
from bridge.storage.statefiles import denylist_file
from broker.denylist import parse_denylist
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.brokers import DYNSEC, EMBEDDED, JWT, bridge_on
from tests.helpers.cli import cli_run, run_cli
from tests.helpers.mqtt import MqttClient, can_connect, token_session
from tests.helpers.refresh import RefreshingDevice, provisioned

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


@pytest.fixture(params=[EMBEDDED, JWT, DYNSEC])
def any_broker(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bridge]:
    with bridge_on(request.param, initialised, monkeypatch) as bridge:
        yield bridge


def echo(conn: MqttClient, device_id: str, payload: bytes) -> None:
    """The session is up: it subscribes to the device's topics and gets its own publish back."""
    topic = f"devices/{device_id}/up"
    assert conn.subscribe(f"devices/{device_id}/#") == [1]
    conn.publish(topic, payload)
    assert conn.next_message()[:2] == (topic, payload)


def record(bridge: Bridge, device_id: str, serial: int, not_after: int) -> None:
    """What the claim path records of a certificate it signs (the tests' certificates are signed by the test)."""
    with bridge.store.transaction() as tx:
        tx.record_certificate(IssuedCertificate(format(serial, "x"), device_id, "r-test", 0, not_after, 0))


def events(bridge: Bridge, name: str) -> list[dict[str, object]]:
    return bridge.store.events(event=name, limit=1000)


def refused_refresh(device: RefreshingDevice) -> ClaimError:
    with device:
        answer = device.send_refresh(device.refresh_payload())
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED, answer
    return answer


# --- reset: the wiped device -------------------------------------------------------------------


def test_a_reset_device_claims_with_a_new_key_pair_once_and_its_old_credentials_are_refused(any_broker: Bridge) -> None:
    bridge = any_broker
    device, old = provisioned(bridge)
    kept, kept_creds = provisioned(bridge)
    with token_session(bridge.port, old.mqtt) as live:
        echo(live, device.device_id, b"before")
        assert run_cli(bridge.settings, "device", "reset", device.device_id) == 0
        assert live.disconnected.wait(30), f"{bridge.settings.broker.mode}: a reset must end the live session"
    assert not can_connect(bridge.port, device.device_id, device.device_id, old.mqtt.token)
    refused_refresh(device)  # the old key pair may not refresh meanwhile
    assert events(bridge, "token.refresh_rejected")[-1]["reason"] == "device_reset"
    assert events(bridge, "device.reset")[-1]["device_id"] == device.device_id

    # The device was wiped: same hardware id, a new key pair, a new request id.
    wiped = RefreshingDevice(bridge, hardware_id=device.hardware_id)
    with wiped:
        new = wiped.provision()
    assert wiped.device_id == device.device_id
    assert new.api_key and new.api_key != old.api_key
    assert events(bridge, "device.reprovisioned")[-1]["device_id"] == device.device_id
    with token_session(bridge.port, new.mqtt) as conn:
        echo(conn, device.device_id, b"after the reset")
    assert not can_connect(bridge.port, device.device_id, device.device_id, old.mqtt.token)
    with wiped:  # the new key pair refreshes
        assert isinstance(wiped.send_refresh(wiped.refresh_payload()), ClaimOk)

    # Once: yet another key pair is a device_exists again.
    with RefreshingDevice(bridge, hardware_id=device.hardware_id) as third:
        answer = third.claim(bridge.provision_key)
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.DEVICE_EXISTS
    assert can_connect(bridge.port, kept.device_id, kept.device_id, kept_creds.mqtt.token)  # others untouched


# --- reinstate ------------------------------------------------------------------------------------


def test_a_reinstated_device_refreshes_and_what_it_held_before_stays_refused(any_broker: Bridge) -> None:
    bridge = any_broker
    device, old = provisioned(bridge)
    assert run_cli(bridge.settings, "device", "revoke", device.device_id) == 0
    assert run_cli(bridge.settings, "device", "reinstate", device.device_id) == 0
    assert bridge.store.device(device.device_id).status == "active"
    assert events(bridge, "device.reinstated")[-1]["device_id"] == device.device_id
    assert not can_connect(bridge.port, device.device_id, device.device_id, old.mqtt.token)

    with device:
        answer = device.send_refresh(device.refresh_payload())
    assert isinstance(answer, ClaimOk)
    fresh = device.open(answer)
    with token_session(bridge.port, fresh.mqtt) as conn:
        echo(conn, device.device_id, b"back")
    assert not can_connect(bridge.port, device.device_id, device.device_id, old.mqtt.token)


# --- delete -------------------------------------------------------------------------------------


def test_a_deleted_device_is_gone_its_session_ended_and_its_hardware_id_free(any_broker: Bridge) -> None:
    bridge = any_broker
    device, old = provisioned(bridge)
    with token_session(bridge.port, old.mqtt) as live:
        echo(live, device.device_id, b"before")
        assert run_cli(bridge.settings, "device", "delete", device.device_id) == 0
        assert live.disconnected.wait(30), f"{bridge.settings.broker.mode}: a delete must end the live session"
    assert not can_connect(bridge.port, device.device_id, device.device_id, old.mqtt.token)
    with pytest.raises(NotFound):
        bridge.store.device(device.device_id)
    assert events(bridge, "device.deleted")[-1]["device_id"] == device.device_id
    refused_refresh(device)
    assert events(bridge, "token.refresh_rejected")[-1]["reason"] == "unknown_device"

    with RefreshingDevice(bridge, hardware_id=device.hardware_id) as again:  # a new key pair, a new device
        answer = again.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk) and answer.created and answer.device_id != device.device_id
    assert not can_connect(bridge.port, device.device_id, device.device_id, old.mqtt.token)


def test_a_deleted_device_is_forgotten_once_nothing_it_held_can_be_valid(bridge: Bridge) -> None:
    device, _ = provisioned(bridge)
    now = int(time.time())
    lifecycle.delete_device(bridge.settings, bridge.store, device.device_id, now=now)
    until = now + TOKEN_TTL_CAP_SECONDS
    assert [r.device_id for r in bridge.store.refused_credentials(until - 1)] == [device.device_id]
    assert bridge.store.purge_deleted_devices(until - 1) == 0
    assert bridge.store.purge_deleted_devices(until) == 1
    assert bridge.store.refused_credentials(now) == []


def test_a_reset_survives_revoke_and_reinstate(bridge: Bridge) -> None:
    device, _ = provisioned(bridge)
    for command in ("reset", "revoke", "reinstate"):
        assert run_cli(bridge.settings, "device", command, device.device_id) == 0
    refused_refresh(device)  # the reset still waits for its claim
    assert events(bridge, "token.refresh_rejected")[-1]["reason"] == "device_reset"
    with RefreshingDevice(bridge, hardware_id=device.hardware_id) as wiped:
        assert wiped.provision() and wiped.device_id == device.device_id


def test_a_reset_device_taken_with_another_key_spends_a_use_of_it(bridge: Bridge) -> None:
    """Any valid key of the tenant may bring the new key pair, but a one-time code does it once, and then is spent."""
    first, _ = provisioned(bridge)
    second, _ = provisioned(bridge)
    code = bridge.create_key(human_code=True)
    for device in (first, second):
        assert run_cli(bridge.settings, "device", "reset", device.device_id) == 0
    with RefreshingDevice(bridge, hardware_id=first.hardware_id) as wiped:
        assert isinstance(wiped.claim(code), ClaimOk)
    with RefreshingDevice(bridge, hardware_id=second.hardware_id) as other:
        answer = other.claim(code)
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED
    assert events(bridge, "claim.rejected")[-1]["reason"] == "key_exhausted"


def test_deleting_again_tells_the_brokers_again(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    device, _ = provisioned(bridge)
    far = int(time.time()) + 30 * 86_400
    record(bridge, device.device_id, 0xCE27, far)
    assert run_cli(bridge.settings, "device", "revoke", device.device_id) == 0
    assert run_cli(bridge.settings, "device", "delete", device.device_id) == 0
    path = denylist_file(bridge.settings.data_dir)
    assert parse_denylist(path.read_bytes()).devices[device.device_id] == far  # its certificate's notAfter
    path.unlink()  # a failed write, say
    code, out, _ = cli_run(capsys, bridge.settings, "device", "delete", device.device_id)
    assert code == 0 and "deleted" in out
    assert parse_denylist(path.read_bytes()).devices[device.device_id] == far
    path.unlink()
    assert cli_run(capsys, bridge.settings, "denylist", "publish")[0] == 0
    assert parse_denylist(path.read_bytes()).devices[device.device_id] == far


# --- certificates, by serial (the brokers' side: tests/test_certificate_auth.py) --------------------------


def test_a_revoked_certificate_device_is_listed_until_its_last_certificate_expires(bridge: Bridge) -> None:
    """A certificate may outlive the token lifetime cap (a week by default): the denylist entry must too."""
    device, _ = provisioned(bridge)
    far = int(time.time()) + 30 * 86_400
    record(bridge, device.device_id, 0x5F00, far)
    assert run_cli(bridge.settings, "device", "revoke", device.device_id) == 0
    assert parse_denylist(denylist_file(bridge.settings.data_dir).read_bytes()).devices[device.device_id] == far


def test_the_denylist_lists_older_credentials_with_the_generation_and_old_serials(bridge: Bridge) -> None:
    device, _ = provisioned(bridge)
    record(bridge, device.device_id, 0xABC, int(time.time()) + 3600)
    now = int(time.time())
    lifecycle.reset_device(bridge.settings, bridge.store, device.device_id, now=now)
    entries = parse_denylist(denylist_file(bridge.settings.data_dir).read_bytes())
    older = entries.older_credentials[device.device_id]
    assert (older.generation, older.certificates, older.until) == (1, {"abc"}, now + TOKEN_TTL_CAP_SECONDS)
    assert device.device_id not in entries.devices
    assert bridge.store.device(device.device_id).credential_generation == 1
    # Past its until the entry drops out of the next write.
    assert (
        device.device_id
        not in lifecycle.publish_denylist(bridge.settings, bridge.store, now + TOKEN_TTL_CAP_SECONDS).older_credentials
    )


# --- refusals change nothing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "command", "exit_code", "message"),
    [
        ("active", "reinstate", 2, "is not revoked"),
        ("revoked", "reset", 2, "reinstate it first, or delete it"),
        ("unknown", "reinstate", 1, "no device"),
        ("unknown", "reset", 1, "no device"),
        ("unknown", "delete", 1, "no device"),
    ],
)
def test_refused_life_cycle_commands_change_nothing(
    bridge: Bridge, capsys: pytest.CaptureFixture[str], setup: str, command: str, exit_code: int, message: str
) -> None:
    device, _ = provisioned(bridge)
    if setup == "revoked":
        assert run_cli(bridge.settings, "device", "revoke", device.device_id) == 0
    target = "dev_" + "a" * 26 if setup == "unknown" else device.device_id
    before = bridge.store.device(device.device_id), bridge.store.count("events")
    code, _out, err = cli_run(capsys, bridge.settings, "device", command, target)
    assert code == exit_code and message in err and "Traceback" not in err
    assert (bridge.store.device(device.device_id), bridge.store.count("events")) == before


def test_life_cycle_commands_print_json_when_asked(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    device, _ = provisioned(bridge)
    code, out, _ = cli_run(capsys, bridge.settings, "device", "reset", device.device_id, "--json")
    assert code == 0 and json.loads(out)["reset_pending"] is True
    code, out, _ = cli_run(capsys, bridge.settings, "device", "delete", device.device_id, "--json")
    assert code == 0 and json.loads(out) == {
        "deleted": device.device_id,
        "tenant": "default",
        "hardware_id": device.hardware_id,
    }
