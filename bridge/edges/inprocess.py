"""The in-process edge of the bridge: inside the embedded amqtt broker, without an MQTT client.

A paho client on loopback would cost a second trip through amqtt's protocol code for every claim
and every answer, and amqtt is the most expensive part of the embedded setup. Here the broker hands
claims and token refreshes to the bridge after its PUBLISH ACL check (`ProvbridgeBroker.
subscribe_in_process`), on its event loop; the blocking handlers (SQLite, crypto) run in the
claim-worker process (`bridge.edges.workerlink`; `bridge.edges.claimworker` says why a process); answers, events and the
retained status go back through the broker's broadcast path (`publish_in_process`), where each
receiving session is checked against the RECEIVE ACL as before.

On the wire nothing changes: answers and events reach subscribers as the paho bridge's QoS 1,
non-retained publishes did, the status is retained, `rate_limited` answers the claims beyond
`claims.max_in_flight`. A message handed to the worker stays there until its answer is back, across a
restart of the worker (`bridge.edges.workerlink`).
"""

from bridge.config import Settings
from bridge.edges.core import BridgeCore, Publish
from bridge.edges.workerlink import WorkerLink
from bridge.metrics import counters
from broker.server import ProvbridgeBroker


class InProcessBridge:
    def __init__(self, settings: Settings, broker: ProvbridgeBroker) -> None:
        self.core = BridgeCore(settings)
        self.broker = broker
        self.worker = WorkerLink(settings, self._answered)
        self._stopping = False
        self._taking = False  # subscribed to the claim topics (take_claims)

    @property
    def worker_pid(self) -> int | None:
        """The claim-worker process, while one is running."""
        return self.worker.worker_pid

    def take_claims(self) -> None:
        """Take claims from now on: until `start` has a worker for them they wait in the worker link.

        `serve` calls it before the broker listens: a claim published between the broker's first
        connection and the worker's start would otherwise be acknowledged and reach no subscriber.
        """
        if not self._taking:
            self.broker.subscribe_in_process(self.core.filters, self._on_message)
            self._taking = True

    async def start(self) -> None:
        """Take claims, start the claim worker, hand it those taken so far, say online. On the broker's loop."""
        self.take_claims()
        try:
            await self.worker.start()
            await self._retain(self.core.status(online=True))
            counters.BROKER_CONNECTED.set(1)  # the bridge is inside the broker: connected while it runs
        except BaseException:  # what was taken is answered by nobody: the broker stops with this start
            self._stopping = True
            self.worker.abandon()
            await self.worker.stop()  # no worker may outlive a start that did not finish
            raise

    async def stop(self) -> None:
        """Stop taking claims, let the worker answer those it has, stop it, say offline.

        The worker is gone within its grace period: one still busy then is killed and reaped.
        """
        self._stopping = True
        self.broker.unsubscribe_in_process()
        counters.BROKER_CONNECTED.set(0)  # taking no more claims: not ready, from now on
        await self.worker.stop()
        await self._retain(self.core.status(online=False))

    # --- event loop: must not block --------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> float:
        """Take one message; return how long the broker should wait before reading more from its sender."""
        if self._stopping:
            return 0.0
        refused = self.core.screen(topic, payload)
        if refused is not None:  # answered here: a flood from one client id never reaches the worker's queue
            self._send(self.core.publishes(refused.outcome))
            self.worker.record_events(refused.outcome.events)  # lost with a restarting worker: one event
            # Its sender is read again when its budget has a token, or after `rate_client_pause_seconds`: a
            # pause of seconds would hold up its PINGREQs and PUBACKs too.
            return min(refused.wait, self.core.settings.claims.rate_client_pause_seconds)
        if not self.core.admit():
            self._send(self.core.publishes(self.core.overloaded(topic, payload)))
            return 0.0
        self.worker.submit(topic, payload)
        return 0.0

    def _answered(self, _seq: int, publishes: list[Publish]) -> None:
        try:
            self._send(publishes)
        finally:
            self.core.release()

    def _send(self, publishes: list[Publish]) -> None:
        for publish in publishes:
            self.broker.publish_in_process(publish.topic, publish.payload)

    async def _retain(self, publish: Publish) -> None:
        await self.broker.retain_in_process(publish.topic, publish.payload)
