"""Issue 12: `/metrics` (Prometheus) of a real `provbridge serve` subprocess, read through its admin API: the
counters move with real claims and refreshes, refusals by reason, the flood limit and the latency histogram;
`/readyz` fails when the database or the broker is unavailable."""

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import Settings
from bridge.ops import admin
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.api import Api, serve_with_api
from tests.helpers.bridge import Bridge, make_settings
from tests.helpers.devices import Device
from tests.helpers.refresh import provisioned
from tests.helpers.waiting import wait_for


@pytest.fixture
def served(initialised: tuple[Settings, str]) -> Iterator[tuple[Bridge, Api, str]]:
    with serve_with_api(*initialised, "read") as running:
        yield running


@pytest.fixture
def served_with_flood_limits(tmp_path: Path) -> Iterator[tuple[Bridge, Api, str]]:
    base = make_settings(tmp_path / "data")
    settings = base.model_copy(update={"claims": base.claims.model_copy(update={"rate_limits": True})})
    made = admin.init_data_dir(settings)
    assert made.provision_key
    with serve_with_api(settings, made.provision_key, "read") as running:
        yield running


def samples(api: Api, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = api.request("GET", "/metrics", token)
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_real_claims_and_refreshes(served: tuple[Bridge, Api, str]) -> None:
    bridge, api, token = served
    assert api.request("GET", "/metrics").status == 401  # not anonymous
    for _ in range(3):
        provisioned(bridge)
    device, _ = provisioned(bridge)
    with device:
        assert isinstance(device.send_refresh(device.refresh_payload()), ClaimOk)
    with Device(bridge) as stranger:
        assert isinstance(stranger.claim("pk_" + "A" * 43), ClaimError)

    def counted() -> bool:
        found = samples(api, token)
        return value(found, "provbridge_messages_total", kind="claim", outcome="device.provisioned", reason="") == 4

    assert wait_for(counted, timeout=10)
    found = samples(api, token)
    assert value(found, "provbridge_messages_total", kind="refresh", outcome="token.refreshed", reason="") == 1
    assert value(found, "provbridge_messages_total", kind="claim", outcome="claim.rejected", reason="unknown_key") == 1
    assert value(found, "provbridge_message_seconds_count", kind="claim") == 5
    assert value(found, "provbridge_in_flight") == 0
    assert value(found, "provbridge_broker_connected") == 1
    assert value(found, "provbridge_database_errors_total") == 0


def test_flood_refusals_are_counted_by_the_limit_that_refused(
    served_with_flood_limits: tuple[Bridge, Api, str],
) -> None:
    bridge, api, token = served_with_flood_limits
    burst = bridge.settings.claims.rate_client_burst
    with Device(bridge) as flooder:  # one client id and hardware id, past their budgets: rate_limited answers
        answers = [flooder.claim("pk_" + "B" * 43) for _ in range(burst + 5)]
    limited = sum(1 for a in answers if isinstance(a, ClaimError) and a.code == ErrorCode.RATE_LIMITED)
    assert limited >= 1

    def refusals() -> dict[str, float]:
        found = samples(api, token)
        return {
            dict(labels)["limit"]: n for (name, labels), n in found.items() if name == "provbridge_flood_refusals_total"
        }

    # Every refusal counted once, under the limit that made it (the client id's at the edge, the device's in the
    # claim work).
    assert wait_for(lambda: sum(refusals().values()) == limited, timeout=10), (limited, refusals())
    assert set(refusals()) <= {"client_id", "device"} and refusals().get("client_id", 0) >= 1


def test_readyz_fails_while_the_database_is_locked(served: tuple[Bridge, Api, str]) -> None:
    _, api, _ = served
    assert api.request("GET", "/readyz").status == 200
    holder = sqlite3.connect(api.settings.database_file, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # a writer stuck holding the lock
        answer = api.request("GET", "/readyz")
        assert answer.status == 503 and answer.json()["checks"]["database"].startswith("not writable")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert api.request("GET", "/readyz").status == 200
