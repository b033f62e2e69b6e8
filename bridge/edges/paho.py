"""The edge on an external broker beside the dynamic-security mirror (`broker.mosquitto_auth = "dynsec"`,
the small-fleet opt-in): paho's network thread takes messages, worker threads do the crypto and the
database (`ClaimHandlers.handle`).

The mirror's commands travel on this connection and a claim waits for their answer inside its
transaction (bridge/mosquitto/janitor.py rests on that), so the claim work stays in this process. The
default edge (`bridge.edges.external`) moves it to a claim-worker process instead. What both share:
`bridge.edges.pahoedge`.
"""

import queue
import threading
import time

from bridge.edges.core import BridgeCore, ClaimHandlers
from bridge.edges.pahoedge import PahoEdge, Request
from bridge.edges.sessions import Shard
from provwire.models import Event


class BridgeService(PahoEdge):
    def __init__(self, core: BridgeCore, handlers: ClaimHandlers, shard: Shard | None = None) -> None:
        super().__init__(core, shard)
        self.handlers = handlers
        # Unbounded: the core's in-flight bound decides what is refused, before anything is queued.
        self._queue: queue.Queue[Request | list[Event] | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)

    def start(self) -> None:
        for n in range(self.settings.claims.workers):
            worker = threading.Thread(target=self._work, name=f"claim-worker-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.handlers.start_purge(self._stopping)
        self._client.connect_async(**self._connect_arguments())
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._serving.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking claims, finish those queued, say offline, disconnect."""
        self._stopping.set()
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._serving.is_set() and self.shard.owns_status(self.settings):
            info = self._publish(self.core.status(online=False))
            info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()

    def _dispatch(self, request: Request) -> None:
        self._queue.put(request)

    def _record_events(self, events: list[Event]) -> None:
        self._queue.put(events)  # stored by a worker: no SQLite on the network thread

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, list):
                self.handlers.record_events(item)
                continue
            try:
                self._answer(item, self.core.publishes(self.handlers.handle(item.topic, item.payload)))
            finally:
                self.core.release()
