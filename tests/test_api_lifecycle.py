"""Issue 12, acceptance 1: a device's life cycle driven through the admin HTTP API keeps the promises the CLI keeps
(tests/test_device_lifecycle.py, tests/test_broker_promises.py), on every broker.

The bridge serves claims on the embedded broker, on Mosquitto with the provbridge_jwt plugin and on Mosquitto in
dynamic-security mode; the admin API runs beside it in a process of its own, as `provbridge serve` starts it, so
its changes reach the brokers only as they do in production. Through real HTTP:

- revoke ends the device's live session at once and refuses its token; reinstate lets it in again only with new
  credentials (a token refresh or a re-claim), what it held before (its claim's token, a token a backend minted)
  stays refused; another device's session is untouched;
- delete ends the live session, refuses the old token, and the hardware id claims again as a new device;
- reset is the wiped-device flow: the live session ends, the old token, refresh and API key are refused, the next
  claim brings a new key pair once (same device id, new credentials that work), yet another key pair is refused.

Each change is an event whose actor is the admin token. Real brokers on 127.0.0.1, real paho clients, real
SQLite; waits are deadlines on a condition (a session's end), nothing is timed.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bridge.config import Settings
from bridge.ops import admin_tokens
from bridge.storage import statefiles
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.api import Api, Response
from tests.helpers.api_process import api_process
from tests.helpers.bridge import Bridge
from tests.helpers.brokers import DYNSEC, EMBEDDED, JWT, bridge_on
from tests.helpers.mqtt import MqttClient, can_connect, token_session
from tests.helpers.refresh import RefreshingDevice, provisioned
from tests.helpers.waiting import wait_for

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


@dataclass(frozen=True)
class Operated:
    """A bridge on one broker, its admin API, and an admin token (write and backend, every tenant)."""

    kind: str  # EMBEDDED, JWT or DYNSEC
    bridge: Bridge
    api: Api
    token: str
    token_id: str

    def call(self, method: str, path: str, body: object = None) -> Response:
        return self.api.request(method, path, self.token, body)

    @property
    def dynsec(self) -> bool:
        return self.kind == DYNSEC


@pytest.fixture(params=[EMBEDDED, JWT, DYNSEC])
def operated(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Operated]:
    with bridge_on(request.param, initialised, monkeypatch) as bridge, api_process(bridge.settings) as api:
        made = admin_tokens.create_admin_token(bridge.store, "lifecycle", ["write", "backend"], None, int(time.time()))
        yield Operated(request.param, bridge, api, made.raw, made.token.id)


def echo(conn: MqttClient, device_id: str, payload: bytes) -> None:
    """The session is up: it subscribes to the device's topics and gets its own publish back."""
    topic = f"devices/{device_id}/up"
    assert conn.subscribe(f"devices/{device_id}/#") == [1]
    conn.publish(topic, payload)
    assert conn.next_message()[:2] == (topic, payload)


def connects(bridge: Bridge, device_id: str, token: str | None) -> bool:
    return can_connect(bridge.port, device_id, device_id, token)


def last_event(world: Operated, name: str) -> dict[str, object]:
    found = world.bridge.store.events(event=name, limit=1000)
    assert found, f"no {name} event"
    return found[-1]


def refused_refresh(device: RefreshingDevice) -> ClaimError:
    with device:
        answer = device.send_refresh(device.refresh_payload())
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED, answer
    return answer


def backend_token(world: Operated, device_id: str) -> str | None:
    """A token a backend mints for the device through the API; None in dynsec mode, which holds one token per
    device, mirrored by the bridge, and so mints none here (README: the backend endpoints)."""
    minted = world.call("POST", f"/v1/backend/devices/{device_id}/token", {"ttl_seconds": 600})
    if world.dynsec:
        assert (minted.status, minted.error_code) == (409, "conflict"), minted
        return None
    assert minted.status == 200, minted
    token = minted.json()["token"]
    assert isinstance(token, str) and connects(world.bridge, device_id, token)
    return token


def no_token_for(world: Operated, device_id: str) -> None:
    """A backend gets no token for a revoked device, nor for a reset one before its claim."""
    minted = world.call("POST", f"/v1/backend/devices/{device_id}/token", {"ttl_seconds": 600})
    assert (minted.status, minted.error_code) == (409, "conflict"), minted


# --- revoke, then reinstate ---------------------------------------------------------------------------


def test_api_revoke_ends_the_session_and_reinstate_lets_in_only_new_credentials(operated: Operated) -> None:
    world, bridge = operated, operated.bridge
    device, old = provisioned(bridge)
    kept, kept_creds = provisioned(bridge)
    minted = backend_token(world, device.device_id)
    with token_session(bridge.port, old.mqtt) as live, token_session(bridge.port, kept_creds.mqtt) as other:
        echo(live, device.device_id, b"before")
        echo(other, kept.device_id, b"before")

        revoked = world.call("POST", f"/v1/devices/{device.device_id}/revoke")
        assert (revoked.status, revoked.json()["status"]) == (200, "revoked"), revoked

        assert live.disconnected.wait(30), f"{world.kind}: an API revoke must end the live session"
        echo(other, kept.device_id, b"still here")  # another device's session is untouched
        assert not other.disconnected.is_set()
    assert not connects(bridge, device.device_id, old.mqtt.token)
    assert minted is None or not connects(bridge, device.device_id, minted)
    refused_refresh(device)
    assert last_event(world, "token.refresh_rejected")["reason"] == "device_revoked"
    no_token_for(world, device.device_id)
    assert last_event(world, "device.revoked")["actor"] == f"api:{world.token_id}"

    reinstated = world.call("POST", f"/v1/devices/{device.device_id}/reinstate")
    assert reinstated.status == 200, reinstated
    assert (reinstated.json()["status"], reinstated.json()["credential_generation"]) == ("active", 1)
    assert last_event(world, "device.reinstated")["actor"] == f"api:{world.token_id}"
    # Everything minted before the reinstatement stays refused: the claim's token and the backend's.
    assert not connects(bridge, device.device_id, old.mqtt.token)
    assert minted is None or not connects(bridge, device.device_id, minted)

    # A token refresh gives credentials that work (PROTOCOL.md §10.2: "a token refresh or a re-claim").
    with device:
        refreshed = device.send_refresh(device.refresh_payload())
    assert isinstance(refreshed, ClaimOk), refreshed
    fresh = device.open(refreshed)
    with token_session(bridge.port, fresh.mqtt) as conn:
        echo(conn, device.device_id, b"back, refreshed")
    # So does a re-claim with its own key pair: the same device, no new API key.
    with device:
        again = device.claim(bridge.provision_key)
    assert isinstance(again, ClaimOk) and (again.device_id, again.created) == (device.device_id, False), again
    reclaimed = device.open(again)
    assert reclaimed.api_key == ""
    with token_session(bridge.port, reclaimed.mqtt) as conn:
        echo(conn, device.device_id, b"back, re-claimed")
    assert not connects(bridge, device.device_id, old.mqtt.token)
    assert minted is None or not connects(bridge, device.device_id, minted)
    backend_token(world, device.device_id)  # a backend may mint for it again, and that token connects
    assert connects(bridge, kept.device_id, kept_creds.mqtt.token)


# --- delete -------------------------------------------------------------------------------------------


def test_api_delete_ends_the_session_and_frees_the_hardware_id(operated: Operated) -> None:
    world, bridge = operated, operated.bridge
    device, old = provisioned(bridge)
    minted = backend_token(world, device.device_id)
    with token_session(bridge.port, old.mqtt) as live:
        echo(live, device.device_id, b"before")

        gone = world.call("DELETE", f"/v1/devices/{device.device_id}")
        assert gone.status == 200, gone
        assert gone.json() == {"deleted": device.device_id, "tenant": "default", "hardware_id": device.hardware_id}

        assert live.disconnected.wait(30), f"{world.kind}: an API delete must end the live session"
    assert not connects(bridge, device.device_id, old.mqtt.token)
    assert minted is None or not connects(bridge, device.device_id, minted)
    assert world.call("GET", f"/v1/devices/{device.device_id}").status == 404
    assert last_event(world, "device.deleted")["actor"] == f"api:{world.token_id}"
    refused_refresh(device)
    assert last_event(world, "token.refresh_rejected")["reason"] == "unknown_device"

    # The hardware id claims again, as in the factory (the same key pair, a new request id): a new device.
    with device:
        again = device.claim(bridge.provision_key)
    assert isinstance(again, ClaimOk) and again.created and again.device_id != device.device_id, again
    new = device.open(again)
    assert new.api_key and new.api_key != old.api_key
    row = world.call("GET", f"/v1/devices/{again.device_id}")
    assert (row.status, row.json()["hardware_id"], row.json()["status"]) == (200, device.hardware_id, "active")
    with token_session(bridge.port, new.mqtt) as conn:
        echo(conn, again.device_id, b"a new device")
    assert not connects(bridge, device.device_id, old.mqtt.token)
    assert minted is None or not connects(bridge, device.device_id, minted)


def test_an_api_delete_the_brokers_were_not_told_of_is_finished_by_deleting_again(operated: Operated) -> None:
    """The denylist cannot be written: the device is deleted in the database, and the answer says the brokers were
    not told and what to do (503, not a plain "retry" that would then find nothing). The same DELETE again, once
    the cause is fixed, tells them: the old token is refused."""
    world, bridge = operated, operated.bridge
    if world.dynsec:
        pytest.skip("dynsec mode refuses by deleting the device's dynamic-security client, not by the denylist")
    device, old = provisioned(bridge)
    denylist = statefiles.denylist_file(bridge.settings.data_dir)
    denylist.unlink()
    denylist.mkdir()  # a file cannot be written where a directory is
    try:
        failed = world.call("DELETE", f"/v1/devices/{device.device_id}")
        assert (failed.status, failed.error_code) == (503, "unavailable"), failed
        assert "changed in the database" in failed.json()["error"]["message"]
        assert "denylist" in failed.json()["error"]["message"]
        assert world.call("GET", f"/v1/devices/{device.device_id}").status == 404  # the change itself is made
    finally:
        denylist.rmdir()
    again = world.call("DELETE", f"/v1/devices/{device.device_id}")
    assert again.status == 200, again
    assert again.json() == {"deleted": device.device_id, "tenant": "default", "hardware_id": device.hardware_id}
    assert wait_for(lambda: not connects(bridge, device.device_id, old.mqtt.token), timeout=30)
    assert world.call("DELETE", "/v1/devices/dev_" + "2" * 26).status == 404  # never there: still not found


# --- reset: the wiped device ----------------------------------------------------------------------------------


def test_api_reset_lets_a_wiped_device_claim_with_a_new_key_pair_once(operated: Operated) -> None:
    world, bridge = operated, operated.bridge
    device, old = provisioned(bridge)
    minted = backend_token(world, device.device_id)
    with token_session(bridge.port, old.mqtt) as live:
        echo(live, device.device_id, b"before")

        reset = world.call("POST", f"/v1/devices/{device.device_id}/reset")
        assert reset.status == 200, reset
        assert (reset.json()["reset_pending"], reset.json()["credential_generation"]) == (True, 1)

        assert live.disconnected.wait(30), f"{world.kind}: an API reset must end the live session"
    assert last_event(world, "device.reset")["actor"] == f"api:{world.token_id}"
    assert not connects(bridge, device.device_id, old.mqtt.token)
    assert minted is None or not connects(bridge, device.device_id, minted)
    refused_refresh(device)  # the old key pair may not refresh meanwhile
    assert last_event(world, "token.refresh_rejected")["reason"] == "device_reset"
    no_token_for(world, device.device_id)

    # The device was wiped: the same hardware id, a new key pair, new request ids.
    wiped = RefreshingDevice(bridge, hardware_id=device.hardware_id)
    with wiped:
        new = wiped.provision()
    assert wiped.device_id == device.device_id
    assert new.api_key and new.api_key != old.api_key
    assert last_event(world, "device.reprovisioned")["device_id"] == device.device_id
    row = world.call("GET", f"/v1/devices/{device.device_id}").json()
    assert (row["reset_pending"], row["public_key"]) == (False, wiped.public_key_b64)
    with token_session(bridge.port, new.mqtt) as conn:
        echo(conn, device.device_id, b"after the reset")
    with wiped:  # the new key pair refreshes
        refreshed = wiped.send_refresh(wiped.refresh_payload())
    assert isinstance(refreshed, ClaimOk), refreshed
    # The newest token: dynsec mode holds one per device, so a refresh there replaces the claim's (README).
    newest = wiped.open(refreshed)

    # What the device held before stays refused: its token, the backend's, its key pair, its API key.
    assert not connects(bridge, device.device_id, old.mqtt.token)
    assert minted is None or not connects(bridge, device.device_id, minted)
    refused_refresh(device)
    verify = "/v1/backend/api-keys/verify"
    assert world.call("POST", verify, {"api_key": old.api_key}).json() == {"valid": False}
    assert world.call("POST", verify, {"api_key": new.api_key}).json() == {
        "valid": True,
        "device_id": device.device_id,
        "tenant": "default",
    }
    backend_token(world, device.device_id)  # claimed again: a backend may mint for it, and that token connects

    # Once: yet another key pair is a device_exists again, and so is the old one.
    for other in (RefreshingDevice(bridge, hardware_id=device.hardware_id), device):
        with other:
            answer = other.claim(bridge.provision_key)
        assert isinstance(answer, ClaimError) and answer.code is ErrorCode.DEVICE_EXISTS, answer
    with token_session(bridge.port, newest.mqtt) as conn:  # the refused claims took nothing from the device
        echo(conn, device.device_id, b"still mine")
