"""Checks that hold on Mosquitto whichever way it authenticates devices (dynamic security or the
provbridge_jwt plugin): the test modules of both modes run them."""

import json
import uuid

import pytest

from provwire import topics
from tests.helpers.cli import run_cli
from tests.helpers.devices import Device, provision
from tests.helpers.mosquitto import MosquittoBridge
from tests.helpers.mqtt import NOT_AUTHORIZED, MqttClient, can_connect


def provisioning_client_is_held_to_its_own_client_id(
    bridge: MosquittoBridge, login: tuple[str | None, str | None]
) -> None:
    prefix = bridge.prefix
    attacker = Device(bridge, client_id=f"attacker-{uuid.uuid4().hex[:6]}")
    victim = Device(bridge, client_id=f"victim-{uuid.uuid4().hex[:6]}")
    with MqttClient(bridge.port, attacker.client_id, *login, v5=True) as conn:
        assert conn.connect()
        for forbidden in (f"{prefix}/events/#", f"{prefix}/status/#", f"{prefix}/res/#", "#", f"{prefix}/claim/+"):
            assert conn.subscribe(forbidden) == [NOT_AUTHORIZED], forbidden
        # Mosquitto's acl_file cannot refuse a SUBSCRIBE, so this one is accepted ...
        assert conn.subscribe(topics.response_topic(prefix, victim.client_id)) == [1]
        assert conn.subscribe(topics.response_topic(prefix, attacker.client_id)) == [1]
        # ... and a claim under another client id is refused at PUBLISH.
        forged = topics.claim_topic(prefix, f"ghost-{uuid.uuid4().hex[:6]}")
        assert conn.publish(forged, attacker.claim_payload(bridge.provision_key)) == NOT_AUTHORIZED
        assert conn.publish(f"{prefix}/events/default/device.provisioned", b"{}") == NOT_AUTHORIZED

        victim_id, _ = provision(bridge, victim)  # the victim's answer is published while we listen
        own = topics.claim_topic(prefix, attacker.client_id)
        assert conn.publish(own, attacker.claim_payload(bridge.provision_key)) == 0
        # ... but nothing is delivered but our own answer: messages to one client arrive in order,
        # so the victim's answer, published first, would have come first.
        topic, raw = conn.next_message()
        assert topic == topics.response_topic(prefix, attacker.client_id)
        assert json.loads(raw)["status"] == "ok"
        assert conn.messages.empty()
    assert victim_id
    ghosts = [e for e in bridge.store.events(limit=1000) if str(e.get("client_id", "")).startswith("ghost-")]
    assert ghosts == []


def ops_user_reads_events_and_status_and_publishes_nothing(
    bridge: MosquittoBridge, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert run_cli(bridge.settings, "ops-user", "create", "night-shift", "--json") == 0
    password = json.loads(capsys.readouterr().out)["password"]  # added live, through the bridge account
    prefix = bridge.prefix
    with MqttClient(bridge.port, "ops-console", "night-shift", password, v5=True) as ops:
        assert ops.connect()
        assert ops.subscribe(f"{prefix}/status/#") == [1]
        topic, raw = ops.next_message()  # the bridge's retained status
        assert topic == topics.status_topic(prefix) and json.loads(raw)["status"] == "online"
        assert ops.subscribe(f"{prefix}/events/#") == [1]
        assert ops.subscribe(f"{prefix}/claim/+") == [NOT_AUTHORIZED]
        assert ops.subscribe("devices/#") == [NOT_AUTHORIZED]
        assert ops.publish(f"{prefix}/events/default/x", b"{}") == NOT_AUTHORIZED
        assert ops.publish(topics.status_topic(prefix), b"{}") == NOT_AUTHORIZED
        assert ops.publish(topics.claim_topic(prefix, "ops-console"), b"{}") == NOT_AUTHORIZED
        device_id, _ = provision(bridge)
        topic, raw = ops.next_message()
        assert topic == f"{prefix}/events/default/device.provisioned"
        assert json.loads(raw)["device_id"] == device_id

        assert run_cli(bridge.settings, "ops-user", "delete", "night-shift") == 0
        assert ops.disconnected.wait(10), "deleting the ops user must end its session"
    assert not can_connect(bridge.port, "ops-console", "night-shift", password)
    assert not can_connect(bridge.port, "ops-console", "night-shift", "wrong")
