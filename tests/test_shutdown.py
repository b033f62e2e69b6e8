"""Graceful shutdown: SIGTERM stops taking claims, finishes those in flight, says offline, exits 0."""

import json
from collections.abc import Iterator

import pytest

from bridge.config import Settings
from bridge.storage import keyfiles
from bridge.storage.store import Store
from provwire import topics
from provwire.models import ClaimOk
from tests.helpers.cli import run_cli
from tests.helpers.devices import Device
from tests.helpers.mosquitto import MosquittoBridge, external_settings, mosquitto_for
from tests.helpers.mqtt import MqttClient
from tests.helpers.processes import ServeProcesses
from tests.helpers.waiting import wait_for


@pytest.fixture
def mosquitto_settings(initialised: tuple[Settings, str]) -> Iterator[tuple[Settings, str, object]]:
    settings, first_key = initialised
    settings = external_settings(settings)
    with mosquitto_for(settings) as mosquitto:
        yield settings, first_key, mosquitto


def test_sigterm_finishes_in_flight_claims_says_offline_and_exits_0(
    mosquitto_settings: tuple[Settings, str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, first_key, mosquitto = mosquitto_settings
    assert run_cli(settings, "ops-user", "create", "watch", "--json") == 0
    password = json.loads(capsys.readouterr().out)["password"]
    serve = ServeProcesses(settings, 1)
    serve.start()
    store = Store(settings.database)
    try:
        bridge = MosquittoBridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key, mosquitto)  # type: ignore[arg-type]
        devices = [Device(bridge) for _ in range(20)]
        for d in devices:
            d.__enter__()
        for d in devices:  # a burst, then SIGTERM while it is being worked on
            d.conn.publish(topics.claim_topic(bridge.prefix, d.client_id), d.claim_payload(first_key))
        assert serve.process is not None
        serve.process.terminate()
        assert serve.process.wait(60) == 0, serve.log()
        serve.process = None
        # Every claim the bridge committed was answered before it left (the answers may still be on their
        # way through Mosquitto); the claims it had not taken wait in its persistent session.
        committed = store.count("devices")
        answers: list[bytes] = []

        def drained() -> bool:
            for d in devices:
                while not d.conn.messages.empty():
                    answers.append(d.conn.next_message()[1])
            return len(answers) >= committed

        assert wait_for(drained, timeout=30), (len(answers), committed)
        assert all(ClaimOk.model_validate_json(raw).request_id for raw in answers)
        assert len(answers) == committed  # no device without its answer, no answer without its device
        for d in devices:
            d.__exit__()
        assert "shutting down" in serve.log()
    finally:
        store.close()
        serve.stop()
    with MqttClient(settings.broker.port, "watch-1", "watch", password) as ops:
        assert ops.connect()
        assert ops.subscribe(topics.status_topic(settings.topic_prefix)) == [1]
        topic, payload = ops.next_message()
    assert topic == topics.status_topic(settings.topic_prefix)
    assert json.loads(payload) == {"status": "offline"}  # retained: what the bridge said on its way out
