"""A dynamic-security janitor that is safe when several bridge processes share one Mosquitto.

`DynsecMirror` keeps each mirrored token's expiry in memory and removes the device once it passed.
With one bridge process that memory is exact. With N processes it is not: process A may remember
that device X's token expires at T while process B re-granted X (a re-claim, a refresh) until T'
> T; at T, A's janitor would delete X and lock the device out of the token it was just given.

So a deletion here is decided again, and done, under the database write lock: every grant, in
every process, is mirrored inside its claim's IMMEDIATE transaction (`bridge.claims.credentials.
issue_credentials`), so while the janitor holds that lock no grant is in flight anywhere. Under
it, the janitor reads each candidate's current expiry back from Mosquitto (`getClient`: the
`textdescription` every grant writes), deletes those still expired, and learns the newer expiry of
the others. Every device stays known to at least one process: the one that granted it last, or,
after restarts, every process (each reads all expiries back from Mosquitto when it starts).

Orphans. A claim mirrors its new device's token before its transaction commits. A bridge killed in
between (or a grant Mosquitto applied after the claim gave up on it and rolled back) leaves a device
client for a device id the database never got. Its token was never sent to anyone, and nobody
without the token key can make it (Mosquitto keeps only a PBKDF2 hash), so it is harmless; but it
would stay until that token's expiry and cost Mosquitto a little on every command. So the first
pass after a start, when the orphans of a crash exist, deletes every device client whose device
has no row, deciding under the write lock too: no claim anywhere is then between its grant and its
commit. (One database per Mosquitto: a device client is the database's, or nobody's.) A crash leaves
at most one orphan per claim in flight; far more than that means the bridge runs on another database
than the one that provisioned the fleet (restored from an old backup, the wrong data dir), and
deleting them would lock that fleet out: then nothing is deleted, and the log says why.
"""

import logging
import time
from typing import Any

from bridge.config import Settings
from bridge.mosquitto.dynsec import NOT_FOUND, DynsecMirror, check, parse_expiry, revoke_commands
from bridge.storage.store import Store

log = logging.getLogger("provbridge.dynsec")

# Devices decided per transaction: the write lock is held for two round trips to Mosquitto per batch.
SWEEP_BATCH = 100
# More orphans than this at a start is not a crash's leftovers but a database that is not the fleet's.
MAX_ORPHANS = 100


class SharedDynsecMirror(DynsecMirror):
    def __init__(self, settings: Settings, store: Store) -> None:
        super().__init__(settings)
        self._store = store
        self._orphans_checked = False

    def janitor_pass(self) -> int:
        """The first pass after a start removes the orphans (module docstring); every pass sweeps."""
        if not self._orphans_checked:
            if not self._loaded:
                self.load()
            orphans = self.remove_orphans()
            if orphans:
                log.info("janitor removed %d device client(s) whose claim never committed", orphans)
            self._orphans_checked = True
        return self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """One janitor pass: disable and delete every device client whose token expired. Returns how many."""
        if not self._loaded:
            self.load()
        now = time.time() if now is None else now
        with self._lock:
            candidates = [device for device, expires_at in self._expiry.items() if expires_at <= now]
        removed = 0
        for start in range(0, len(candidates), SWEEP_BATCH):
            if self._stop.is_set():
                break
            removed += self._sweep_batch(candidates[start : start + SWEEP_BATCH], now)
        return removed

    def _sweep_batch(self, devices: list[str], now: float) -> int:
        # Memory is updated under the lock too: a grant that follows must find (and overwrite) our update.
        with self._store.transaction():  # no grant is in flight in any bridge process while we hold it
            current = self._expiries_at_broker(devices)
            expired = [d for d in devices if (expires_at := current[d]) is not None and expires_at <= now]
            if expired:
                for answer in self._call([command for d in expired for command in revoke_commands(d)]):
                    check(answer, NOT_FOUND)
            with self._lock:
                for device_id in devices:
                    renewed = current[device_id]
                    if renewed is None or device_id in expired:
                        self._expiry.pop(device_id, None)  # deleted now, or already gone from Mosquitto
                    else:
                        self._expiry[device_id] = renewed  # re-granted by another process since
        return len(expired)

    def remove_orphans(self) -> int:
        """Delete the device clients (and roles) Mosquitto holds for devices the database does not have,
        among those `load` found. Returns how many."""
        with self._lock:
            known = sorted(self._expiry)
        candidates = [device_id for device_id in known if self._store.find_device(device_id) is None]
        if len(candidates) > MAX_ORPHANS:
            log.error(
                "%d of the %d device clients in Mosquitto have no row in the database: not removing them. A crash "
                "leaves a few; this many means this database is not the one that provisioned them (a restored "
                "backup, another data dir?). Start the bridge on the fleet's database.",
                len(candidates),
                len(known),
            )
            return 0
        removed = 0
        for start in range(0, len(candidates), SWEEP_BATCH):
            if self._stop.is_set():
                break
            batch = candidates[start : start + SWEEP_BATCH]
            with self._store.transaction() as tx:  # no claim is between its grant and its commit meanwhile
                orphans = [device_id for device_id in batch if tx.device_by_id(device_id) is None]
                if orphans:
                    for answer in self._call([command for d in orphans for command in revoke_commands(d)]):
                        check(answer, NOT_FOUND)
                    with self._lock:
                        for device_id in orphans:
                            self._expiry.pop(device_id, None)
            removed += len(orphans)
        return removed

    def _expiries_at_broker(self, devices: list[str]) -> dict[str, int | None]:
        """Device id -> the expiry Mosquitto holds for it now (None: no such device client)."""
        answers = self._call([{"command": "getClient", "username": d} for d in devices])
        current: dict[str, int | None] = {}
        for device_id, answer in zip(devices, answers, strict=True):
            check(answer, NOT_FOUND)
            client: dict[str, Any] = answer.get("data", {}).get("client", {})
            current[device_id] = parse_expiry(client.get("textdescription")) if client else None
        return current
