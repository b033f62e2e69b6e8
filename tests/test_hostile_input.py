"""Hostile input, property-based: claims, token refreshes, topics and admin CLI arguments.

The property, for every generated example: the bridge answers with the documented error (or drops
the message, for a topic it cannot answer on), the answer parses as the documented `ClaimError`, and
nothing but the one rejection event is written: no device, no stored answer, no key use, no refresh
record, no changed row. Nothing raises.

The bulk drives `Provisioner.handle` / `Refresher.handle` directly, on a real SQLite file with real
keys (fast); `test_hostile_input_over_mqtt_then_good_claims` sends a sample through the embedded broker
and shows the bridge still serves the next good claim and refresh. Profiles: see tests/helpers/strategies.py
(`make test` runs the short one, `make test-long` more than 10,000 examples).
"""

import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic_core
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bridge.claims import provisioning, refresh
from bridge.claims.provisioning import Provisioner
from bridge.claims.refresh import Refresher
from bridge.cli import main as cli
from bridge.config import Settings
from bridge.ops import admin, lifecycle
from bridge.storage import keyfiles
from bridge.storage.keyfiles import KeyRing
from bridge.storage.store import Store
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import MAX_CLAIM_BYTES, MAX_REFRESH_BYTES, Claim, ClaimError, ClaimOk, Event, to_json
from tests.helpers.bridge import Bridge, make_settings
from tests.helpers.devices import Device
from tests.helpers.mqtt import MqttClient
from tests.helpers.network import free_port
from tests.helpers.strategies import (
    BAD_KEYS,
    CLAIM_MEMBERS,
    CLIENT_IDS,
    DENIED,
    VALIDATION,
    Hostile,
    cli_argvs,
    examples,
    hostile_claims,
    hostile_refreshes,
    invalid_topics,
    request_ids,
)

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{8,64}")
CLAIM_REASONS = {
    "validation_error",
    "unknown_cloud_key",
    "unknown_key",
    "key_revoked",
    "key_expired",
    "key_exhausted",
    "hardware_id_mismatch",
    "device_revoked",
    "public_key_mismatch",
}
REFRESH_REASONS = {"validation_error", "unknown_device", "bad_mac", "device_revoked", "stale_timestamp", "replayed"}
# Each kind of breakage is its own test case, so that the short profile covers every one of them.
CLAIM_REFUSALS = [
    "revoked key",
    "expired key",
    "exhausted key",
    "hardware id pattern",
    "revoked device",
    "another public key",
    "unknown cloud key",
    "unknown key",
]
CLAIM_KINDS = [
    *(f"invalid {name}" for name in sorted(CLAIM_MEMBERS)),
    *("missing member", "unknown member", "duplicate member", "not a JSON object", "random JSON"),
    *(f"refused: {why}" for why in CLAIM_REFUSALS),
]
REFRESH_KINDS = [
    *(f"invalid {name}" for name in ("device_id", "mac", "request_id", "timestamp")),
    *("missing member", "unknown member", "duplicate member", "not a JSON object"),
    *(f"refused: {why}" for why in ("unknown_device", "bad_mac", "stale_timestamp", "device_revoked", "replayed")),
]


# --- the world the properties run in ------------------------------------------------------------


@dataclass
class Provisioned:
    device_id: str
    hardware_id: str
    private_key: ec.EllipticCurvePrivateKey

    @property
    def public_key_b64(self) -> str:
        return crypto.b64encode(crypto.sec1(self.private_key.public_key()))


@dataclass(repr=False)  # hypothesis prints the arguments of a failing example: keep it to one line
class World:
    settings: Settings
    store: Store
    keys: KeyRing
    provisioner: Provisioner
    refresher: Refresher
    now: int  # every handle() runs at this time: results cannot depend on how long the run takes
    first_key: str
    secrets: list[str]  # raw provisioning keys: never in an answer or an event
    base_claim: dict[str, Any]
    claim_refusals: dict[str, tuple[ErrorCode, str, dict[str, Any]]]
    devices: dict[str, Provisioned]
    base_refresh: dict[str, Any]
    refresh_denied: dict[str, dict[str, Any]]
    claim_kinds: dict[str, st.SearchStrategy[Hostile]]
    refresh_kinds: dict[str, st.SearchStrategy[Hostile]]

    @property
    def prefix(self) -> str:
        return self.settings.topic_prefix

    def __repr__(self) -> str:
        return f"World({self.settings.data_dir})"

    def _repr_pretty_(self, printer: Any, _cycle: bool) -> None:
        printer.text(repr(self))

    def claim(self, key: str, device: Provisioned) -> ClaimOk:
        claim = Claim(
            request_id=f"r-{uuid.uuid4().hex}",
            provision_key=key,
            hardware_id=device.hardware_id,
            public_key=device.public_key_b64,
        )
        outcome = self.provisioner.handle(topics.claim_topic(self.prefix, "setup"), to_json(claim), now=self.now)
        assert outcome.answer is not None
        answer = ClaimOk.model_validate_json(outcome.answer)
        device.device_id = answer.device_id
        return answer

    def device_key(self, device: Provisioned) -> bytes:
        cloud = self.keys.cloud_key.public_key()
        return crypto.derive_device_key(crypto.shared_secret(device.private_key, cloud))

    def mac_for(self, device_id: str, request_id: str, timestamp: int) -> str:
        device = next((d for d in self.devices.values() if d.device_id == device_id), self.devices["active"])
        return crypto.b64encode(crypto.refresh_mac(self.device_key(device), device_id, request_id, timestamp))


def _new_device(hardware_id: str) -> Provisioned:
    return Provisioned("", hardware_id, crypto.generate_private_key())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = make_settings(tmp_path_factory.mktemp("hostile") / "data")
    first_key = admin.init_data_dir(settings).provision_key
    assert first_key is not None
    store = Store(settings.database)
    keys = keyfiles.load_keys(settings.data_dir)
    made_at = int(time.time())

    def key(**spec: Any) -> tuple[str, str]:
        made, raw = admin.create_key(
            store, settings, admin.KeySpec(tenant="default", name=f"k-{uuid.uuid4().hex[:6]}", **spec), made_at
        )
        return made.id, raw

    revoked_id, revoked = key()
    admin.revoke_key(store, revoked_id, made_at)
    _, expired = key(expires_at=made_at + 60)
    _, one_time = key(max_registrations=1)
    _, nothing_matches = key(hardware_id_pattern=r"\b\B")  # RE2 has no (?!)

    w = World(
        settings=settings,
        store=store,
        keys=keys,
        provisioner=Provisioner(settings, store, keys),
        refresher=Refresher(settings, store, keys),
        now=made_at + 3600,  # an hour on: the key made to expire after a minute has expired
        first_key=first_key,
        secrets=[first_key, revoked, expired, one_time, nothing_matches],
        base_claim={},
        claim_refusals={},
        devices={name: _new_device(f"hw-{name}") for name in ("active", "revoked", "spent", "base", "other")},
        base_refresh={},
        refresh_denied={},
        claim_kinds={},
        refresh_kinds={},
    )
    w.claim(first_key, w.devices["active"])
    w.claim(first_key, w.devices["revoked"])
    lifecycle.revoke_device(settings, store, w.devices["revoked"].device_id, made_at)
    w.claim(one_time, w.devices["spent"])  # the one-time key is now exhausted

    base = w.devices["base"]
    w.base_claim = {
        "request_id": "r-base-claim-0001",
        "provision_key": first_key,
        "hardware_id": base.hardware_id,
        "public_key": base.public_key_b64,
        "device_name": "Line 7 sensor",
        "cloud_key_id": keys.active_cloud,
        "hardware": {
            "board_model": "ESP32-S3",
            "cpu_cores": 2,
            "ram_mb": 8,
            "os": "FreeRTOS",
            "arch": "xtensa",
            "kernel": "IDF 5",
        },
        "network": {"hostname": "s-42", "ip": "192.0.2.42", "mac": "24:6f:28:aa:bb:cc", "connection_type": "wifi"},
        "agent_version": "1.0.0",
    }
    assert isinstance(provisioning.parse_claim(json.dumps(w.base_claim).encode()), Claim)  # valid, never sent
    active, revoked_device = w.devices["active"], w.devices["revoked"]
    w.claim_refusals = {
        "revoked key": (DENIED, "key_revoked", {"provision_key": revoked}),
        "expired key": (DENIED, "key_expired", {"provision_key": expired}),
        "exhausted key": (DENIED, "key_exhausted", {"provision_key": one_time}),
        "hardware id pattern": (DENIED, "hardware_id_mismatch", {"provision_key": nothing_matches}),
        "revoked device": (
            DENIED,
            "device_revoked",
            {"hardware_id": revoked_device.hardware_id, "public_key": revoked_device.public_key_b64},
        ),
        "another public key": (
            ErrorCode.DEVICE_EXISTS,
            "public_key_mismatch",
            {"hardware_id": active.hardware_id, "public_key": w.devices["other"].public_key_b64},
        ),
        "unknown cloud key": (VALIDATION, "unknown_cloud_key", {"cloud_key_id": "0" * 16}),
    }

    used: dict[str, Any] = {"request_id": "r-used-refresh-0001", "device_id": active.device_id, "timestamp": w.now}
    used["mac"] = w.mac_for(active.device_id, used["request_id"], w.now)
    done = w.refresher.handle(topics.token_topic(w.prefix, "setup"), json.dumps(used).encode(), now=w.now)
    assert done.answer is not None and ClaimOk.model_validate_json(done.answer)
    w.base_refresh = dict(used, request_id="r-base-refresh-01")
    w.base_refresh["mac"] = w.mac_for(active.device_id, w.base_refresh["request_id"], w.now)
    w.refresh_denied = {
        "device_revoked": {"device_id": revoked_device.device_id},
        "replayed": {"request_id": used["request_id"], "timestamp": w.now},
    }
    w.claim_kinds = hostile_claims(w.base_claim, w.claim_refusals)
    skew = settings.token.refresh_skew_seconds
    w.refresh_kinds = hostile_refreshes(w.base_refresh, w.mac_for, w.now, skew, w.refresh_denied)
    assert sorted(w.claim_kinds) == sorted(CLAIM_KINDS) and sorted(w.refresh_kinds) == sorted(REFRESH_KINDS)
    yield w
    store.close()


# --- what every answer must satisfy --------------------------------------------------------------


def snapshot(store: Store) -> dict[str, Any]:
    """Everything a refused message must leave alone (events are checked on their own)."""
    db = store.connection()
    state: dict[str, Any] = {
        table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        for table in ("tenants", "provision_keys", "devices", "answers", "refresh_requests", "events")
    }
    state["keys"] = db.execute(
        "SELECT id, registrations, status, revoked_at FROM provision_keys ORDER BY id"
    ).fetchall()
    state["devices"] = db.execute(
        "SELECT id, status, public_key, cloud_key_id, api_key_hash, updated_at FROM devices ORDER BY id"
    ).fetchall()
    return {k: [tuple(r) for r in v] if isinstance(v, list) else v for k, v in state.items()}


def is_json_object(payload: bytes, max_bytes: int) -> bool:
    """Independent oracle: is this a JSON object to the parser the bridge validates with?"""
    if len(payload) > max_bytes:
        return False
    try:
        # allow_inf_nan=False: NaN and the infinities are not JSON (RFC 8259), though parsers read them by default
        return isinstance(pydantic_core.from_json(payload, allow_inf_nan=False), dict)
    except ValueError:
        return False


def expected_request_id(payload: bytes, max_bytes: int) -> str | None:
    """The request_id a refusal must echo: from a JSON object, valid, and sent once."""
    if not is_json_object(payload, max_bytes):
        return None
    pairs = json.loads(payload, object_pairs_hook=lambda p: p)
    values = [value for name, value in pairs if name == "request_id"]
    ok = len(values) == 1 and isinstance(values[0], str) and REQUEST_ID_RE.fullmatch(values[0])
    return values[0] if ok else None


def check_refused(
    w: World, outcome: provisioning.Outcome, h: Hostile, client_id: str, before: dict[str, Any], max_bytes: int
) -> None:
    context = f"{h.why}: {h.payload[:200]!r} -> {outcome.answer!r}"
    assert outcome.response_topic == topics.response_topic(w.prefix, client_id), context
    assert outcome.answer is not None, context
    data = json.loads(outcome.answer)
    answer = ClaimError.model_validate_json(outcome.answer)  # the documented model
    assert data["status"] == "error" and answer.code is h.code, context
    assert answer.retry_after is None, context
    assert answer.request_id == expected_request_id(h.payload, max_bytes), context
    if h.code is VALIDATION:
        assert answer.errors and len(answer.errors) <= 20, context
        fields = [e.field for e in answer.errors]
        if not is_json_object(h.payload, max_bytes):
            assert fields == [""], context  # the payload as a whole, one entry
        elif h.field is not None:
            assert any(f == h.field or f.startswith(f"{h.field}.") for f in fields), context
    else:
        assert answer.errors is None, context
    for secret in w.secrets:
        assert secret.encode() not in outcome.answer, context

    after = snapshot(w.store)
    assert after.pop("events") == before.pop("events") + len(outcome.events), context
    assert after == before, context
    assert len(outcome.events) == 1, context
    rejected = outcome.events[0]
    assert rejected.reason == h.reason, context
    stored = w.store.events(limit=1)[0]
    assert stored == json.loads(rejected.model_dump_json(exclude_none=True)), context
    assert not any(secret in json.dumps(stored) for secret in w.secrets), context


def check_dropped(w: World, outcome: provisioning.Outcome, before: dict[str, Any], event_name: str) -> None:
    assert outcome.answer is None and outcome.response_topic is None
    assert [(e.event, e.tenant, e.reason) for e in outcome.events] == [(event_name, "_", "invalid_client_id")]
    after = snapshot(w.store)
    assert after.pop("events") == before.pop("events") + 1
    assert after == before


# --- claims --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLAIM_KINDS)
@settings(max_examples=examples(8, 180))
@given(data=st.data(), client_id=CLIENT_IDS)
def test_hostile_claims_get_their_documented_error_and_change_nothing(
    world: World, kind: str, data: st.DataObject, client_id: str
) -> None:
    h = data.draw(world.claim_kinds[kind], label="claim")
    event(h.why.split(" '")[0])  # the mix within a kind, in --hypothesis-show-statistics
    before = snapshot(world.store)
    outcome = world.provisioner.handle(topics.claim_topic(world.prefix, client_id), h.payload, now=world.now)
    check_refused(world, outcome, h, client_id, before, MAX_CLAIM_BYTES)
    assert outcome.events[0].event == "claim.rejected" and outcome.events[0].reason in CLAIM_REASONS


@settings(max_examples=examples(40, 1000))
@given(topic=invalid_topics("prov/v1", "claim"), request_id=request_ids())
def test_claims_on_unanswerable_topics_are_dropped_even_when_valid(world: World, topic: str, request_id: str) -> None:
    assert world.prefix == "prov/v1"
    valid = json.dumps(dict(world.base_claim, request_id=request_id)).encode()  # it would create a device
    before = snapshot(world.store)
    outcome = world.provisioner.handle(topic, valid, now=world.now)
    check_dropped(world, outcome, before, "claim.rejected")


# --- token refreshes -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", REFRESH_KINDS)
@settings(max_examples=examples(8, 230))
@given(data=st.data(), client_id=CLIENT_IDS)
def test_hostile_refreshes_get_their_documented_error_and_change_nothing(
    world: World, kind: str, data: st.DataObject, client_id: str
) -> None:
    h = data.draw(world.refresh_kinds[kind], label="refresh")
    event(h.why.split(" '")[0])
    before = snapshot(world.store)
    outcome = world.refresher.handle(topics.token_topic(world.prefix, client_id), h.payload, now=world.now)
    check_refused(world, outcome, h, client_id, before, MAX_REFRESH_BYTES)
    assert outcome.events[0].event == "token.refresh_rejected" and outcome.events[0].reason in REFRESH_REASONS
    if h.code is DENIED:
        assert json.loads(outcome.answer or b"")["message"] == refresh.DENIED_MESSAGE  # uniform: nothing to probe


@settings(max_examples=examples(30, 800))
@given(topic=invalid_topics("prov/v1", "token"), request_id=request_ids())
def test_refreshes_on_unanswerable_topics_are_dropped_even_when_valid(
    world: World, topic: str, request_id: str
) -> None:
    device_id = world.base_refresh["device_id"]
    valid = dict(world.base_refresh, request_id=request_id, mac=world.mac_for(device_id, request_id, world.now))
    before = snapshot(world.store)
    outcome = world.refresher.handle(topic, json.dumps(valid).encode(), now=world.now)
    check_dropped(world, outcome, before, "token.refresh_rejected")


# --- decisions the properties rest on, pinned as examples -----------------------------------------


@pytest.mark.parametrize(("what", "raw"), BAD_KEYS, ids=[what for what, _ in BAD_KEYS])
def test_public_keys_that_are_not_p256_points_are_refused(world: World, what: str, raw: bytes) -> None:
    payload = json.dumps(dict(world.base_claim, public_key=crypto.b64encode(raw))).encode()
    before = snapshot(world.store)
    outcome = world.provisioner.handle(topics.claim_topic(world.prefix, "c-keys"), payload, now=world.now)
    check_refused(world, outcome, Hostile(payload, VALIDATION, what, "public_key"), "c-keys", before, MAX_CLAIM_BYTES)


def test_duplicate_members_are_rejected_with_their_path(world: World) -> None:
    """Decision: a member sent twice is a validation_error naming it (PROTOCOL.md section 2: MUST NOT).

    Parsers disagree on which copy wins (Python and pydantic: the last; cJSON: the first), so accepting
    it would let the device, a proxy and the bridge read different claims from the same bytes.
    """
    claim = json.dumps(world.base_claim)
    twice = claim.replace('"hardware_id": ', '"hardware_id": "SN-spoofed", "hardware_id": ', 1)
    nested = claim.replace('"cpu_cores": 2', '"cpu_cores": 2, "cpu_cores": 2', 1)
    for payload, field in ((twice, "hardware_id"), (nested, "hardware.cpu_cores")):
        answer = provisioning.parse_claim(payload.encode())
        assert isinstance(answer, ClaimError) and answer.code is VALIDATION
        assert answer.errors is not None and answer.errors[0].field == field
        assert answer.errors[0].message == "member appears more than once"
        assert answer.request_id == world.base_claim["request_id"]
    two_ids = claim.replace('"request_id": ', '"request_id": "r-other-0000001", "request_id": ', 1)
    answer = provisioning.parse_claim(two_ids.encode())
    assert isinstance(answer, ClaimError) and answer.request_id is None  # neither copy is echoed


def test_unreadable_payload_gets_no_request_id_even_if_a_lenient_parser_reads_one(world: World) -> None:
    # Python's json reads lone surrogates and a BOM; the bridge's parser does not: "not JSON", no request_id.
    claim = json.dumps(world.base_claim)
    for payload in (
        claim.replace('"Line 7 sensor"', '"\\ud800"').encode(),
        b"\xef\xbb\xbf" + claim.encode(),
        claim.encode("utf-16"),
    ):
        answer = provisioning.parse_claim(payload)
        assert isinstance(answer, ClaimError) and answer.request_id is None
        assert answer.errors is not None and [e.field for e in answer.errors] == [""]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinities_are_not_json_in_claims_and_refreshes(world: World, literal: str) -> None:
    # Python's json and pydantic read them by default; RFC 8259 has no such numbers (PROTOCOL.md §2).
    claim = json.dumps(dict(world.base_claim, hardware={"cpu_cores": 2})).replace(": 2}", f": {literal}}}")
    refresh = json.dumps(dict(world.base_refresh, timestamp=1)).replace('"timestamp": 1', f'"timestamp": {literal}')
    for handler, topic, payload in [
        (world.provisioner, topics.claim_topic(world.prefix, "c-nan"), claim),
        (world.refresher, topics.token_topic(world.prefix, "c-nan"), refresh),
    ]:
        before = snapshot(world.store)
        outcome = handler.handle(topic, payload.encode(), now=world.now)
        answer = ClaimError.model_validate_json(outcome.answer or b"")
        assert answer.code is ErrorCode.VALIDATION_ERROR and answer.request_id is None, payload
        assert answer.errors is not None and [e.field for e in answer.errors] == [""], payload
        after = snapshot(world.store)
        assert after.pop("events") == before.pop("events") + 1 and after == before


# --- the admin CLI ---------------------------------------------------------------------------------


@dataclass
class CliWorld:
    common: list[str]  # the global options every run gets
    known: list[str]


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory: pytest.TempPathFactory) -> CliWorld:
    root = tmp_path_factory.mktemp("cli")
    config = root / "provbridge.toml"
    # Its own port (nothing listens there: the doctor's broker check fails fast) and data dir.
    config.write_text(f'data_dir = "{root / "data"}"\n[broker]\nport = {free_port()}\n')
    settings = make_settings(root / "data")
    init = admin.init_data_dir(settings)
    store = Store(settings.database)
    keys = keyfiles.load_keys(settings.data_dir)
    device = _new_device("hw-cli")
    claim = Claim(request_id="r-cli-claim-1", provision_key=init.provision_key or "", hardware_id="hw-cli",
                  public_key=device.public_key_b64)  # fmt: skip
    outcome = Provisioner(settings, store, keys).handle("prov/v1/claim/cli", to_json(claim))
    device_id = ClaimOk.model_validate_json(outcome.answer or b"").device_id
    store.close()
    known = ["default", init.key_id or "", device_id, "hw-cli", "first-key", "ops-1"]
    return CliWorld(["--config", str(config)], known)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`cli.main` as a terminal runs it: stdout strict UTF-8 (like a UTF-8 locale), stderr backslashreplace."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
            assert isinstance(exc.code, int | None), exc.code
            code = exc.code or 0
    outputs = []
    for stream in (stdout, stderr):
        stream.flush()
        buffer = stream.buffer
        assert isinstance(buffer, io.BytesIO)
        outputs.append(buffer.getvalue().decode("utf-8"))
    return code, outputs[0], outputs[1]


def check_cli(argv: list[str]) -> tuple[int, str, str]:
    code, out, err = run_cli(argv)
    context = f"{argv!r} -> {code}\nstdout: {out[:500]}\nstderr: {err[:2000]}"
    assert code in (0, 1, 2), context
    assert "Traceback" not in out + err, context
    lines = err.split("\n")  # what a terminal breaks lines at
    if code == 1:
        assert lines[1:] == [""] and lines[0].startswith("provbridge: error: "), context
    if code == 2:
        error_lines = [line for line in lines if "error:" in line]
        assert len(error_lines) == 1 and lines[-2:] == [error_lines[0], ""], context
    return code, out, err


@settings(max_examples=examples(80, 2500))
@given(data=st.data())
def test_cli_answers_any_arguments_with_an_exit_code_and_one_line(cli_world: CliWorld, data: st.DataObject) -> None:
    argv = data.draw(cli_argvs(cli_world.known), label="argv")
    check_cli([*cli_world.common, *argv])


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["events", "--limit", "99999999999999999999"], 2),
        (["device", "list", "--limit", "-1"], 2),
        (["key", "create", "--name", "x", "--max-registrations", "99999999999999999999"], 2),
        (["key", "create", "--name", "x", "--expires-in", "99999999999999999999d"], 2),
        (["key", "create", "--name", "x", "--expires-in", "9" * 5000 + "d"], 2),
        (["key", "create", "--name", "x", "--expires-at", "9999-12-31T23:59:59-23:59"], 2),
        (["key", "create", "--name", "x", "--hardware-id-pattern", "a{4294967296}"], 2),
        (["key", "create", "--name", "\udcff"], 2),  # a byte that is not UTF-8, as Python hands it over
        (["device", "show", "dev_\x00"], 2),
        (["tenant", "list", "\n"], 2),  # argparse would echo it: a reason on two lines
        (["key", "create", "--name", "line 1\u2028line 2"], 2),
    ],
)
def test_cli_arguments_that_used_to_end_in_a_traceback(cli_world: CliWorld, argv: list[str], code: int) -> None:
    assert check_cli([*cli_world.common, *argv])[0] == code


@pytest.mark.parametrize("content", [b"[broker\n", b"\xff\xfe", b"log_level = 3\n", b'profiles = "x"\n'])
def test_cli_with_a_broken_config_file_says_so_in_one_line(tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "provbridge.toml"
    config.write_bytes(content)
    code, _, err = check_cli(["--config", str(config), "--data-dir", str(tmp_path), "key", "list"])
    assert code == 1 and (str(config) in err or "invalid setting" in err)


# --- through the real broker ------------------------------------------------------------------------


def test_hostile_input_over_mqtt_then_good_claims(bridge: Bridge) -> None:
    """A sample of the same input through the embedded broker: every message answered, nothing created,
    and the bridge then serves a good claim and a good refresh as before."""
    keys = keyfiles.load_keys(bridge.settings.data_dir)
    probe = _new_device("hw-probe")
    base = {
        "request_id": "r-mqtt-base-0001",
        "provision_key": bridge.provision_key,
        "hardware_id": probe.hardware_id,
        "public_key": probe.public_key_b64,
        "cloud_key_id": keys.active_cloud,
        "hardware": {"cpu_cores": 2},
        "network": {"ip": "192.0.2.1"},
    }
    devices_before = bridge.store.count("devices")
    with Device(bridge) as device:

        @settings(max_examples=examples(15, 300), suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(h=st.one_of(*hostile_claims(base, {}).values()))
        def send(h: Hostile) -> None:
            answer = ClaimError.model_validate_json(device.send(h.payload))
            assert answer.code is h.code, h.why

        send()
        good = device.claim(bridge.provision_key)
        assert isinstance(good, ClaimOk) and good.created
        creds = device.open(good)
    assert bridge.store.count("devices") == devices_before + 1

    device_key = crypto.derive_device_key(crypto.shared_secret(device.private_key, keys.cloud_key.public_key()))
    with MqttClient(bridge.port, "hostile-refresher") as conn:
        assert conn.connect() and conn.subscribe(topics.response_topic(bridge.prefix, "hostile-refresher")) == [1]
        for payload in (b"", b"[]", b'{"request_id": "r-x-00001", "request_id": 1}', b"\xff" * 2000):
            conn.publish(topics.token_topic(bridge.prefix, "hostile-refresher"), payload)
            assert ClaimError.model_validate_json(conn.next_message()[1]).code is VALIDATION
        request_id = f"r-{uuid.uuid4().hex}"
        now = int(time.time())
        mac = crypto.refresh_mac(device_key, good.device_id, request_id, now)
        good_refresh = {"request_id": request_id, "device_id": good.device_id, "timestamp": now,
                        "mac": crypto.b64encode(mac)}  # fmt: skip
        conn.publish(topics.token_topic(bridge.prefix, "hostile-refresher"), json.dumps(good_refresh).encode())
        renewed = ClaimOk.model_validate_json(conn.next_message()[1])
    assert renewed.device_id == good.device_id and creds.mqtt.token
    assert bridge.store.count("devices") == devices_before + 1
    assert all(isinstance(Event.model_validate(e), Event) for e in bridge.store.events(limit=1000))
