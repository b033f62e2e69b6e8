"""How long a CSV allowlist import holds the write lock (issue 12), transaction by transaction:

    python -m bench.import_lock [--rows 100000] [--rows 1000000] [--batch N] [--json FILE]

A real Store on a temporary directory, a tenant with `--devices` devices, then `allowlist.import_csv` of a
`--rows`-line file. Every write transaction is timed from the moment it holds the Store's writer lock (the one
claims queue on) to its release, COMMIT included, and attributed to the Store method that opened it (stage_entries,
finish_import, ...). Meanwhile a probe process does what the claim worker and the dashboard would:
a one-row write every 5 ms (its wait for the lock plus its own hold) and a first page of the allowlist every 50 ms.
Prints p50/p99/max per kind of transaction and per probe.

The figures are this host's, with whatever else runs on it: compare runs made together, not across days.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import latency_summary, log
from bridge.ops import allowlist
from bridge.storage import store as store_module
from bridge.storage.store import Store

STORE_FILE = store_module.__file__
# Frames between a Store method and the writer lock: the transaction plumbing, not what asked for the write.
PLUMBING = frozenset({"transaction", "__enter__", "__exit__", "batch"})
PROBE_WRITE_SECONDS = 0.005
PROBE_LIST_SECONDS = 0.05
PROBE_START_SECONDS = 1.0  # the probe process's interpreter and Store, up before the import starts


def _caller(frame: FrameType | None) -> str:
    """The Store method that opened the transaction whose lock is being taken."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename == STORE_FILE and code.co_name not in PLUMBING:
            return code.co_name
        frame = frame.f_back
    return "other"


class TimedStore(Store):
    """A Store that records how long each write transaction holds the writer lock, and which method opened it."""

    def __init__(self, path: Path) -> None:
        self.holds: list[tuple[str, float, float]] = []  # (method, wall seconds, this thread's CPU seconds)
        self.recording = False
        super().__init__(path)
        writing = self._db.writing  # the engine's write transaction: it holds the lock from BEGIN to COMMIT

        @contextmanager
        def timed(batch: bool = False) -> Iterator[Any]:
            what = _caller(sys._getframe(1)) if self.recording else "setup"
            start = cpu = None
            try:
                with writing(batch) as conn:
                    start, cpu = time.perf_counter(), time.thread_time()  # the lock is held from here
                    yield conn
            finally:  # after COMMIT (or ROLLBACK): the lock is given back
                if self.recording and start is not None and cpu is not None:
                    self.holds.append((what, time.perf_counter() - start, time.thread_time() - cpu))

        self._db.writing = timed  # type: ignore[method-assign]


def _probe(path: Path, tenant_id: str, stop: Event, out: Connection) -> None:
    """A claim-sized write every PROBE_WRITE_SECONDS and an allowlist page every PROBE_LIST_SECONDS, until `stop`:
    in a process of its own, as the claim worker and the admin API are, so that neither side waits on the other's
    GIL; it queues on the same writer lock (an flock) as they do."""
    store = Store(path)
    writes: list[float] = []
    pages: list[float] = []

    def write() -> None:
        n = 0
        while not stop.wait(PROBE_WRITE_SECONDS):
            start = time.perf_counter()
            with store.transaction() as tx:  # one small row, as a claim's stored answer is
                tx.connection.execute(
                    "INSERT INTO answers VALUES (?, ?, ?, ?, ?)", ("probe", f"r{n}", b"d", b"{}", int(time.time()))
                )
            writes.append(time.perf_counter() - start)
            n += 1

    def page() -> None:
        while not stop.wait(PROBE_LIST_SECONDS):
            start = time.perf_counter()
            store.allowlist_page(tenant_id, None, 100)
            pages.append(time.perf_counter() - start)

    threads = [threading.Thread(target=write), threading.Thread(target=page)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.send((writes, pages))


def _seed(store: TimedStore, tenant: str, devices: int) -> str:
    """The tenant, and `devices` devices in it (none of their hardware ids is in the import)."""
    now, tenant_id = int(time.time()), f"tn_{tenant}"
    store.create_tenant(tenant_id, tenant, now, "bench")
    # Straight rows, foreign keys off on this connection: only their hardware ids and indexes matter here.
    db = sqlite3.connect(store.location, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO devices (id, tenant_id, hardware_id, public_key, cloud_key_id, api_key_hash, labels,"
            " groups_, profile, key_id, status, created_at, updated_at)"
            " VALUES (?, ?, ?, x'04', 'ck', ?, '{}', '[]', 'default', 'key_bench', 'active', ?, ?)",
            ((f"dev_bench{n:09d}", tenant_id, f"SEED-{n:07d}", os.urandom(32), now, now) for n in range(devices)),
        )
        db.execute("COMMIT")
    finally:
        db.close()
    return tenant_id


def run(rows: int, devices: int, shuffle: bool, root: Path) -> dict[str, Any]:
    store = TimedStore(root / "provbridge.db")
    tenant_id = _seed(store, "bench", devices)
    numbers = list(range(rows))
    if shuffle:
        random.shuffle(numbers)
    data = ("hardware_id,name\n" + "".join(f"BULK-{n:07d},unit {n}\n" for n in numbers)).encode()
    load_before = os.getloadavg()[0]
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this one's connections
    stop, (theirs, ours) = spawn.Event(), spawn.Pipe(duplex=False)
    probe = spawn.Process(target=_probe, args=(store.location, tenant_id, stop, ours))
    probe.start()
    time.sleep(PROBE_START_SECONDS)
    store.recording = True
    started = time.perf_counter()
    try:
        done = allowlist.import_csv(store, "bench", data)
    finally:
        took = time.perf_counter() - started
        store.recording = False
        stop.set()
    writes, pages = theirs.recv()
    probe.join()
    assert done.entries == rows, done
    kinds: dict[str, list[tuple[float, float]]] = {}
    for what, wall, cpu in store.holds:
        kinds.setdefault(what, []).append((wall, cpu))
    kinds["every write transaction"] = [(wall, cpu) for _, wall, cpu in store.holds]
    store.close()
    return {
        "rows": rows,
        "devices": devices,
        "shuffled": shuffle,
        "batch": allowlist.IMPORT_BATCH,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "import_seconds": round(took, 2),
        "transactions": len(store.holds),
        "by_method": {
            what: {"hold": latency_summary(w for w, _ in values), "cpu": latency_summary(c for _, c in values)}
            for what, values in kinds.items()
        },
        "probe_write": latency_summary(writes),
        "probe_list_page": latency_summary(pages),
    }


def _line(name: str, s: Any, cpu: Any = None) -> str:
    line = f"  {name:<24} n={s['count']:>6}  p50 {s['p50_ms']:>8} ms  p99 {s['p99_ms']:>8} ms  max {s['max_ms']:>8} ms"
    return line if cpu is None else line + f"  (CPU p50 {cpu['p50_ms']} ms, max {cpu['max_ms']} ms)"


def report(result: dict[str, Any]) -> str:
    order = "shuffled" if result["shuffled"] else "in order"
    lines = [
        f"{result['rows']:,} rows ({order}; {result['devices']:,} devices in the database), {result['batch']} rows a"
        f" staging transaction: import {result['import_seconds']} s, {result['transactions']} write transactions;"
        f" load average {result['load_average_1min'][0]} -> {result['load_average_1min'][1]}",
        "  write lock held (wall clock, COMMIT included):",
    ]
    by_method = result["by_method"]
    lines += [_line(what, by_method[what]["hold"], by_method[what]["cpu"]) for what in sorted(by_method)]
    lines += [
        _line("probe: one-row write", result["probe_write"]) + "  (its wait for the lock + its hold)",
        _line("probe: allowlist page", result["probe_list_page"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.import_lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="rows to import (repeatable; default 100000)")
    parser.add_argument("--devices", type=int, default=10_000, help="devices in the database first (default 10000)")
    parser.add_argument("--batch", type=int, help="rows per staging transaction (default: allowlist.IMPORT_BATCH)")
    parser.add_argument("--shuffle", action="store_true", help="the file's lines in random order")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.batch:
        allowlist.IMPORT_BATCH = args.batch
    results = []
    for rows in args.rows or [100_000]:
        with tempfile.TemporaryDirectory(prefix="import-lock-") as tmp:
            log(f"importing {rows:,} rows")
            result = run(rows, args.devices, args.shuffle, Path(tmp))
        print(report(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
