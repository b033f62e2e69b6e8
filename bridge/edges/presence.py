"""Device presence: what the brokers say of device connections, written to the database in batches.

The embedded broker calls `PresenceRecorder.record` for every device session that starts or ends
(`ProvbridgeBroker.on_presence`); on Mosquitto the provbridge_jwt plugin publishes `online` / `offline` on
`{prefix}/presence/{device_id}` and the bridge takes it (`bridge.edges.external`). Either way firmware changes
nothing. `record` only queues: a thread gathers what came in for `INTERVAL_SECONDS`, keeps the last word per device, and
writes it `BATCH` devices a transaction with `PAUSE_SECONDS` between transactions, so a reconnect storm of 10,000
devices costs the claim path's write lock a few short transactions, not 20,000 (docs/BENCHMARKS.md, "Presence
during a reconnect storm").
"""

import logging
import queue
import threading
import time

from bridge.storage.store import Store

log = logging.getLogger("provbridge.presence")

BATCH = 1000
INTERVAL_SECONDS = 1.0
PAUSE_SECONDS = 0.005  # between the transactions of one large backlog, so claims take the lock


class PresenceRecorder:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[tuple[str, bool, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)
        self._thread.start()

    def record(self, device_id: str, online: bool) -> None:
        """A device connected (online) or went away. Never blocks: safe on an event loop."""
        self._queue.put((device_id, online, int(time.time())))

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            time.sleep(INTERVAL_SECONDS)  # let a storm gather into this batch
            latest: dict[str, tuple[str, bool, int]] = {first[0]: first}
            while True:
                try:
                    change = self._queue.get_nowait()
                except queue.Empty:
                    break
                if change is None:
                    stopping = True
                    break
                latest[change[0]] = change
            self._write(list(latest.values()))

    def _write(self, changes: list[tuple[str, bool, int]]) -> None:
        for start in range(0, len(changes), BATCH):
            try:
                self.store.record_presence(changes[start : start + BATCH])
            except Exception as exc:  # bookkeeping: a failed batch is logged, the next ones go on
                log.warning("presence of %d devices not recorded: %s", len(changes[start : start + BATCH]), exc)
            time.sleep(PAUSE_SECONDS)
