"""`provbridge device revoke`: a device loses everything it was given, at once.

    database      the device row becomes `revoked`: re-claims and token refreshes are refused
                  (permission_denied; reason `device_revoked` in the ops events)
    denylist      <data_dir>/denylist.json lists the device until every token it may hold has expired;
                  the embedded broker refuses its CONNECT and ends its live sessions within about a
                  second (refusing their packets until then)
    external      Mosquitto ("dynsec" mode) cannot read the denylist: its side is the dynamic-security plugin
                  (below); in "jwt" mode its provbridge_jwt plugin reads it and ends the live session

The denylist is derived from the database (every device revoked within the longest token lifetime),
not edited in place: each write is complete, so a lost or stale file is repaired by the next revocation
or bridge start (`publish_denylist`).
"""

import time

from bridge.config import TOKEN_TTL_CAP_SECONDS, Settings
from bridge.errors import MirrorError
from bridge.mosquitto.dynsec import revoke_on_mosquitto
from bridge.storage import statefiles
from bridge.storage.records import Device
from bridge.storage.store import Store


def denylist_entries(store: Store, now: int) -> dict[str, int]:
    """Device id -> until when its tokens must be refused.

    A token lives at most TOKEN_TTL_CAP_SECONDS, and none is minted for a revoked device (the revoking
    write waits for any claim or refresh transaction in progress), so the cap after revocation covers
    every token it may still hold, whatever token.ttl_seconds was when they were minted.
    """
    revoked = store.revoked_devices(since=now - TOKEN_TTL_CAP_SECONDS)
    return {r.device_id: r.revoked_at + TOKEN_TTL_CAP_SECONDS for r in revoked}


def publish_denylist(settings: Settings, store: Store, now: int | None = None) -> dict[str, int]:
    """Rewrite denylist.json from the database (expired entries fall out); returns what was written."""
    now = int(time.time()) if now is None else now
    with statefiles.denylist_update(settings.data_dir):
        entries = denylist_entries(store, now)
        statefiles.write_denylist(settings.data_dir, entries)
    return entries


def revoke_device(settings: Settings, store: Store, device_id: str, now: int | None = None) -> Device:
    """Revoke a device everywhere this process can reach; returns its updated row (NotFound if unknown).

    Revoking an already revoked device rewrites the denylist again (and extends it from now), so
    re-running the command repairs a denylist that a crash left behind.
    """
    now = int(time.time()) if now is None else now
    device = store.revoke_device(device_id, now)
    publish_denylist(settings, store, now)
    # In jwt mode the provbridge_jwt plugin reads the denylist and kicks the session itself.
    if settings.broker.mode == "external" and settings.broker.dynsec and settings.broker.mosquitto_auth == "dynsec":
        try:
            revoke_on_mosquitto(settings, device_id)  # disables the dynsec client: its live session is kicked
        except MirrorError as exc:
            raise MirrorError(
                f"{device_id} is revoked in the database, but Mosquitto did not confirm ({exc}); "
                f"run `provbridge device revoke {device_id}` again once the broker is reachable"
            ) from exc
    return device
