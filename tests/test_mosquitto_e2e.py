"""Issue 3 on a real Mosquitto 2.0, started from `provbridge mosquitto-config` output as is, with the
bridge in external mode mirroring tokens into dynamic security: `broker.mosquitto_auth = "dynsec"`, the
opt-in for small fleets (the default, jwt, is tests/test_mosquitto_jwt.py). Real SQLite, real crypto,
loopback only.
"""

import json
import logging
import time
from collections.abc import Iterator

import jwt
import pytest

from bridge.config import Settings
from bridge.mosquitto import dynsec
from bridge.mosquitto.dynsec import DynsecMirror, admin_channel, revoke_on_mosquitto
from bridge.tokens import mint_token
from provwire import topics
from provwire.models import ClaimError, ClaimOk
from tests.helpers.cli import run_cli
from tests.helpers.devices import Device, answer_of, provision, race_one_time_key
from tests.helpers.mosquitto import MosquittoBridge, mosquitto_bridge
from tests.helpers.mosquitto_checks import (
    ops_user_reads_events_and_status_and_publishes_nothing,
    provisioning_client_is_held_to_its_own_client_id,
)
from tests.helpers.mqtt import ACCEPTED, NOT_AUTHORIZED, MqttClient, can_connect, request_properties
from tests.helpers.refresh import RefreshingDevice
from tests.helpers.waiting import wait_for

DYNSEC = "dynsec"  # every test here is about the mirror


@pytest.fixture
def bridge(initialised: tuple[Settings, str]) -> Iterator[MosquittoBridge]:
    with mosquitto_bridge(*initialised, mosquitto_auth=DYNSEC) as running:
        yield running


@pytest.fixture(params=[DYNSEC, "jwt"], ids=["mosquitto-dynsec", "mosquitto-jwt"])
def bridge_v5(initialised: tuple[Settings, str], request: pytest.FixtureRequest) -> Iterator[MosquittoBridge]:
    """An MQTT 5 bridge on both edges: the threaded one beside the mirror, and the default (jwt) one."""
    with mosquitto_bridge(*initialised, protocol="5", mosquitto_auth=request.param) as running:
        yield running


@pytest.fixture
def short_lived(initialised: tuple[Settings, str]) -> Iterator[MosquittoBridge]:
    """Tokens valid 2 s (below the configurable minimum, set directly) and a janitor every 0.2 s."""
    settings, key = initialised
    settings = settings.model_copy(update={"token": settings.token.model_copy(update={"ttl_seconds": 2})})
    with mosquitto_bridge(settings, key, dynsec_janitor_seconds=0.2, mosquitto_auth=DYNSEC) as running:
        yield running


def claim_v5(
    bridge: MosquittoBridge,
    device: Device,
    response_topic: str | None = None,
    correlation: bytes | None = None,
    key: str | None = None,
) -> tuple[str, ClaimOk | ClaimError, object]:
    """A claim from an MQTT 5 client; returns the topic, the answer and the answer's properties."""
    with MqttClient(bridge.port, device.client_id, v5=True) as conn:
        assert conn.connect()
        assert conn.subscribe(topics.response_topic(bridge.prefix, device.client_id)) == [1]
        payload = device.claim_payload(key or bridge.provision_key)
        properties = request_properties(response_topic, correlation)
        assert conn.publish(topics.claim_topic(bridge.prefix, device.client_id), payload, properties) == 0
        topic, raw, answer_properties = conn.next_message_with_properties()
    return topic, answer_of(raw), answer_properties


@pytest.mark.parametrize("v5", [False, True], ids=["device-mqtt3.1.1", "device-mqtt5"])
def test_claim_then_token_connect_then_publish(bridge: MosquittoBridge, v5: bool) -> None:
    device = Device(bridge)
    if v5:
        topic, answer, _ = claim_v5(bridge, device)
        assert topic == topics.response_topic(bridge.prefix, device.client_id)
        assert isinstance(answer, ClaimOk), answer
        device_id, creds = answer.device_id, device.open(answer)
    else:
        device_id, creds = provision(bridge, device)
    scope = f"devices/{device_id}/#"
    assert creds.mqtt.publish == [scope] and creds.mqtt.port == bridge.port
    with MqttClient(bridge.port, device_id, device_id, creds.mqtt.token, v5=v5) as conn:
        assert conn.connect()
        assert conn.subscribe(scope) == [1]
        assert conn.publish(f"devices/{device_id}/telemetry", b"hello") == 0
        assert conn.next_message()[:2] == (f"devices/{device_id}/telemetry", b"hello")
    # What Mosquitto stored is a PBKDF2 hash of the token, in a file only its owner can read.
    state = (bridge.mosquitto.conf_dir / "dynamic-security.json").read_text()
    assert creds.mqtt.token not in state and device_id in state
    assert (bridge.mosquitto.conf_dir / "dynamic-security.json").stat().st_mode & 0o777 == 0o600
    assert creds.mqtt.token not in bridge.mosquitto.log()


@pytest.mark.parametrize("login", [(None, None), ("provision", "provision")], ids=["anonymous", "provision"])
def test_provisioning_client_is_held_to_its_own_client_id(
    bridge: MosquittoBridge, login: tuple[str | None, str | None]
) -> None:
    provisioning_client_is_held_to_its_own_client_id(bridge, login)


def test_ops_user_reads_events_and_status_and_publishes_nothing(
    bridge: MosquittoBridge, capsys: pytest.CaptureFixture[str]
) -> None:
    ops_user_reads_events_and_status_and_publishes_nothing(bridge, capsys)


def test_device_is_held_to_its_token_scope(bridge: MosquittoBridge) -> None:
    a_id, a = provision(bridge)
    b_id, b = provision(bridge)
    with (
        MqttClient(bridge.port, b_id, b_id, b.mqtt.token, v5=True) as bconn,
        MqttClient(bridge.port, a_id, a_id, a.mqtt.token, v5=True) as aconn,
    ):
        assert bconn.connect() and aconn.connect()
        assert bconn.subscribe(f"devices/{b_id}/#") == [1]
        for outside in (f"devices/{b_id}/#", "devices/#", "#", f"{bridge.prefix}/#", "$SYS/#", "$share/g/#"):
            assert aconn.subscribe(outside) == [NOT_AUTHORIZED], outside
        assert aconn.publish(f"devices/{b_id}/cmd", b"intrusion") == NOT_AUTHORIZED
        assert aconn.publish(topics.claim_topic(bridge.prefix, a_id), b"{}") == NOT_AUTHORIZED
        assert aconn.publish(f"{bridge.prefix}/events/default/x", b"{}") == NOT_AUTHORIZED
        assert aconn.publish(f"devices/{a_id}/own", b"mine") in ACCEPTED
        assert bconn.publish(f"devices/{b_id}/cmd", b"own") == 0
        assert bconn.next_message()[:2] == (f"devices/{b_id}/cmd", b"own")
        assert bconn.messages.empty()


def test_wrong_client_id_and_tokens_never_mirrored_are_refused(bridge: MosquittoBridge) -> None:
    device_id, creds = provision(bridge)
    real = jwt.decode(creds.mqtt.token, options={"verify_signature": False})
    # Correctly signed by the bridge's own key, valid, right subject: but Mosquitto never heard of it.
    unmirrored = mint_token(
        key=bridge.keys.token_key,
        kid=bridge.keys.active_token,
        issuer=real["iss"],
        audience=real["aud"],
        device_id=device_id,
        tenant=real["tenant"],
        publish=real["acl"]["pub"],
        subscribe=real["acl"]["sub"],
        now=int(time.time()),
        ttl_seconds=900,
    ).token
    assert not can_connect(bridge.port, "someone-else", device_id, creds.mqtt.token)
    assert not can_connect(bridge.port, device_id, device_id, unmirrored)
    assert not can_connect(bridge.port, device_id, device_id, "not-a-jwt")
    assert can_connect(bridge.port, device_id, device_id, creds.mqtt.token)
    # Anonymous under a device's client id is only a provisioning client: none of the device's rights.
    with MqttClient(bridge.port, device_id, v5=True) as squatter:
        assert squatter.connect()
        assert squatter.subscribe(f"devices/{device_id}/#") == [NOT_AUTHORIZED]
        assert squatter.publish(f"devices/{device_id}/x", b"x") == NOT_AUTHORIZED


def test_reclaim_replaces_the_token_and_ends_the_old_session(bridge: MosquittoBridge) -> None:
    device = Device(bridge)
    device_id, first = provision(bridge, device)
    with MqttClient(bridge.port, device_id, device_id, first.mqtt.token) as live:
        assert live.connect()
        same = Device(bridge, hardware_id=device.hardware_id)
        same.private_key = device.private_key  # the same board, re-claiming after a reboot
        again_id, again = provision(bridge, same)
        assert again_id == device_id and again.mqtt.token != first.mqtt.token
        # Mosquitto 2.0 disconnects a client whose dynamic-security entry is modified.
        assert live.disconnected.wait(10)
    assert "modifyRole" not in bridge.mosquitto.log()  # same scope: the role was left alone
    # One password per client: the newest token replaces the previous one.
    assert can_connect(bridge.port, device_id, device_id, again.mqtt.token)
    assert not can_connect(bridge.port, device_id, device_id, first.mqtt.token)


def test_expired_tokens_are_removed_by_the_janitor(short_lived: MosquittoBridge) -> None:
    bridge = short_lived
    device_id, creds = provision(bridge)
    assert creds.mqtt.expires_at - int(time.time()) <= 2
    with MqttClient(bridge.port, device_id, device_id, creds.mqtt.token) as live:
        # The token may already have expired and been removed by now: then the CONNECT is refused.
        if live.connect():
            assert live.disconnected.wait(30), "the janitor must end the session of an expired token"
    assert wait_for(lambda: not can_connect(bridge.port, device_id, device_id, creds.mqtt.token), timeout=30)
    state = bridge.mosquitto.conf_dir / "dynamic-security.json"
    assert wait_for(lambda: device_id not in state.read_text(), timeout=30)


def test_revoke_on_mosquitto_ends_the_session_and_refuses_the_device(bridge: MosquittoBridge) -> None:
    device_id, creds = provision(bridge)
    other_id, other = provision(bridge)
    with MqttClient(bridge.port, device_id, device_id, creds.mqtt.token) as live:
        assert live.connect()
        revoke_on_mosquitto(bridge.settings, device_id)  # what `provbridge device revoke` calls, from its process
        assert live.disconnected.wait(10), "revocation must end the live session"
    assert not can_connect(bridge.port, device_id, device_id, creds.mqtt.token)
    assert can_connect(bridge.port, other_id, other_id, other.mqtt.token)  # nobody else is touched
    revoke_on_mosquitto(bridge.settings, device_id)  # idempotent
    revoke_on_mosquitto(bridge.settings, "dev_never_existed")
    # The admin session used its own client id: the bridge's session is untouched and still answers.
    provision(bridge)


def test_mqtt5_answer_on_the_response_topic_with_the_correlation_data(bridge_v5: MosquittoBridge) -> None:
    bridge = bridge_v5
    device = Device(bridge)
    own = topics.response_topic(bridge.prefix, device.client_id)
    topic, answer, properties = claim_v5(bridge, device, own, b"corr-\x00\x01")
    assert topic == own and isinstance(answer, ClaimOk)
    assert properties.CorrelationData == b"corr-\x00\x01"  # type: ignore[attr-defined]
    # A Response Topic outside {prefix}/res/<client id> is ignored: the bridge account may write events
    # and status, and a claim must not make it publish there. The answer goes to the usual topic.
    elsewhere = f"{bridge.prefix}/events/default/device.provisioned"
    topic, answer, properties = claim_v5(bridge, Device(bridge), elsewhere, b"corr-2")
    assert topic != elsewhere and isinstance(answer, ClaimOk)
    assert properties.CorrelationData == b"corr-2"  # type: ignore[attr-defined]
    # Nor may a Response Topic name another client's response topic: the one answer goes to the requester.
    victim = topics.response_topic(bridge.prefix, "victim-client")
    topic, answer, properties = claim_v5(bridge, Device(bridge), victim, b"corr-3")
    assert topic != victim and isinstance(answer, ClaimOk)
    # MQTT 3.1.1 devices provision through an MQTT 5 bridge as well.
    device_id, creds = provision(bridge)
    assert can_connect(bridge.port, device_id, device_id, creds.mqtt.token, v5=True)


def test_one_time_key_under_50_concurrent_claims_creates_exactly_one_device(bridge: MosquittoBridge) -> None:
    statuses = race_one_time_key(bridge)
    winner = next(ClaimOk.model_validate(s) for s in statuses if s["status"] == "ok")
    state = json.loads((bridge.mosquitto.conf_dir / "dynamic-security.json").read_text())
    assert [c["username"] for c in state["clients"] if c["username"].startswith("dev_")] == [winner.device_id]


def test_regenerating_the_config_keeps_devices_and_the_bridge_session(bridge: MosquittoBridge) -> None:
    device_id, creds = provision(bridge)
    bridge.mosquitto.stop()
    assert run_cli(bridge.settings, "mosquitto-config", str(bridge.mosquitto.conf_dir)) == 0
    bridge.mosquitto.start()
    assert can_connect(bridge.port, device_id, device_id, creds.mqtt.token)
    # A claim published before the bridge is back waits in its persistent session (restored from
    # Mosquitto's persistence file) and is answered once the bridge has reconnected by itself.
    with Device(bridge) as device:
        device.conn.publish(
            topics.claim_topic(bridge.prefix, device.client_id), device.claim_payload(bridge.provision_key)
        )
        topic, raw = device.conn.next_message(timeout=60)
    assert topic == topics.response_topic(bridge.prefix, device.client_id)
    assert json.loads(raw)["status"] == "ok"


def test_token_refresh_is_mirrored(bridge: MosquittoBridge) -> None:
    with RefreshingDevice(bridge) as device:
        first = device.provision()
        answer = device.send_refresh(device.refresh_payload())  # on {prefix}/token/<client id>, provisioning rights
    assert isinstance(answer, ClaimOk)
    fresh = device.open(answer)
    device_id = fresh.mqtt.client_id
    assert can_connect(bridge.port, device_id, device_id, fresh.mqtt.token)
    assert not can_connect(bridge.port, device_id, device_id, first.mqtt.token)


def test_janitor_reads_expiries_back_from_mosquitto(bridge: MosquittoBridge) -> None:
    """A janitor starting afresh (a bridge restart) learns every mirrored token's expiry from Mosquitto."""
    device_id, creds = provision(bridge)
    kept_id, kept = provision(bridge)
    with admin_channel(bridge.settings) as channel:
        janitor = DynsecMirror(bridge.settings)
        janitor.use(channel)
        assert janitor.load() == 2
        assert janitor.mirrored() == {device_id: creds.mqtt.expires_at, kept_id: kept.mqtt.expires_at}
        # A pass "after" the first token's expiry (the clock is an argument: no waiting).
        assert janitor.sweep(now=creds.mqtt.expires_at) >= 1
    assert not can_connect(bridge.port, device_id, device_id, creds.mqtt.token)
    if kept.mqtt.expires_at > creds.mqtt.expires_at:
        assert can_connect(bridge.port, kept_id, kept_id, kept.mqtt.token)


def test_a_mirrored_fleet_past_the_cost_limit_is_warned_about_in_the_log_and_by_doctor(
    bridge: MosquittoBridge,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Past MIRRORED_FLEET_WARNING mirrored devices (measured: where a claim costs Mosquitto 10 ms of CPU;
    lowered here so that three devices pass it) the janitor logs a warning and `doctor` prints a WARN line,
    which does not fail it."""
    monkeypatch.setattr(dynsec, "MIRRORED_FLEET_WARNING", 2)
    caplog.set_level(logging.WARNING, logger="provbridge.dynsec")
    provision(bridge)
    provision(bridge)
    capsys.readouterr()
    assert run_cli(bridge.settings, "doctor") == 0, capsys.readouterr().out
    assert "mirror: ok (2 devices mirrored into dynamic security" in capsys.readouterr().out
    provision(bridge)
    assert run_cli(bridge.settings, "doctor") == 0, capsys.readouterr().out
    assert "mirror: WARN: 3 devices are mirrored into Mosquitto's dynamic security" in capsys.readouterr().out
    warned = lambda: [r for r in caplog.records if "3 devices are mirrored" in r.getMessage()]  # noqa: E731
    assert wait_for(warned, timeout=30), "the janitor did not warn"
    assert warned()[0].levelno == logging.WARNING and 'broker.mosquitto_auth = "jwt"' in warned()[0].getMessage()
