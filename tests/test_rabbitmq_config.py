"""What provbridge tells RabbitMQ, without a cluster: topics as routing keys, token scopes, the claimant's topic
permissions, `provbridge rabbitmq-config`'s files, and the settings it refuses. The cluster itself runs these in
tests/test_rabbitmq_bridge.py (make test-full)."""

import base64
import hashlib
import json
import re
import time
from pathlib import Path

import jwt
import pytest

from bridge.claims.credentials import rabbitmq_scope
from bridge.config import BrokerSettings, Settings, load_settings
from bridge.errors import ConfigError, UnscopableFilter
from bridge.rabbitmq import conf
from bridge.rabbitmq_scopes import (
    binding_key,
    device_scopes,
    filter_pattern,
    mqtt_topic,
    routing_key,
)
from bridge.storage import keyfiles
from bridge.tokens import mint_token
from tests.helpers.cli import cli_json, cli_run


def test_topics_become_routing_keys_as_rabbitmq_s_mqtt_plugin_writes_them() -> None:
    assert routing_key("prov/v1/claim/c.1") == "prov.v1.claim.c/1"
    assert mqtt_topic("prov.v1.claim.c/1") == "prov/v1/claim/c.1"
    assert binding_key("prov/v1/claim/+") == "prov.v1.claim.*"
    assert binding_key("a.b/#") == "a/b.#"


@pytest.mark.parametrize(
    ("topic_filter", "pattern"),
    [
        ("devices/dev_x/#", "devices.dev_x.*"),
        ("devices/dev_x/state", "devices.dev_x.state"),
        ("#", "*"),
        ("acme.io/dev_x/#", "acme%2Fio.dev_x.*"),  # a literal "/" in a routing key cannot split the scope
        ("a*b/c d/e%", "a%2Ab.c%20d.e%25"),  # literal: no wildcard, no second scope, no escape
    ],
)
def test_filters_become_scope_patterns_matching_exactly_their_topics(topic_filter: str, pattern: str) -> None:
    assert filter_pattern(topic_filter) == pattern


@pytest.mark.parametrize("topic_filter", ["devices/+/state", "+", "devices/#/x", "devices/a+b", "devices/a#"])
def test_filters_rabbitmq_cannot_express_are_refused(topic_filter: str) -> None:
    with pytest.raises(UnscopableFilter):
        filter_pattern(topic_filter)


def test_a_device_s_scopes_name_its_vhost_exchange_topics_and_own_queues_only() -> None:
    scopes = device_scopes(
        resource_server_id="provbridge-mqtt",
        vhost="provbridge",
        exchange="amq.topic",
        prefix="prov/v1",
        device_id="dev_abc",
        publish=["devices/dev_abc/#"],
        subscribe=["devices/dev_abc/#", "fleet/broadcast"],
    )
    assert scopes == [
        "provbridge-mqtt.write:provbridge/amq.topic/devices.dev_abc.*",
        "provbridge-mqtt.write:provbridge/amq.topic/prov.v1.token.dev_abc",
        "provbridge-mqtt.read:provbridge/amq.topic/devices.dev_abc.*",
        "provbridge-mqtt.read:provbridge/amq.topic/fleet.broadcast",
        "provbridge-mqtt.read:provbridge/amq.topic/prov.v1.res.dev_abc",
        "provbridge-mqtt.configure:provbridge/mqtt-subscription-dev_abcqos*",
        "provbridge-mqtt.write:provbridge/mqtt-subscription-dev_abcqos*",
        "provbridge-mqtt.read:provbridge/mqtt-subscription-dev_abcqos*",
    ]
    assert not any(" " in scope or "/*/" in scope for scope in scopes)  # one scope each, never any vhost or exchange


def rabbit(settings: Settings) -> Settings:
    return settings.model_copy(update={"broker": settings.broker.model_copy(update={"mode": "rabbitmq"})})


def test_tokens_carry_a_scope_on_rabbitmq_only(settings: Settings) -> None:
    key = keyfiles.load_keys(settings.data_dir).token_key
    common = {"key": key, "kid": "k", "issuer": "i", "audience": "provbridge-mqtt", "device_id": "dev_a"}
    scope_args = ("dev_a", ["devices/dev_a/#"], ["devices/dev_a/#"])
    assert rabbitmq_scope(settings, *scope_args) is None  # embedded: the token is as before
    scope = rabbitmq_scope(rabbit(settings), *scope_args)
    assert scope is not None
    now = int(time.time())
    grant = mint_token(**common, tenant="t", publish=[], subscribe=[], now=now, ttl_seconds=60, scope=scope)
    claims = jwt.decode(grant.token, key.public_key(), algorithms=["ES256"], audience="provbridge-mqtt")
    assert claims["scope"] == " ".join(scope)
    assert "acl" in claims
    plain = mint_token(**common, tenant="t", publish=[], subscribe=[], now=now, ttl_seconds=60)
    assert "scope" not in jwt.decode(plain.token, key.public_key(), algorithms=["ES256"], audience="provbridge-mqtt")


def test_a_profile_rabbitmq_cannot_scope_is_refused_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "provbridge.toml"
    config.write_text('[broker]\nmode = "rabbitmq"\n[profiles.default]\npublish = ["devices/+/state"]\n')
    with pytest.raises(ConfigError, match=r"profile 'default'.*'\+'.*rabbitmq"):
        load_settings(config)
    config.write_text('[profiles.default]\npublish = ["devices/+/state"]\n')
    assert load_settings(config).broker.mode == "embedded"  # elsewhere "+" is fine


@pytest.mark.parametrize("vhost", ["/", "a/b", "*", ""])
def test_a_vhost_a_scope_cannot_name_is_refused(tmp_path: Path, vhost: str) -> None:
    config = tmp_path / "provbridge.toml"
    config.write_text(f'[broker]\nmode = "rabbitmq"\n[rabbitmq]\nvhost = "{vhost}"\n')
    with pytest.raises(ConfigError, match=r"rabbitmq\.vhost"):
        load_settings(config)


def test_the_claimant_may_use_one_claim_refresh_and_response_topic_and_nothing_else() -> None:
    write, read = (re.compile(p) for p in conf.claimant_topics("prov/v1"))
    assert write.match("prov.v1.claim.c1") and write.match("prov.v1.claim.c/1")  # client id "c.1"
    assert write.match("prov.v1.token.c1")  # a refresh by a device whose token expired
    assert read.match("prov.v1.res.c1")
    for key in [
        "prov.v1.claim.*",
        "prov.v1.claim.#",
        "prov.v1.claim.a.b",
        "prov.v1.res.c1",
        "devices.x.y",
        "prov.v1",
        "prov.v1.events.t.e",
        "prov.v1.status.bridge",
        "prov.v1.token.*",
    ]:
        assert not write.match(key), key
    for key in ["prov.v1.res.*", "prov.v1.res.#", "prov.v1.claim.c1", "prov.v1.token.c1", "prov.v1.res.a.b"]:
        assert not read.match(key), key


def test_passwords_are_hashed_as_rabbitmq_hashes_them() -> None:
    salt = bytes.fromhex("908d c60a".replace(" ", ""))
    hashed = base64.b64decode(conf.password_hash("test12", salt))
    assert hashed == salt + hashlib.sha256(salt + b"test12").digest()  # rabbit_password_hashing_sha256


def test_rabbitmq_config_writes_what_every_node_needs(capsys: pytest.CaptureFixture[str], settings: Settings) -> None:
    settings = rabbit(settings)
    out = settings.data_dir.parent / "rabbitmq"
    done = cli_json(capsys, settings, "rabbitmq-config", str(out), "--broker-dir", "/etc/rabbitmq/provbridge")
    ring = keyfiles.load_keys(settings.data_dir)
    assert sorted(done["signing_keys"]) == sorted(ring.token)  # the next token key too: published before it signs
    lines = (out / "rabbitmq.conf").read_text().splitlines()
    for kid in ring.token:
        assert f"auth_oauth2.signing_keys.{kid} = /etc/rabbitmq/provbridge/token-{kid}.pem" in lines
        assert (out / f"token-{kid}.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert f"auth_oauth2.resource_server_id = {settings.token.audience}" in lines
    assert "load_definitions = /etc/rabbitmq/provbridge/definitions.json" in lines
    assert "mqtt.vhost = provbridge" in lines
    definitions = json.loads((out / "definitions.json").read_text())
    bridge = next(u for u in definitions["users"] if u["name"] == settings.broker.username)
    secret = keyfiles.read_secret(settings.bridge_secret_file)
    raw = base64.b64decode(bridge["password_hash"])
    assert raw[4:] == hashlib.sha256(raw[:4] + secret.encode()).digest()  # the bridge logs in with its secret
    assert secret not in (out / "definitions.json").read_text() + (out / "rabbitmq.conf").read_text()
    assert (out / "definitions.json").stat().st_mode & 0o077 == 0  # password hashes
    assert (out / "rabbitmq.conf").stat().st_mode & 0o077 == 0  # the claimant's password
    assert "rabbitmq_auth_backend_oauth2" in (out / "enabled_plugins").read_text()


def test_rabbitmq_config_needs_an_initialised_data_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    settings = rabbit(Settings(data_dir=tmp_path / "nothing", broker=BrokerSettings()))
    code, _, err = cli_run(capsys, settings, "rabbitmq-config", str(tmp_path / "out"))
    assert code != 0 and "provbridge init" in err and "Traceback" not in err


def test_provisioning_clients_cannot_use_a_device_s_subscription_queues() -> None:
    """A provisioning client connecting with a device's client id and a persistent session would resume the device's
    queue: the claimant's queue permissions leave out device ids (`dev_...`)."""
    config = conf.RabbitConfig(
        vhost="provbridge",
        exchange="amq.topic",
        queue="provbridge.claims",
        prefix="prov/v1",
        audience="provbridge-mqtt",
        bridge_user="provbridge-bridge",
        bridge_password_hash="x",
        claimant_password="y",
        signing_keys={},
        definitions_path="/d.json",
    )
    [claimant] = [p for p in conf.definitions(config)["permissions"] if p["user"] == conf.CLAIMANT_USER]
    for permission in ("configure", "write", "read"):
        pattern = re.compile(claimant[permission])  # Erlang's re and Python's agree on this lookahead
        assert pattern.match("mqtt-subscription-c1qos1"), permission
        assert not pattern.match("mqtt-subscription-dev_abcqos1"), permission


def test_the_claimant_password_is_the_same_on_every_run(capsys: pytest.CaptureFixture[str], settings: Settings) -> None:
    settings = rabbit(settings)
    first, second = settings.data_dir.parent / "r1", settings.data_dir.parent / "r2"
    for out in (first, second):
        cli_json(capsys, settings, "rabbitmq-config", str(out))

    def default_pass(out: Path) -> str:
        return next(line for line in (out / "rabbitmq.conf").read_text().splitlines() if "default_pass" in line)

    assert default_pass(first) == default_pass(second)  # nodes of an earlier run keep accepting provisioning clients
    assert keyfiles.read_secret(settings.bridge_secret_file) not in default_pass(first)


def test_a_host_id_without_the_fleet_s_processes_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "provbridge.toml"
    config.write_text('[broker]\nmode = "external"\nhost_id = "h2"\n')
    with pytest.raises(ConfigError, match="fleet_processes"):
        load_settings(config)
    config.write_text('[broker]\nmode = "external"\nhost_id = "h2"\n[claims]\nfleet_processes = 2\n')
    assert load_settings(config).broker.host_id == "h2"
