"""The metrics themselves (importing this imports prometheus_client: `bridge.metrics.share` first, in `serve`)."""

import os
import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from bridge.metrics import metrics_dir

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

MESSAGES = Counter(
    "provbridge_messages", "Claims and refreshes answered, by outcome and reason", ["kind", "outcome", "reason"]
)
MESSAGE_SECONDS = Histogram(
    "provbridge_message_seconds", "The bridge's time on one message, taken to answered", ["kind"], buckets=_BUCKETS
)
IN_FLIGHT = Gauge("provbridge_in_flight", "Messages taken and not yet answered", multiprocess_mode="livesum")
FLOOD_REFUSALS = Counter("provbridge_flood_refusals", "Messages refused by a flood limit", ["limit"])
DATABASE_ERRORS = Counter("provbridge_database_errors", "Database transactions that failed (answered retry)")
BROKER_CONNECTED_NAME = "provbridge_broker_connected"
BROKER_CONNECTED = Gauge(
    BROKER_CONNECTED_NAME, "1 while the bridge is connected to its broker", multiprocess_mode="livemax"
)

# A live gauge's file per process (`gauge_livemax_<pid>.db`): it speaks for that process only while it runs.
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def exposition(data_dir: Path) -> bytes:
    """The metrics of every bridge process of `data_dir`, in the Prometheus text format (nothing when no bridge
    has run since the data dir's metrics were cleared)."""
    registry = CollectorRegistry()
    registry.register(_CurrentProcesses(metrics_dir(data_dir)))
    return generate_latest(registry)


def broker_connected(data_dir: Path) -> bool:
    """Whether a running bridge process of `data_dir` is connected to its broker, as its own
    `provbridge_broker_connected` says (set by the bridge on each connect and disconnect): what `/readyz` goes by,
    from the API's process. False when no bridge process of `data_dir` runs."""
    directory = metrics_dir(data_dir)
    gauges = [path for path in _current_files(directory) if Path(path).name.startswith("gauge_livemax_")]
    for metric in _merged(gauges):
        if metric.name == BROKER_CONNECTED_NAME:
            return any(sample.value >= 1 for sample in metric.samples)
    return False


class _CurrentProcesses:
    """prometheus-client's multiprocess collector, less the live gauges of processes that are gone: a bridge
    killed while connected (or with messages in flight) must not be counted as connected (or busy) forever.
    Counters and histograms of a finished process still count, as in prometheus-client."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        return _merged(_current_files(self.directory))


def _merged(files: list[str]) -> Iterable[Metric]:
    merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
    return merged


def _current_files(directory: Path) -> list[str]:
    """The metric files of `directory` that still speak for a process: every one but a live gauge of a gone one."""
    if not directory.is_dir():
        return []
    current = []
    for path in directory.glob("*.db"):
        live = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if live is None or _running(int(live.group(1))):
            current.append(str(path))
    return current


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


def kind_of(topic: str, prefix: str) -> str:
    return "refresh" if topic.startswith(f"{prefix}/token/") else "claim"
