"""An amqtt broker (ours or stock) on its own event loop thread, so tests can block on clients with timeouts."""

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from broker.server import bound_port

TIMEOUT = 15.0


class BrokerThread:
    """The broker `start()` returns, run on a loop of its own thread until `close` (or the `with` block ends),
    which calls `stop(broker)`. `port` is the port it bound (ask for 0 to get a free one)."""

    def __init__(
        self,
        start: Callable[[], Coroutine[Any, Any, Any]],
        stop: Callable[[Any], Coroutine[Any, Any, None]],
    ) -> None:
        self._stop = stop
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="broker", daemon=True)
        self.thread.start()
        self.broker = asyncio.run_coroutine_threadsafe(start(), self.loop).result(TIMEOUT)
        self.port = bound_port(self.broker)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(self.broker), self.loop).result(TIMEOUT)
        asyncio.run_coroutine_threadsafe(self._drain(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    def __enter__(self) -> "BrokerThread":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @staticmethod
    async def _drain() -> None:
        """End what shutdown leaves running, as asyncio.run would at exit.

        Connection tasks wind down on their own within a few loop turns; only stock amqtt leaves
        one open for good: the orphan of a session it dropped without closing its connection.
        """
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}
        if leftovers:
            _, pending = await asyncio.wait(leftovers, timeout=0.25)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
