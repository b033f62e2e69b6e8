"""`broker.mosquitto_auth = "jwt"` on a real Mosquitto 2.0: the provbridge_jwt plugin (bridge/mosquitto/jwt)
verifies device tokens in Mosquitto, started from `provbridge mosquitto-config` output as is, and the
bridge mirrors nothing. Provisioning, bridge and ops accounts stay on dynamic security + the acl_file.

Skipped when Mosquitto is missing or the plugin cannot be built, except under CI, where that fails.
"""

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.config import Settings
from bridge.edges.sessions import Shard
from bridge.mosquitto.conf import JwtPlugin
from bridge.storage import keyfiles
from broker.errors import BrokerConfigError
from provwire import topics
from provwire.models import ClaimOk, Credentials
from tests.helpers.cli import run_cli
from tests.helpers.devices import Device, provision
from tests.helpers.mosquitto import MosquittoBridge, mosquitto_bridge
from tests.helpers.mosquitto_checks import (
    ops_user_reads_events_and_status_and_publishes_nothing,
    provisioning_client_is_held_to_its_own_client_id,
)
from tests.helpers.mqtt import ACCEPTED, NOT_AUTHORIZED, MqttClient, can_connect
from tests.helpers.refresh import RefreshingDevice
from tests.helpers.waiting import wait_for

# `jwt_mode` (tests/conftest.py): Mosquitto verifies device tokens with the provbridge_jwt plugin.


@pytest.fixture
def bridge(initialised: tuple[Settings, str], jwt_mode: None) -> Iterator[MosquittoBridge]:
    with mosquitto_bridge(*initialised, mosquitto_auth="jwt") as running:
        yield running


@pytest.fixture
def short_lived(initialised: tuple[Settings, str], jwt_mode: None) -> Iterator[MosquittoBridge]:
    """Tokens valid 2 s (below the configurable minimum, set directly)."""
    settings, key = initialised
    settings = settings.model_copy(update={"token": settings.token.model_copy(update={"ttl_seconds": 2})})
    with mosquitto_bridge(settings, key, mosquitto_auth="jwt") as running:
        yield running


def mirrored_devices(bridge: MosquittoBridge) -> list[str]:
    state = json.loads((bridge.mosquitto.conf_dir / "dynamic-security.json").read_text())
    return [c["username"] for c in state["clients"] if c["username"].startswith("dev_")]


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def es256(bridge: MosquittoBridge, claims: dict[str, Any], key: ec.EllipticCurvePrivateKey | None = None) -> str:
    return jwt.encode(
        claims, key or bridge.keys.token_key, algorithm="ES256", headers={"kid": bridge.keys.active_token}
    )


def test_claim_then_token_connect_then_publish_with_nothing_mirrored(bridge: MosquittoBridge) -> None:
    conf = (bridge.mosquitto.conf_dir / "mosquitto.conf").read_text()
    plugins = [line.split()[1] for line in conf.splitlines() if line.startswith("plugin ")]
    assert len(plugins) == 2 and plugins[0].endswith("provbridge_jwt.so")  # before dynamic security
    device_id, creds = provision(bridge)
    scope = f"devices/{device_id}/#"
    with MqttClient(bridge.port, device_id, device_id, creds.mqtt.token, v5=True) as conn:
        assert conn.connect()
        assert conn.subscribe(scope) == [1]
        assert conn.publish(f"devices/{device_id}/telemetry", b"hello") == 0
        assert conn.next_message()[:2] == (f"devices/{device_id}/telemetry", b"hello")
    assert mirrored_devices(bridge) == []
    assert "createClient" not in bridge.mosquitto.log()
    assert creds.mqtt.token not in bridge.mosquitto.log()


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
        assert aconn.subscribe(f"devices/{a_id}/+/x") == [1]  # covered by devices/<a>/#
        # Disallowed first, then allowed: the first message b sees must be the allowed one.
        assert aconn.publish(f"devices/{b_id}/cmd", b"intrusion") == NOT_AUTHORIZED
        assert aconn.publish(topics.claim_topic(bridge.prefix, a_id), b"{}") == NOT_AUTHORIZED
        assert aconn.publish(f"{bridge.prefix}/events/default/x", b"{}") == NOT_AUTHORIZED
        assert aconn.publish(f"devices/{a_id}/own", b"mine") in ACCEPTED
        assert bconn.publish(f"devices/{b_id}/cmd", b"own") == 0
        assert bconn.next_message()[:2] == (f"devices/{b_id}/cmd", b"own")
        assert bconn.messages.empty()
    # MQTT 3.1.1 cannot tell a refused publish: it is silently dropped, the next one delivered.
    with (
        MqttClient(bridge.port, b_id, b_id, b.mqtt.token) as bconn,
        MqttClient(bridge.port, a_id, a_id, a.mqtt.token) as aconn,
    ):
        assert bconn.connect() and aconn.connect()
        assert bconn.subscribe(f"devices/{b_id}/#") == [1]
        assert aconn.subscribe("devices/#") == [0x80]
        aconn.publish(f"devices/{b_id}/cmd", b"intrusion")
        bconn.publish(f"devices/{b_id}/cmd", b"own")
        assert bconn.next_message()[:2] == (f"devices/{b_id}/cmd", b"own")


def test_bad_tokens_and_client_ids_are_refused(bridge: MosquittoBridge) -> None:
    device_id, creds = provision(bridge)
    token = creds.mqtt.token
    real = claims_of(token)
    now = int(time.time())
    kid = bridge.keys.active_token
    other_key = ec.generate_private_key(ec.SECP256R1())
    header_none = b64url(json.dumps({"alg": "none", "kid": kid, "typ": "JWT"}).encode())
    body = token.split(".")[1]
    refused = {
        "forged (another key, same kid)": es256(bridge, real, other_key),
        "expired": es256(bridge, {**real, "iat": now - 100, "exp": now - 10}),
        "wrong aud": es256(bridge, {**real, "aud": "someone-else"}),
        "wrong iss": es256(bridge, {**real, "iss": "someone-else"}),
        "other subject": es256(bridge, {**real, "sub": "dev_" + "b" * 26}),
        "no exp": es256(bridge, {k: v for k, v in real.items() if k != "exp"}),
        "no acl": es256(bridge, {k: v for k, v in real.items() if k != "acl"}),
        "bad acl filter": es256(bridge, {**real, "acl": {"pub": ["a/#/b"], "sub": []}}),
        "iat in the future": es256(bridge, {**real, "iat": now + 3600}),
        "HS256": jwt.encode(real, "a-shared-secret-long-enough-for-hs256", algorithm="HS256", headers={"kid": kid}),
        "alg none": f"{header_none}.{body}.",
        "none, signature kept": f"{header_none}.{body}.{token.split('.')[2]}",
        "unknown kid": jwt.encode(real, bridge.keys.token_key, algorithm="ES256", headers={"kid": "nope"}),
        "truncated signature": token[:-4],
        "not a JWT": "not-a-jwt",
        "empty": "",
    }
    for what, bad in refused.items():
        assert not can_connect(bridge.port, device_id, device_id, bad), what
    assert not can_connect(bridge.port, "someone-else", device_id, token)  # client id != device id
    assert not can_connect(bridge.port, device_id, device_id, None)
    # A token in an array audience, re-signed by the real key, still connects: aud may be a list.
    assert can_connect(bridge.port, device_id, device_id, es256(bridge, {**real, "aud": ["x", real["aud"]]}))
    assert can_connect(bridge.port, device_id, device_id, token)
    log = bridge.mosquitto.log()
    assert f"refused {device_id}: token signature invalid" in log
    assert f"refused {device_id}: token expired" in log
    assert f"refused {device_id}: token algorithm must be ES256" in log
    assert token not in log and token.split(".")[2] not in log  # reasons and device ids only
    # Anonymous under a device's client id is only a provisioning client: none of the device's rights.
    with MqttClient(bridge.port, device_id, v5=True) as squatter:
        assert squatter.connect()
        assert squatter.subscribe(f"devices/{device_id}/#") == [NOT_AUTHORIZED]
        assert squatter.publish(f"devices/{device_id}/x", b"x") == NOT_AUTHORIZED


def test_cli_device_revoke_kicks_the_live_session_and_refuses_the_device(bridge: MosquittoBridge) -> None:
    device_id, creds = provision(bridge)
    other_id, other = provision(bridge)
    with MqttClient(bridge.port, device_id, device_id, creds.mqtt.token) as live:
        assert live.connect()
        assert run_cli(bridge.settings, "device", "revoke", device_id) == 0  # writes denylist.json only
        assert live.disconnected.wait(15), "the plugin must end the revoked device's live session"
    assert not can_connect(bridge.port, device_id, device_id, creds.mqtt.token)
    assert can_connect(bridge.port, other_id, other_id, other.mqtt.token)  # nobody else is touched
    assert bridge.store.device(device_id).status == "revoked"
    assert f"disconnecting {device_id}: device is revoked" in bridge.mosquitto.log()
    assert mirrored_devices(bridge) == []


def test_expired_token_session_is_ended(short_lived: MosquittoBridge) -> None:
    bridge = short_lived
    device_id, creds = provision(bridge)
    with MqttClient(bridge.port, device_id, device_id, creds.mqtt.token) as live:
        if live.connect():  # the token may already have expired: then the CONNECT is refused
            assert live.disconnected.wait(30), "the plugin must end the session of an expired token"
    assert wait_for(lambda: not can_connect(bridge.port, device_id, device_id, creds.mqtt.token), timeout=30)


def test_token_key_rotation_old_and_new_tokens_connect(bridge: MosquittoBridge) -> None:
    old_id, old = provision(bridge)
    old_kid = jwt.get_unverified_header(old.mqtt.token)["kid"]
    assert run_cli(bridge.settings, "keys", "rotate", "--token") == 0
    new_id, new = provision(bridge)  # the bridge signs with the new key from now on
    assert jwt.get_unverified_header(new.mqtt.token)["kid"] != old_kid  # the plugin re-read jwks.json
    assert can_connect(bridge.port, new_id, new_id, new.mqtt.token)
    assert can_connect(bridge.port, old_id, old_id, old.mqtt.token)  # the old key is still in the JWKS


def test_jwks_without_the_key_refuses_its_tokens(bridge: MosquittoBridge) -> None:
    device_id, creds = provision(bridge)
    jwks_file = bridge.settings.data_dir / "jwks.json"
    original = jwks_file.read_bytes()
    jwks_file.write_text(json.dumps({"keys": []}))
    try:
        assert wait_for(lambda: not can_connect(bridge.port, device_id, device_id, creds.mqtt.token))
    finally:
        jwks_file.write_bytes(original)
    assert wait_for(lambda: can_connect(bridge.port, device_id, device_id, creds.mqtt.token))


@pytest.mark.parametrize("login", [(None, None), ("provision", "provision")], ids=["anonymous", "provision"])
def test_provisioning_clients_behave_as_in_dynsec_mode(
    bridge: MosquittoBridge, login: tuple[str | None, str | None]
) -> None:
    provisioning_client_is_held_to_its_own_client_id(bridge, login)


def test_ops_user_behaves_as_in_dynsec_mode(bridge: MosquittoBridge, capsys: pytest.CaptureFixture[str]) -> None:
    ops_user_reads_events_and_status_and_publishes_nothing(bridge, capsys)
    assert mirrored_devices(bridge) == []


def test_refreshed_token_connects_and_nothing_is_mirrored(bridge: MosquittoBridge) -> None:
    device = RefreshingDevice(bridge)
    with device:
        device.provision()
        answer = device.send_refresh(device.refresh_payload())
    assert isinstance(answer, ClaimOk)
    fresh: Credentials = device.open(answer)
    assert can_connect(bridge.port, fresh.mqtt.client_id, fresh.mqtt.client_id, fresh.mqtt.token)
    assert mirrored_devices(bridge) == []


# --- the per-client-id publish limit (plugin_opt_publish_rate / _burst) -------------------------

FLOOD = 300


@pytest.fixture(params=[True, False], ids=["plugin-limit", "no-plugin-limit"])
def limited(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], jwt_mode: None
) -> Iterator[MosquittoBridge]:
    """The bridge's own flood limits on (claims.rate_limits, defaults 5/s burst 10), and with them the
    plugin's publish limit (2x: 10/s, burst 20); the second parameter turns both off: no plugin limit."""
    settings, key = initialised
    settings = settings.model_copy(update={"claims": settings.claims.model_copy(update={"rate_limits": request.param})})
    with mosquitto_bridge(settings, key, mosquitto_auth="jwt") as running:
        yield running


def plugin_limit(bridge: MosquittoBridge) -> tuple[float, int] | None:
    options = dict(
        line.split()[:2]
        for line in (bridge.mosquitto.conf_dir / "mosquitto.conf").read_text().splitlines()
        if line.startswith("plugin_opt_publish_")
    )
    if not options:
        return None
    return float(options["plugin_opt_publish_rate"]), int(options["plugin_opt_publish_burst"])


def test_a_flooding_client_is_cut_to_the_plugin_limit_and_nobody_else_is(limited: MosquittoBridge) -> None:
    bridge = limited
    limit = plugin_limit(bridge)
    assert limit == ((10.0, 20) if bridge.settings.claims.rate_limits else None)  # 2x claims.rate_client_*
    attacker = Device(bridge, client_id=f"flooder-{uuid.uuid4().hex[:8]}")
    own = topics.claim_topic(bridge.prefix, attacker.client_id)
    with MqttClient(bridge.port, attacker.client_id, v5=True) as conn:
        assert conn.connect()
        assert conn.subscribe(topics.response_topic(bridge.prefix, attacker.client_id)) == [1]
        payloads = [attacker.claim_payload("pk_" + uuid.uuid4().hex) for _ in range(FLOOD)]
        start = time.monotonic()
        # Handed to paho at once: it sends them as fast as its in-flight window lets it.
        mids = [conn.client.publish(own, p, 1).mid for p in payloads]
        codes = [conn.puback(mid, timeout=30) for mid in mids]
        elapsed = time.monotonic() - start
        passed = sum(code in ACCEPTED for code in codes)
        # Another client id is untouched, even while the flooder is beyond its limit.
        assert isinstance(provision(bridge)[1], Credentials)
        # A last claim from the flooder once a token is back: answers to one client arrive in order,
        # so when its answer is in, every earlier answer is too.
        marker = attacker.claim_payload("pk_" + uuid.uuid4().hex)
        assert wait_for(lambda: conn.publish(own, marker) in ACCEPTED, timeout=30)
        answers = []
        while True:
            answer = json.loads(conn.next_message()[1])
            if answer["request_id"] == json.loads(marker)["request_id"]:
                break
            answers.append(answer)
    print(f"\n{FLOOD} claims in {elapsed:.2f} s, limit {limit}: {passed} passed Mosquitto, {len(answers)} answered")
    assert len(answers) == passed  # what passed reached the bridge and was answered; nothing else did
    if limit is None:
        assert passed == FLOOD  # the control: without the plugin's limit every claim reaches the bridge
        return
    rate, burst = limit
    assert set(codes) <= {*ACCEPTED, NOT_AUTHORIZED}
    assert passed <= burst + rate * elapsed + 2, (passed, elapsed)
    assert passed < FLOOD // 2
    # The bridge answered rate_limited first: its own limit (5/s, burst 10) is the tighter one.
    assert sum(a.get("code") == "rate_limited" for a in answers) > 0
    assert f"client '{attacker.client_id}' beyond" in bridge.mosquitto.log()


def test_the_bridge_answers_a_burst_of_claims_beyond_any_client_limit(limited: MosquittoBridge) -> None:
    """The bridge's own publishes (answers, events: many a second) are never limited by the plugin."""
    bridge = limited
    devices = [Device(bridge) for _ in range(60)]
    try:
        for d in devices:
            d.__enter__()
        for d in devices:  # all published before any is answered
            d.conn.client.publish(
                topics.claim_topic(bridge.prefix, d.client_id), d.claim_payload(bridge.provision_key), 1
            )
        for d in devices:
            _topic, raw = d.conn.next_message()
            assert json.loads(raw)["status"] == "ok", raw
    finally:
        for d in devices:
            d.__exit__()
    assert bridge.store.count("devices") == 60


def test_publish_limit_options_need_the_bridge_username_and_are_absent_when_off() -> None:
    base = {"plugin": "/p.so", "jwks_file": "/j", "denylist_file": "/d", "audience": "a", "issuer": "i"}
    lines = JwtPlugin(**base, bridge_username="bridge", publish_rate=10.0, publish_burst=20).lines()
    assert "plugin_opt_publish_rate 10" in lines and "plugin_opt_publish_burst 20" in lines
    assert "plugin_opt_bridge_username bridge" in lines
    off = JwtPlugin(**base, bridge_username="bridge").lines()
    assert not any(line.startswith("plugin_opt_publish_") for line in off)
    with pytest.raises(BrokerConfigError):
        JwtPlugin(**base, publish_rate=10.0, publish_burst=20).lines()  # the bridge would be limited too


def test_devices_own_traffic_is_not_limited_by_the_plugin(limited: MosquittoBridge) -> None:
    """A device holds a token the bridge issued (and can revoke): its publishes are its owner's to size."""
    bridge = limited
    _device_id, creds = provision(bridge)
    mqtt_creds = creds.mqtt
    own = mqtt_creds.publish[0].replace("#", "telemetry").replace("+", "x")
    with MqttClient(bridge.port, mqtt_creds.client_id, mqtt_creds.username, mqtt_creds.token, v5=True) as conn:
        assert conn.connect()
        mids = [conn.client.publish(own, b"%d" % n, 1).mid for n in range(3 * 20)]  # 3x the plugin's burst
        assert all(conn.puback(mid, timeout=30) in ACCEPTED for mid in mids)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"], ids=["bridge-mqtt5", "bridge-mqtt3.1.1"])
def test_the_bridge_comes_back_after_mosquitto_ends_its_session(
    initialised: tuple[Settings, str], jwt_mode: None, protocol: str
) -> None:
    """Someone logs in with the bridge's client id (and its secret): Mosquitto closes the bridge's
    connection. Once the intruder is gone the default edge reconnects by itself and answers the claims
    that queued in its session meanwhile (a DISCONNECT packet instead: tests/test_external_edge.py)."""
    with mosquitto_bridge(*initialised, protocol=protocol) as bridge:
        settings = bridge.settings
        secret = keyfiles.read_secret(settings.bridge_secret_file)
        # Without a clean session: the bridge's session, and the claims that queue in it meanwhile, survive.
        client_id = Shard().client_id(settings)
        intruder = MqttClient(bridge.port, client_id, settings.broker.username, secret, clean_session=False)
        with intruder:
            assert intruder.connect()
        provision(bridge)  # answered once the bridge is back (its first retry waits a second)
