"""`provbridge mosquitto-config`: rules derived from broker.acl (no drift), files, hashes, TLS, and how
the mirror fails when the broker does not confirm."""

import json
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import DEFAULT_MAX_PACKET_BYTES, Settings, claim_packet_bytes, load_settings
from bridge.errors import ConfigError, MirrorError
from bridge.mosquitto import conf as mc
from bridge.mosquitto import jwt as mosquitto_jwt
from bridge.mosquitto.dynsec import NOT_FOUND, admin_channel, revoke_commands, revoke_on_mosquitto
from bridge.mosquitto.files import ops_user_created, write_mosquitto_config
from bridge.ops import admin
from bridge.storage import keyfiles
from bridge.storage.store import Store
from broker import acl
from provwire import topics
from provwire.errors import ErrorCode
from provwire.models import MAX_CLAIM_BYTES, ClaimError, ClaimOk
from tests.helpers.bridge import make_settings, serving
from tests.helpers.cli import run_cli
from tests.helpers.devices import Device
from tests.helpers.mosquitto import (
    MosquittoBridge,
    external_settings,
    mosquitto_bridge,
    mosquitto_for,
    require_mosquitto,
    running_mosquitto,
)
from tests.helpers.mqtt import TIMEOUT, MqttClient, request_properties
from tests.helpers.raw_mqtt import remaining_length
from tests.helpers.waiting import wait_for

PREFIXES = ["prov/v1", "acme/provisioning/v2"]


# --- the rules, derived from the role table -----------------------------------------------------


def _allowed(role: dict[str, object]) -> dict[mc.AclType, set[str]]:
    return mc.allowed_filters(role)  # type: ignore[arg-type]


def _as_grant_sets(grant: acl.Grant) -> dict[mc.AclType, set[str]]:
    return {
        mc.AclType.PUBLISH: set(grant.publish),
        mc.AclType.SUBSCRIBE: set(grant.subscribe),
        mc.AclType.RECEIVE: set(grant.receive),
    }


def _closes(role: dict[str, object], types: tuple[mc.AclType, ...] = tuple(mc.AclType)) -> bool:
    denies = {(a["acltype"], a["topic"]) for a in role["acls"] if not a["allow"]}  # type: ignore[attr-defined]
    return all((t.value, f) in denies for t in types for f in mc.CLOSING_DENY_FILTERS)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_mosquitto_roles_equal_the_embedded_brokers_grants(prefix: str) -> None:
    control = {
        mc.AclType.PUBLISH: {mc.CONTROL_TOPIC},
        mc.AclType.SUBSCRIBE: {mc.CONTROL_RESPONSE_TOPIC},
        mc.AclType.RECEIVE: {mc.CONTROL_RESPONSE_TOPIC},
    }
    bridge_role = mc.bridge_role(prefix, "provbridge-bridge")
    expected = _as_grant_sets(acl.bridge_grant(prefix, "provbridge-bridge"))
    # Mosquitto only: several bridge processes share the presence the provbridge_jwt plugin publishes.
    expected[mc.AclType.SUBSCRIBE].add(f"$share/+/{topics.presence_subscription(prefix)}")
    assert _allowed(bridge_role) == {t: expected[t] | control[t] for t in mc.AclType}
    assert _allowed(mc.ops_role(prefix)) == _as_grant_sets(acl.ops_grant(prefix, "anyone"))

    claims = {"acl": {"pub": ["devices/d1/up/#", "fleet/+/d1"], "sub": ["devices/d1/down/#"]}, "exp": 2_000_000_000}
    device = acl.device_grant("dev_d1", claims)
    role = mc.device_role(
        "dev_d1", mc.device_grant("dev_d1", ["devices/d1/up/#", "fleet/+/d1"], ["devices/d1/down/#"], 2_000_000_000)
    )
    assert _allowed(role) == _as_grant_sets(device)
    for closed in (bridge_role, mc.ops_role(prefix), role):
        assert _closes(closed), "dynamic security must never defer to the acl_file for these accounts"

    # Provisioning: the acl_file's patterns are provisioning_grant with %c for the client id ...
    cid = f"c-{uuid.uuid4().hex[:16]}"
    grant = acl.provisioning_grant(prefix, cid)
    text = mc.acl_file_text(prefix)
    writes = {line.split()[-1].replace("%c", cid) for line in text.splitlines() if line.startswith("pattern write")}
    reads = {line.split()[-1].replace("%c", cid) for line in text.splitlines() if line.startswith("pattern read")}
    assert writes == set(grant.publish) and reads == set(grant.receive)
    # ... and its role only narrows SUBSCRIBE (the acl_file cannot), leaving publish and delivery to it.
    provisioning = mc.provisioning_role(prefix)
    allowed = _allowed(provisioning)
    assert allowed[mc.AclType.PUBLISH] == allowed[mc.AclType.RECEIVE] == set()
    assert {f.replace("+", cid) for f in allowed[mc.AclType.SUBSCRIBE]} == set(grant.subscribe)
    assert _closes(provisioning, (mc.AclType.SUBSCRIBE,))
    assert all(a["acltype"] == mc.AclType.SUBSCRIBE.value for a in provisioning["acls"])  # type: ignore[index]


def test_password_hashes_are_the_ones_mosquitto_computes(tmp_path: Path) -> None:
    require_mosquitto()
    ctrl = shutil.which("mosquitto_ctrl")
    assert ctrl, "mosquitto_ctrl ships with the mosquitto package"
    path = tmp_path / "init.json"
    subprocess.run([ctrl, "dynsec", "init", str(path), "admin", "s3cret-pass"], check=True, capture_output=True)
    stored = mc.PasswordHash.from_json(json.loads(path.read_text())["clients"][0])
    assert mc.password_matches("s3cret-pass", stored)
    assert not mc.password_matches("s3cret-pasS", stored)
    ours = mc.hash_password("s3cret-pass", salt=b"0123456789ab")
    assert ours.iterations == mc.PBKDF2_ITERATIONS and mc.password_matches("s3cret-pass", ours)
    assert "s3cret" not in repr(ours)


# --- the files ----------------------------------------------------------------------------------


def test_generated_files_modes_accounts_and_directives(
    initialised: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = external_settings(initialised[0])
    ops_password = admin.create_ops_user(settings, "auditor")
    ops_user_created(settings, "auditor", ops_password)
    admin.create_ops_user(settings, "legacy")  # made without its dynamic-security hash
    outdir = settings.data_dir.parent / "mosq"
    capsys.readouterr()
    assert run_cli(settings, "mosquitto-config", str(outdir), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ops_users"] == ["auditor"] and report["ops_missing"] == ["legacy"]

    assert outdir.stat().st_mode & 0o777 == 0o700
    state_file = outdir / mc.DYNSEC_FILE
    assert state_file.stat().st_mode & 0o777 == 0o600
    state = json.loads(state_file.read_text())
    clients = {c["username"]: c for c in state["clients"]}
    secret = keyfiles.read_secret(settings.bridge_secret_file)
    assert mc.password_matches(secret, mc.PasswordHash.from_json(clients[settings.broker.username]))
    assert mc.password_matches(mc.PROVISION_PASSWORD, mc.PasswordHash.from_json(clients["provision"]))
    assert mc.password_matches(ops_password, mc.PasswordHash.from_json(clients["auditor"]))
    assert "legacy" not in clients
    assert state["anonymousGroup"] == mc.PROVISIONING_GROUP
    assert not any(state["defaultACLAccess"][k] for k in ("publishClientSend", "publishClientReceive", "subscribe"))
    everything = "".join(p.read_text() for p in outdir.iterdir())
    assert secret not in everything and ops_password not in everything

    conf = (outdir / mc.CONF_FILE).read_text().splitlines()
    for line in (
        f"listener {settings.broker.port} 127.0.0.1",
        "allow_anonymous true",
        f"plugin_opt_config_file {outdir}/dynamic-security.json",
        f"acl_file {outdir}/provisioning.acl",
        "persistence true",
        f"persistence_location {outdir}/",
        "max_queued_messages 100000",
        "set_tcp_nodelay true",
        f"max_packet_size {settings.broker.max_packet_bytes}",
    ):
        assert line in conf, line
    assert not any(line.startswith("listener") and str(settings.broker.tls_port) in line for line in conf)

    closed = settings.model_copy(
        update={"broker": settings.broker.model_copy(update={"allow_anonymous_provisioning": False})}
    )
    write_mosquitto_config(closed, outdir, broker_dir="/mosquitto/config", bind="0.0.0.0", plugin="/x/dynsec.so")
    conf_text = (outdir / mc.CONF_FILE).read_text()
    assert "allow_anonymous false" in conf_text and "acl_file /mosquitto/config/provisioning.acl" in conf_text
    assert f"listener {settings.broker.port} 0.0.0.0" in conf_text and "plugin /x/dynsec.so" in conf_text
    assert "anonymousGroup" not in json.loads(state_file.read_text())


def test_regenerating_carries_over_mirrored_devices_only() -> None:
    accounts = mc.DynsecAccounts(
        prefix="prov/v1",
        bridge_username="provbridge-bridge",
        bridge_password=mc.hash_password("a"),
        provision_password=mc.hash_password(mc.PROVISION_PASSWORD),
    )
    old = mc.dynsec_config(accounts)
    grant = mc.device_grant("dev_x", ["devices/dev_x/#"], ["devices/dev_x/#"], 2_000_000_000)
    old["clients"].append({"username": "dev_x", "textname": mc.DEVICE_TEXTNAME, "roles": []})
    old["clients"].append({"username": "stranger", "textname": "made by hand"})
    old["roles"].append(mc.device_role("dev_x", grant))
    fresh = mc.carry_over_devices(mc.dynsec_config(accounts), old)
    names = [c["username"] for c in fresh["clients"]]
    assert names.count("dev_x") == 1 and "stranger" not in names and names.count("provbridge-bridge") == 1
    assert mc.device_role_name("dev_x") in {r["rolename"] for r in fresh["roles"]}


def test_config_refuses_what_mosquitto_could_not_read(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        mc.mosquitto_conf_text(
            mc.ConfSettings(bind="127.0.0.1", port=1883, tls=None, broker_dir="/a b", plugin="p", allow_anonymous=True)
        )
    with pytest.raises(ValueError, match="no listener"):
        mc.mosquitto_conf_text(
            mc.ConfSettings(bind="127.0.0.1", port=None, tls=None, broker_dir="/a", plugin="p", allow_anonymous=True)
        )
    settings_dir = tmp_path / "not-initialised"
    assert run_cli(make_settings(settings_dir), "mosquitto-config", str(tmp_path / "out")) == 1


# --- the packet size bound ---------------------------------------------------------------------------


def test_the_packet_bound_is_a_maximal_claim_plus_headroom(tmp_path: Path) -> None:
    defaults = load_settings(None).broker.max_packet_bytes
    assert defaults == DEFAULT_MAX_PACKET_BYTES == MAX_CLAIM_BYTES + 4096
    assert claim_packet_bytes("prov/v1") == 1 + 3 + 2 + len("prov/v1/claim/") + 64 + 2 + MAX_CLAIM_BYTES
    long_prefix = "p" * 5000
    assert claim_packet_bytes(long_prefix) > defaults  # such a prefix needs a larger bound, and is told so
    config = tmp_path / "small.toml"
    config.write_text(f'topic_prefix = "{long_prefix}"\n')
    with pytest.raises(ConfigError, match="max_packet_bytes must be at least"):
        load_settings(config)
    config.write_text("[broker]\nmax_packet_bytes = 16384\n")  # a claim alone, without its topic
    with pytest.raises(ConfigError, match=f"at least {claim_packet_bytes('prov/v1')}"):
        load_settings(config)


def padded_to(payload: bytes, size: int) -> bytes:
    """The same JSON object, `size` bytes long: spaces after its opening brace."""
    assert payload.startswith(b"{") and len(payload) <= size
    return b"{" + b" " * (size - len(payload)) + payload[1:]


def client_events(store: Store, client_id: str) -> list[dict[str, object]]:
    return [e for e in store.events(limit=1000) if e.get("client_id") == client_id]


def test_mosquitto_disconnects_a_client_whose_packet_is_over_the_bound(initialised: tuple[Settings, str]) -> None:
    """`max_packet_size` in the generated mosquitto.conf: a claim of the largest valid size on the longest
    client id passes (3.1.1, and MQTT 5 with a Response Topic and 1 KiB of Correlation Data); a larger
    packet gets its client disconnected and never reaches the bridge; a CONNECT announcing 100 MB is cut off
    after its first bytes, before anyone authenticated."""
    settings, key = initialised
    with mosquitto_bridge(settings, key, dynsec=False) as bridge:
        limit = bridge.settings.broker.max_packet_bytes
        prefix = bridge.prefix

        # The largest valid claim, on a 64-character client id (the largest claim packet there is).
        with Device(bridge, client_id="c" * 64) as device:
            payload = padded_to(device.claim_payload(key), MAX_CLAIM_BYTES)
            answer = json.loads(device.send(payload))
            assert answer["status"] == "ok", answer
        with Device(bridge, client_id="m" * 64) as device, MqttClient(bridge.port, device.client_id, v5=True) as v5:
            assert v5.connect()
            assert v5.subscribe(topics.response_topic(prefix, device.client_id)) == [1]
            payload = padded_to(device.claim_payload(key), MAX_CLAIM_BYTES)
            reply_to = topics.response_topic(prefix, device.client_id)
            props = request_properties(reply_to, b"c" * 1024)
            assert v5.publish(topics.claim_topic(prefix, device.client_id), payload, props) in (0x00, 0x10)
            _topic, raw = v5.next_message()
            assert json.loads(raw)["status"] == "ok"

        # Over the claim limit but under the packet bound: it reaches the bridge, which answers and records
        # it (so the check below would see an oversized claim that got through).
        with Device(bridge, client_id="c-control") as device:
            answer = json.loads(device.send(padded_to(device.claim_payload(key), MAX_CLAIM_BYTES + 1)))
            assert answer["code"] == ErrorCode.VALIDATION_ERROR.value
        assert wait_for(lambda: client_events(bridge.store, "c-control") != [])

        # Over the packet bound: disconnected, no PUBACK, nothing handled.
        with MqttClient(bridge.port, "c-oversized") as big:
            assert big.connect()
            big.client.publish(topics.claim_topic(prefix, "c-oversized"), b"{" + b" " * limit + b"}", 1)
            assert big.disconnected.wait(TIMEOUT), "Mosquitto kept a client that sent an oversized packet"
        assert "disconnected due to oversize packet" in bridge.mosquitto.log()
        with Device(bridge) as after:  # handled after the oversized message, had it been delivered
            assert isinstance(after.claim(key), ClaimOk)
        assert client_events(bridge.store, "c-oversized") == []

        # Before CONNECT: a header announcing a 100 MB CONNECT is refused at once, not buffered.
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"\x10" + remaining_length(100_000_000) + b"\x00\x04MQTT")
            try:
                assert sock.recv(1) == b"", "Mosquitto answered instead of closing"
            except ConnectionResetError:
                pass  # closed with unread bytes: a reset
            except TimeoutError:
                pytest.fail("Mosquitto waited for the rest of a 100 MB CONNECT")


def test_the_bridges_own_command_batches_fit_the_packet_bound(initialised: tuple[Settings, str]) -> None:
    """The bridge account is bound by `max_packet_size` too: a janitor pass over a herd's expired tokens
    (here 150 devices, 450 commands, about 40 KB as one message) is sent in messages under the bound, and
    answered command by command, in order, on a connection Mosquitto keeps."""
    settings = external_settings(initialised[0])
    devices = [f"dev_{n:026d}" for n in range(150)]
    commands = [command for device in devices for command in revoke_commands(device)]
    assert len(json.dumps({"commands": commands})) > settings.broker.max_packet_bytes
    with mosquitto_for(settings) as running, admin_channel(settings) as channel:
        answers = channel.call(commands)
        assert [a["command"] for a in answers] == [c["command"] for c in commands]
        assert all(a.get("error") in NOT_FOUND for a in answers), answers[:3]
        assert channel.call([{"command": "listClients"}])[0].get("error") is None  # still connected
    assert "oversize" not in running.log()


# --- TLS, and failures ----------------------------------------------------------------------------


@pytest.fixture
def tls_bridge(initialised: tuple[Settings, str]) -> Iterator[MosquittoBridge]:
    settings, key = initialised
    assert run_cli(external_settings(settings), "tls", "init") == 0
    with mosquitto_bridge(settings, key, tls_listen="auto") as running:
        yield running


def test_tls_listener_from_the_data_dirs_certificate(tls_bridge: MosquittoBridge) -> None:
    bridge = tls_bridge
    conf = (bridge.mosquitto.conf_dir / mc.CONF_FILE).read_text()
    assert f"listener {bridge.settings.broker.tls_port} 127.0.0.1" in conf
    assert (bridge.mosquitto.conf_dir / "server.key").stat().st_mode & 0o777 == 0o600
    with Device(bridge) as device:
        answer = device.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk)
    creds = device.open(answer).mqtt
    assert creds.tls and creds.port == bridge.settings.broker.tls_port  # devices are sent to TLS
    ca = bridge.settings.data_dir / "tls" / "ca.pem"
    with MqttClient(creds.port, creds.client_id, creds.username, creds.token, ca_file=ca) as conn:
        assert conn.connect()
        assert conn.subscribe(f"devices/{creds.client_id}/#") == [1]


def test_a_broker_that_never_confirms_rolls_the_claim_back(initialised: tuple[Settings, str]) -> None:
    """A Mosquitto whose bridge role lost its $CONTROL rights silently drops the mirror's commands:
    the claim waits `dynsec_timeout_seconds`, answers a retryable error, and nothing was created."""
    settings, key = initialised
    settings = external_settings(
        settings, mosquitto_auth="dynsec", dynsec_timeout_seconds=0.5, dynsec_janitor_seconds=60
    )
    conf_dir = settings.data_dir.parent / "mosquitto"
    assert run_cli(settings, "mosquitto-config", str(conf_dir)) == 0
    state_file = conf_dir / mc.DYNSEC_FILE
    state = json.loads(state_file.read_text())
    for role in state["roles"]:
        if role["rolename"] == mc.BRIDGE_ROLE:
            # Only the right to send commands: with its response subscription refused too, the bridge
            # would (rightly) not take claims at all.
            role["acls"] = [
                a
                for a in role["acls"]
                if not (a["topic"].startswith("$CONTROL/dynamic") and a["acltype"] == "publishClientSend")
            ]
    keyfiles.write_private(state_file, json.dumps(state).encode())
    with running_mosquitto(conf_dir, settings.broker.port) as broker, serving(settings):
        store = Store(settings.database)
        try:
            bridge = MosquittoBridge(settings, store, keyfiles.load_keys(settings.data_dir), key, broker)
            with Device(bridge) as device:
                answer = device.claim(key)
            assert isinstance(answer, ClaimError) and answer.code is ErrorCode.INTERNAL_ERROR
            assert answer.retry_after
            assert store.count("devices") == 0  # the claim's transaction rolled back
        finally:
            store.close()
    assert "dev_" not in state_file.read_text()


def test_revoke_on_mosquitto_without_a_broker_is_a_mirror_error(initialised: tuple[Settings, str]) -> None:
    settings = external_settings(initialised[0], dynsec_timeout_seconds=2)
    with pytest.raises(MirrorError, match=r"cannot reach|did not answer"):
        revoke_on_mosquitto(settings, "dev_nobody")
    assert topics.is_valid_client_id("dev_nobody")


def test_without_the_plugins_build_tools_the_config_says_what_to_install_or_opt_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default (jwt) needs the provbridge_jwt plugin: on a machine with no build of it, none installed
    and no `make`, `mosquitto-config` writes nothing and says what to install, or which opt-in avoids it."""
    settings = make_settings(tmp_path / "data")  # not external_settings: it would build the plugin first
    broker = settings.broker.model_copy(update={"mode": "external", "tls_listen": "off"})
    settings = settings.model_copy(update={"broker": broker})
    assert settings.broker.mosquitto_auth == "jwt"  # the default
    assert run_cli(settings, "init") == 0
    monkeypatch.setattr(mosquitto_jwt, "BUILD_OUTPUT", tmp_path / "no-build" / mosquitto_jwt.PLUGIN_NAME)
    monkeypatch.setattr(mosquitto_jwt, "INSTALLED_GLOBS", ())
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    capsys.readouterr()
    outdir = tmp_path / "mosquitto"
    assert run_cli(settings, "mosquitto-config", str(outdir)) == 1
    err = capsys.readouterr().err
    assert "cannot build the provbridge_jwt Mosquitto plugin: no `make`" in err and "libcjson-dev" in err
    assert 'broker.mosquitto_auth = "dynsec"' in err and "Traceback" not in err
    assert not (outdir / "mosquitto.conf").exists()
