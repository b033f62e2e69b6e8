"""Prometheus metrics of the claim path (`counters`), served by the admin API's `/metrics`.

The bridge runs as several processes (`serve`, its claim workers, `--processes` bridges) and the API as one more,
so the metrics use prometheus-client's multiprocess mode: each process writes its own files under
`<data_dir>/metrics/`, and the API sums them. `serve` calls `share(data_dir)` before anything imports
prometheus_client (this module does not); every process it starts inherits the directory.

    provbridge_messages_total{kind, outcome, reason}   claims and refreshes answered (or dropped), by outcome
                                                       (device.provisioned, claim.rejected, token.refreshed,
                                                       rate_limited, internal_error, replayed, ...) and reason
                                                       (a refusal's: unknown_key, device_revoked, ...)
    provbridge_message_seconds{kind}                   the bridge's time on one message, taken to answered
    provbridge_in_flight                               messages taken and not yet answered
    provbridge_flood_refusals_total{limit}             messages refused by a flood limit (client_id, device, ...)
    provbridge_database_errors_total                   transactions that failed (answered internal_error, retry)
    provbridge_broker_connected                        1 while the bridge is connected to its broker
"""

import os
import shutil
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported


def metrics_dir(data_dir: Path) -> Path:
    return data_dir / "metrics"


def share(data_dir: Path) -> None:
    """Make this process and every one it starts write their metrics to `<data_dir>/metrics/`, emptied first
    (what a previous run left would count again). Call it before prometheus_client is imported."""
    directory = metrics_dir(data_dir)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
