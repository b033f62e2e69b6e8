"""Issue 12: `/metrics` (Prometheus) of a real `provbridge serve` subprocess, read through its admin API: every
series the issue names is there; the counters move with real claims and refreshes, refusals by reason, the flood
limit and the latency histogram; a claim held by another writer shows in flight; a claim that meets a database
error is counted; the broker connection state follows a real Mosquitto going away and coming back. `/readyz`
fails when the database is not writable or when the bridge has lost its broker, in the API's error shape."""

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import Settings
from bridge.ops import admin, admin_tokens
from bridge.storage.filelock import locked
from bridge.storage.store import Store
from provwire import topics
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.api import Api, Response, api_server, serve_with_api
from tests.helpers.bridge import Bridge, make_settings
from tests.helpers.devices import Device, answer_of
from tests.helpers.mosquitto import external_settings, mosquitto_for
from tests.helpers.network import accepts_connections
from tests.helpers.processes import ServeProcesses
from tests.helpers.refresh import provisioned
from tests.helpers.waiting import wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Every series issue 12 names, by family (a counter's samples end in _total), with its type and label names.
SERIES = {
    "provbridge_messages": ("counter", {"kind", "outcome", "reason"}),
    "provbridge_message_seconds": ("histogram", {"kind"}),
    "provbridge_in_flight": ("gauge", set()),
    "provbridge_flood_refusals": ("counter", {"limit"}),
    "provbridge_database_errors": ("counter", set()),
    "provbridge_broker_connected": ("gauge", set()),
}
ANSWER_SECONDS = 60.0  # a deadline for an answer the bridge owes, not a measure of its speed


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


def scrape(api: Api, token: str) -> str:
    answer = api.request("GET", "/metrics", token)
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    return answer.body.decode()


def samples(api: Api, token: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scrape(api, token))
        for sample in family.samples
    }


def series(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def value(found: Samples, name: str, **labels: str) -> float:
    """The sample's value. An absent series fails the test: absent is not zero."""
    assert series(name, **labels) in found, f"{name}{labels} is not in /metrics: {sorted(found)}"
    return found[series(name, **labels)]


def assert_exposed(api: Api, token: str, names: set[str]) -> None:
    """Each family of `names` is in /metrics with its type, and its samples carry exactly its labels."""
    families = {family.name: family for family in text_string_to_metric_families(scrape(api, token))}
    for name in names:
        kind, labels = SERIES[name]
        assert name in families, f"{name} is not in /metrics: {sorted(families)}"
        family = families[name]
        assert family.type == kind and family.samples, (name, family.type, family.samples)
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)


def ready(api: Api) -> Response:
    return api.request("GET", "/readyz")


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

    provisioned_claims = series("provbridge_messages_total", kind="claim", outcome="device.provisioned", reason="")

    def counted() -> bool:
        return samples(api, token).get(provisioned_claims) == 4

    assert wait_for(counted, timeout=10)
    assert_exposed(api, token, set(SERIES) - {"provbridge_flood_refusals"})  # no flood here: see the next test
    found = samples(api, token)
    assert value(found, "provbridge_messages_total", kind="refresh", outcome="token.refreshed", reason="") == 1
    assert value(found, "provbridge_messages_total", kind="claim", outcome="claim.rejected", reason="unknown_key") == 1
    assert value(found, "provbridge_message_seconds_count", kind="claim") == 5
    assert value(found, "provbridge_message_seconds_bucket", kind="claim", le="+Inf") == 5
    assert value(found, "provbridge_message_seconds_count", kind="refresh") == 1
    assert value(found, "provbridge_message_seconds_sum", kind="claim") > 0
    assert value(found, "provbridge_in_flight") == 0
    assert value(found, "provbridge_broker_connected") == 1  # the embedded broker: the bridge is inside it
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
    assert_exposed(api, token, set(SERIES))  # with a flood refused, every series the issue names is there


def test_a_held_claim_is_in_flight_and_a_database_error_is_counted(served: tuple[Bridge, Api, str]) -> None:
    """Another writer holds the database: first a bridge process's write lock (as a second `--processes` bridge
    mid-write does), for as long as the test likes, so the claim waits in flight; then SQLite's own lock past the
    bridge's busy timeout, so the claim's transaction fails and it is answered internal_error, retry."""
    bridge, api, token = served
    found = samples(api, token)
    assert value(found, "provbridge_in_flight") == 0 and value(found, "provbridge_database_errors_total") == 0
    writer_lock = bridge.settings.database_file.with_name(bridge.settings.database_file.name + "-writer.lock")
    with Device(bridge) as device:
        claim = topics.claim_topic(bridge.prefix, device.client_id)
        with locked(writer_lock):
            device.conn.publish(claim, device.claim_payload(bridge.provision_key))
            assert wait_for(lambda: value(samples(api, token), "provbridge_in_flight") == 1, timeout=ANSWER_SECONDS)
            assert device.conn.messages.empty()  # held: not answered while the lock is
        assert isinstance(answer_of(device.conn.next_message(ANSWER_SECONDS).payload), ClaimOk)
        assert wait_for(lambda: value(samples(api, token), "provbridge_in_flight") == 0, timeout=ANSWER_SECONDS)
        assert value(samples(api, token), "provbridge_database_errors_total") == 0  # waiting was no error

    holder = sqlite3.connect(bridge.settings.database_file, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with Device(bridge) as device:
            device.conn.publish(
                topics.claim_topic(bridge.prefix, device.client_id), device.claim_payload(bridge.provision_key)
            )
            answer = answer_of(device.conn.next_message(ANSWER_SECONDS).payload)  # after the busy timeout
        assert isinstance(answer, ClaimError) and answer.code is ErrorCode.INTERNAL_ERROR and answer.retry_after
        failed = ready(api)  # the same lock makes the database not writable for /readyz
        assert (failed.status, failed.error_code) == (503, "unavailable")
        assert failed.json()["checks"]["database"].startswith("not writable")
        assert failed.json()["checks"]["broker"] == "ok"
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    def counted() -> bool:
        return value(samples(api, token), "provbridge_database_errors_total") == 1

    assert wait_for(counted, timeout=ANSWER_SECONDS)
    assert value(samples(api, token), "provbridge_in_flight") == 0
    # The claim is counted as what its device was answered, though its transaction failed at the end.
    failed_claims = value(
        samples(api, token), "provbridge_messages_total", kind="claim", outcome="internal_error", reason=""
    )
    assert failed_claims == 1
    assert ready(api).status == 200
    with Device(bridge) as device:  # the retry, now that the database is free
        assert isinstance(device.claim(bridge.provision_key), ClaimOk)


def test_broker_connection_state_and_readyz_follow_the_bridges_broker(
    initialised: tuple[Settings, str],
) -> None:
    """A real `serve` against a real Mosquitto: stopped, the bridge loses its connection and says so in
    provbridge_broker_connected and /readyz; started again, the bridge reconnects by itself and both say so.
    Then the bridge is killed while Mosquitto still accepts connections: an API run alone on the data dir is not
    ready, and does not take the gauge the killed process left behind for a connection."""
    settings = external_settings(initialised[0], dynsec=False)
    store = Store(settings.database)
    token = admin_tokens.create_admin_token(store, "scraper", ["read"], None, int(time.time())).raw
    store.close()
    with mosquitto_for(settings) as mosquitto, ServeProcesses(settings) as serve:
        api = Api(settings.api.port, settings)

        def connected() -> float:
            return value(samples(api, token), "provbridge_broker_connected")

        assert wait_for(lambda: answers(api) and connected() == 1 and ready(api).status == 200, ANSWER_SECONDS)
        assert ready(api).json() == {"status": "ready", "checks": {"broker": "ok", "database": "ok"}}

        mosquitto.stop()
        assert wait_for(lambda: connected() == 0, timeout=ANSWER_SECONDS)
        failed = ready(api)
        assert (failed.status, failed.error_code) == (503, "unavailable")
        assert set(failed.json()) == {"status", "checks", "error"} and failed.json()["status"] == "unavailable"
        assert set(failed.json()["error"]) == {"code", "message"}
        assert failed.json()["error"]["message"] == "not ready: broker"
        broker = failed.json()["checks"]["broker"]
        assert broker.startswith("not connected") and f"127.0.0.1:{settings.broker.port}" in broker
        assert failed.json()["checks"]["database"] == "ok"

        mosquitto.start()
        assert wait_for(lambda: connected() == 1 and ready(api).status == 200, timeout=ANSWER_SECONDS)

        serve.kill()  # SIGKILL: its gauge file still says connected; its API dies with it
        with api_server(settings) as alone:
            assert accepts_connections(settings.broker.port)  # a probe of the broker's port would say ready
            failed = ready(alone)
            assert (failed.status, failed.error_code) == (503, "unavailable")
            assert failed.json()["checks"]["broker"].startswith("not connected")
            assert value(samples(alone, token), "provbridge_broker_connected") == 0


def answers(api: Api) -> bool:
    try:
        return api.request("GET", "/healthz").status == 200
    except OSError:  # not listening yet
        return False
