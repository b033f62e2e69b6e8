"""Issue 9, item 5: no child process outlives `provbridge serve`, whatever ends it.

`serve` runs as a real subprocess on loopback; its children (the claim worker of the embedded broker,
the `--processes` bridges) are real processes found in /proc. A child is made unable to act on its
own: the claim worker blocked on the database's writer lock, which the test holds, or a bridge process
frozen with SIGSTOP (as one whose GIL a long step holds: no thread of it can run). Then `serve` is
killed with SIGKILL, or stopped with SIGTERM, and every child must be gone. A zombie counts as gone:
once `serve` is dead its children are re-parented, and who reaps them is not ours to say.
"""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bridge.config import Settings
from bridge.edges.lifeline import ORPHANED_EXIT_STATUS
from bridge.edges.workerlink import STOP_GRACE_SECONDS
from bridge.storage import keyfiles
from bridge.storage.filelock import locked
from bridge.storage.store import Store
from provwire import topics
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device
from tests.helpers.mosquitto import external_settings, mosquitto_for
from tests.helpers.processes import ServeProcesses, alive
from tests.helpers.waiting import wait_for

GONE_TIMEOUT = 10.0  # generous: the kernel ends a child at once when its parent dies
STOP_MARGIN = 5.0  # beyond the grace period: saying offline and closing the broker after the worker is gone
WORKER_RE = re.compile(r"claim worker running \(pid (\d+)\)")


# --- processes, as /proc shows them -------------------------------------------------------------


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None  # gone meanwhile


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(root: int) -> dict[int, bytes]:
    """Every process below `root` (children, theirs, ...), with its command line."""
    parents = {int(p.name): _parent_of(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    found: dict[int, bytes] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = _cmdline(pid)
                frontier.append(pid)
    return found


def survivors(processes: dict[int, bytes]) -> dict[int, bytes]:
    return {pid: cmd for pid, cmd in processes.items() if alive(pid)}


def kill_leftovers(processes: dict[int, bytes]) -> None:
    """SIGKILL what survived of `processes` (children of our `serve`), when its pid still runs the same command."""
    for pid, cmd in survivors(processes).items():
        if _cmdline(pid) == cmd:
            os.kill(pid, signal.SIGKILL)


def waits_for_lock(pid: int, lock_file: Path) -> bool:
    """Whether `pid` is blocked on an flock of `lock_file` (a `->` line of /proc/locks)."""
    st = os.stat(lock_file)
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:3] == ["->", "FLOCK"] and fields[5:7] == [str(pid), file_id]:
            return True
    return False


# --- the embedded broker's claim worker, blocked in a claim -------------------------------------


def writer_lock_file(settings: Settings) -> Path:
    """The lock every writer of the database takes before its transaction (`bridge.storage.store.Store`)."""
    return settings.database_file.with_name(settings.database_file.name + "-writer.lock")


@contextmanager
def blocked_claim_worker(initialised: tuple[Settings, str]) -> Iterator[tuple[ServeProcesses, int, dict[int, bytes]]]:
    """`provbridge serve` (embedded broker), its claim worker blocked in a claim on the writer lock this
    test holds. Yields serve, the worker's pid and every child of serve; none of them survives the block."""
    settings, first_key = initialised
    serve = ServeProcesses(settings, 1)  # one process: `serve` itself, with the broker and its worker
    with ExitStack() as stack:
        stack.callback(serve.stop)
        serve.start()
        assert serve.process is not None
        worker = int(WORKER_RE.findall(serve.log())[-1])
        children = descendants(serve.process.pid)
        assert worker in children, (worker, children)
        store = Store(settings.database)
        stack.callback(store.close)
        stack.enter_context(locked(writer_lock_file(settings)))  # released after the kill below: no survivor writes
        stack.callback(kill_leftovers, children)  # only once the test failed
        device = stack.enter_context(Device(Bridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key)))
        device.conn.publish(
            topics.claim_topic(settings.topic_prefix, device.client_id), device.claim_payload(first_key)
        )
        assert wait_for(lambda: waits_for_lock(worker, writer_lock_file(settings)), timeout=30), serve.log()[-3000:]
        yield serve, worker, children


def test_sigkill_of_serve_kills_its_claim_worker_blocked_in_a_claim(initialised: tuple[Settings, str]) -> None:
    with blocked_claim_worker(initialised) as (serve, worker, children):
        assert serve.process is not None
        os.kill(serve.process.pid, signal.SIGKILL)  # our own child, by its pid
        serve.process.wait(30)
        serve.process = None
        # Before the fix the worker, in a session of its own, waited on the lock for as long as the test held it.
        assert wait_for(lambda: not survivors(children), timeout=GONE_TIMEOUT), (worker, survivors(children))


def test_sigterm_of_serve_ends_its_blocked_claim_worker_within_the_grace_period(
    initialised: tuple[Settings, str],
) -> None:
    with blocked_claim_worker(initialised) as (serve, worker, children):
        assert serve.process is not None
        deadline = time.monotonic() + STOP_GRACE_SECONDS + STOP_MARGIN
        serve.process.terminate()
        try:
            status = serve.process.wait(deadline - time.monotonic())
        except subprocess.TimeoutExpired:
            status = None
        assert status == 0, f"serve did not exit within {STOP_GRACE_SECONDS} s + {STOP_MARGIN} s\n{serve.log()[-3000:]}"
        serve.process = None
        assert not survivors(children), survivors(children)
        assert f"the claim worker (pid {worker}) did not stop in time; killing it" in serve.log()
        # Reaped by serve, not left to init: only a wait gives serve the status it logs.
        assert f"the claim worker (pid {worker}) ended with status -{signal.SIGKILL.value}" in serve.log()


# --- `serve --processes 2`: the bridge processes, frozen ----------------------------------------


def test_sigkill_of_serve_processes_kills_its_frozen_bridge_processes(initialised: tuple[Settings, str]) -> None:
    """A bridge whose GIL a long step holds cannot run its parent-watch thread: SIGSTOP stands for that."""
    settings = external_settings(initialised[0])
    serve = ServeProcesses(settings, 2)
    with mosquitto_for(settings), ExitStack() as stack:
        stack.callback(serve.stop)
        serve.start()
        assert serve.process is not None
        children = descendants(serve.process.pid)  # the bridges and multiprocessing's resource tracker
        stack.callback(kill_leftovers, children)  # only once the test failed (SIGKILL ends a stopped process)
        bridges = set(serve.children().values())
        assert len(bridges) == 2 and bridges <= set(children), (bridges, children)
        for pid in bridges:
            os.kill(pid, signal.SIGSTOP)  # pids the supervisor reported starting, ours
        os.kill(serve.process.pid, signal.SIGKILL)
        serve.process.wait(30)
        serve.process = None
        assert wait_for(lambda: not survivors(children), timeout=GONE_TIMEOUT), survivors(children)


# --- the race the parent-death signal leaves open ----------------------------------------------


def test_a_child_whose_parent_died_before_it_armed_the_signal_exits_at_once() -> None:
    """A parent dead before the child's `prctl` would never signal it: the child sees that its parent is
    not the one that started it (here: it is told to expect another pid than ours) and exits."""
    code = f"from bridge.edges.lifeline import die_with_parent; die_with_parent({os.getpid() + 1}); print('ran on')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert (done.returncode, done.stdout) == (ORPHANED_EXIT_STATUS, b""), done
