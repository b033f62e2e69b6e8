"""The metrics themselves (importing this imports prometheus_client: `bridge.metrics.share` first, in `serve`)."""

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

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
BROKER_CONNECTED = Gauge(
    "provbridge_broker_connected", "1 while the bridge is connected to its broker", multiprocess_mode="livemax"
)


def exposition(data_dir: Path) -> bytes:
    """The metrics of every bridge process of `data_dir`, in the Prometheus text format (nothing when no bridge
    has run since the data dir's metrics were cleared)."""
    directory = metrics_dir(data_dir)
    registry = CollectorRegistry()
    if directory.is_dir():
        multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def kind_of(topic: str, prefix: str) -> str:
    return "refresh" if topic.startswith(f"{prefix}/token/") else "claim"
