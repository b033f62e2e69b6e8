"""The dynamic-security janitor's start-up pass over orphans, against a real Mosquitto (dynsec mode)."""

import logging
import secrets
import time

import pytest

from bridge.config import Settings
from bridge.mosquitto.dynsec import admin_channel, device_client, device_role_for
from bridge.mosquitto.janitor import MAX_ORPHANS, SharedDynsecMirror
from bridge.storage.store import Store
from bridge.tokens import TokenGrant
from tests.helpers.mosquitto import external_settings, mosquitto_for

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends

BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def fake_device_id() -> str:
    return "dev_" + "".join(secrets.choice(BASE32) for _ in range(26))


def test_far_more_orphans_than_a_crash_leaves_are_kept_and_the_log_says_why(
    initialised: tuple[Settings, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A bridge started on the wrong database (a restored backup, another data dir) must not delete the fleet."""
    settings = external_settings(initialised[0], mosquitto_auth="dynsec")
    with mosquitto_for(settings), admin_channel(settings) as channel:
        fleet = [fake_device_id() for _ in range(MAX_ORPHANS + 1)]  # devices this database never had
        grant = TokenGrant("not-a-token", "jti", int(time.time()) + 3600, ["devices/x/#"], ["devices/x/#"])
        commands = []
        for device_id in fleet:
            own = TokenGrant(grant.token, grant.jti, grant.expires_at, [f"devices/{device_id}/#"], [])
            commands += [
                {"command": "createRole", **device_role_for(device_id, own)},
                {"command": "createClient", **device_client(device_id, own)},
            ]
        assert all("error" not in answer for answer in channel.call(commands))
        store = Store(settings.database)
        try:
            mirror = SharedDynsecMirror(settings, store)
            mirror.use(channel)
            with caplog.at_level(logging.ERROR, logger="provbridge.dynsec"):
                assert mirror.load() == len(fleet)
                assert mirror.remove_orphans() == 0
            (answer,) = channel.call([{"command": "listClients"}])
            assert set(fleet) <= set(answer["data"]["clients"])  # all still there
            assert f"{len(fleet)} of the {len(fleet)} device clients in Mosquitto have no row" in caplog.text
            # A crash's few orphans are still removed: forget all but MAX_ORPHANS of them.
            for answer in channel.call([{"command": "deleteClient", "username": fleet[0]}]):
                assert "error" not in answer
            fresh = SharedDynsecMirror(settings, store)
            fresh.use(channel)
            fresh.load()
            assert fresh.remove_orphans() == MAX_ORPHANS
        finally:
            store.close()
