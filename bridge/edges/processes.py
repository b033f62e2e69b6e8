"""`provbridge serve --processes N`: N bridge processes share an external broker's claims.

One Python process does the claims' crypto on one core at a time (the GIL), so more cores need more
processes. Each runs `bridge.edges.serve.serve` with its `Shard`: client id `{broker.client_id}-{i}`, a
persistent session on the shared subscriptions `$share/{broker.share_group}/...`, its own
dynamic-security channel and janitor (`bridge.mosquitto.janitor` makes the janitors safe together). SQLite's
IMMEDIATE transactions keep every claim atomic across processes as they do across threads.

This parent process only supervises: it restarts a process that exits (Mosquitto keeps queueing a
shared subscription's share for a disconnected member, so a dead process must come back, and then
answers what waited for it), and on SIGINT/SIGTERM it stops them all (SIGTERM, then SIGKILL after
`STOP_TIMEOUT_SECONDS`). If this process dies, whatever kills it, the kernel kills them with it
(`bridge.edges.lifeline`): what they had not answered waits in their broker sessions, as after any crash.
The retained status is process 0's (`Shard.owns_status`; on several hosts, the one without `broker.host_id`):
while process 0 restarts it says offline;
while another one restarts, the claims handed to it wait until it is back.
"""

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from bridge import logs
from bridge.config import Settings
from bridge.edges import lifeline
from bridge.edges.serve import serve
from bridge.edges.sessions import Shard, check_processes
from bridge.tls import certificates as tls

log = logging.getLogger("provbridge.processes")

RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 30.0
# A bridge asked to stop has this long before it is killed: its own stop takes up to 10 s for its claims
# (BridgeService.stop) and 2 s for the offline status.
STOP_TIMEOUT_SECONDS = 20.0


def run_processes(settings: Settings, count: int) -> None:
    """Supervise `count` bridge processes until SIGINT or SIGTERM, then stop them all."""
    check_processes(settings, count)
    tls.resolve(settings)  # a configuration error shows here, once, rather than in N restarting processes
    wake_read, wake_write = os.pipe()
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        os.write(wake_write, b"x")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    supervisor = _Supervisor(settings, count)
    try:
        supervisor.start_all()
        while not stopping.is_set():
            exited = wait([wake_read, *supervisor.sentinels()], timeout=supervisor.next_restart_in())
            supervisor.reap([s for s in exited if s != wake_read])
            if not stopping.is_set():
                supervisor.restart_due()
        log.info("stopping %d bridge processes", count)
    finally:
        supervisor.stop_all()
        os.close(wake_read)
        os.close(wake_write)


class _Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._context = multiprocessing.get_context("spawn")  # no inherited threads or sockets
        self._running: dict[int, BaseProcess] = {}
        self._started: dict[int, float] = {}
        self._delay: dict[int, float] = dict.fromkeys(range(count), RESTART_DELAY_SECONDS)
        self._due: dict[int, float] = {}  # index -> when to restart it

    def start_all(self) -> None:
        for index in range(self.count):
            self._start(index)

    def _start(self, index: int) -> None:
        # Always on the main thread (`run_processes`, restarts included), which lasts as long as this
        # process: a child's parent-death signal fires when the thread that started it ends (bridge.edges.lifeline).
        process = self._context.Process(
            target=run_child, args=(self.settings, index, self.count, os.getpid()), name=f"bridge-{index}", daemon=False
        )
        process.start()
        self._running[index] = process
        self._started[index] = time.monotonic()
        log.info("started bridge process %d of %d (pid %s)", index, self.count, process.pid)

    def sentinels(self) -> list[int]:
        return [process.sentinel for process in self._running.values()]

    def reap(self, sentinels: list[object]) -> None:
        for index, process in list(self._running.items()):
            if process.sentinel not in sentinels:
                continue
            process.join()
            del self._running[index]
            ran = time.monotonic() - self._started[index]
            # A process that keeps dying at once is restarted ever more slowly; one that ran a while, at once.
            delay = RESTART_DELAY_SECONDS if ran > MAX_RESTART_DELAY_SECONDS else self._delay[index]
            self._delay[index] = min(delay * 2, MAX_RESTART_DELAY_SECONDS)
            self._due[index] = time.monotonic() + delay
            log.warning("bridge process %d exited with %s; restarting it in %.0f s", index, process.exitcode, delay)

    def next_restart_in(self) -> float | None:
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - time.monotonic())

    def restart_due(self) -> None:
        now = time.monotonic()
        for index, due in list(self._due.items()):
            if due <= now:
                del self._due[index]
                self._start(index)

    def stop_all(self) -> None:
        for process in self._running.values():
            process.terminate()  # SIGTERM: each stops cleanly (finishes its claims, disconnects)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for process in self._running.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.warning("bridge process %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
        self._running.clear()


def run_child(settings: Settings, index: int, count: int, parent_pid: int) -> None:
    """A bridge process: `serve` as shard `index` of `count`, until SIGTERM or its parent (`parent_pid`) is gone."""
    armed = lifeline.die_with_parent(parent_pid)
    logs.configure(settings.log_level, settings.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ProcessTag(index))
    parent = multiprocessing.parent_process()
    if not armed and parent is not None:
        # No parent-death signal on this platform: a thread watches the parent instead (it cannot run
        # while a long step holds the GIL, hence the signal where there is one).
        threading.Thread(target=_stop_with, args=(parent,), name="parent-watch", daemon=True).start()
    asyncio.run(serve(settings, shard=Shard(index, count)))


class _ProcessTag(logging.Filter):
    """Names the process in every line (`provbridge.claims#1`): N processes share one output."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.tag = f"#{index}"

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = f"{record.name}{self.tag}"
        return True


def _stop_with(parent: BaseProcess) -> None:
    wait([parent.sentinel])  # ready once the parent has exited, however it ended
    os.kill(os.getpid(), signal.SIGTERM)  # serve's handler: a clean stop
