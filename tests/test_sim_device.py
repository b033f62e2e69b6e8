"""The device's pure protocol steps, checked against a cloud side built from provwire alone."""

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.device import (
    DeviceIdentity,
    answer_wait,
    build_claim,
    client_id_for,
    concrete_topic,
    device_state_dir,
    merge_reclaim,
    new_request_id,
    open_answer,
    retry_delay,
    topic_matches,
)
from device_sim.errors import ClaimRejected, CloudKeyMismatch, InvalidAnswer, StaleAnswer
from provwire import crypto
from provwire.errors import ErrorCode, ProvbridgeError, SealError
from provwire.models import (
    Claim,
    ClaimError,
    ClaimOk,
    Credentials,
    FieldError,
    Hardware,
    Network,
    Sealed,
    to_json,
)
from tests.helpers.credentials import sample_credentials

REQUEST_ID = "r-0123456789abcdef"


def cloud_answer(
    claim: Claim,
    cloud: ec.EllipticCurvePrivateKey,
    credentials: Credentials | None = None,
    *,
    created: bool = True,
    plaintext: bytes | None = None,
) -> bytes:
    """What the bridge does for an accepted claim, written from protocol v1 with provwire only."""
    device_pub = crypto.public_key_from_sec1(claim.public_key_sec1)
    seal_key = crypto.derive_seal_key(crypto.shared_secret(cloud, device_pub), claim.request_id)
    body = plaintext if plaintext is not None else to_json(credentials or sample_credentials("dev-42"))
    box = crypto.seal(seal_key, body, claim.request_id)
    return to_json(
        ClaimOk(
            request_id=claim.request_id,
            device_id="dev-42",
            created=created,
            labels={"site": "lab"},
            groups=["sensors"],
            profile="default",
            cloud_key_id=crypto.key_id(cloud.public_key()),
            sealed=Sealed(nonce=crypto.b64encode(box.nonce), ciphertext=crypto.b64encode(box.ciphertext)),
        )
    )


@pytest.fixture
def cloud() -> ec.EllipticCurvePrivateKey:
    return crypto.generate_private_key()


@pytest.fixture
def device() -> DeviceIdentity:
    return DeviceIdentity.generate("sim-test-000001")


def _claim(device: DeviceIdentity, request_id: str = REQUEST_ID) -> Claim:
    return build_claim(device, "pk_test", request_id)


# --- build_claim ----------------------------------------------------------------------------------------


def test_build_claim_validates_and_round_trips(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    claim = build_claim(
        device,
        "pk_test",
        REQUEST_ID,
        hardware=Hardware(cpu_cores=4, arch="aarch64"),
        network=Network(hostname="pi", connection_type="wifi"),
        device_name="kitchen sensor",
        cloud_key_id=crypto.key_id(cloud.public_key()),
    )
    wire = to_json(claim)
    assert Claim.model_validate_json(wire) == claim
    assert claim.public_key_sec1 == device.public_key_sec1
    assert claim.hardware_id == "sim-test-000001"
    doc = json.loads(wire)
    assert doc["agent_version"].startswith("provbridge-sim/")
    assert "device_name" in doc and "hardware" in doc


def test_build_claim_leaves_unknowns_out(device: DeviceIdentity) -> None:
    doc = json.loads(to_json(_claim(device)))
    assert set(doc) == {"request_id", "provision_key", "hardware_id", "public_key", "agent_version"}


def test_build_claim_refuses_an_out_of_contract_request_id(device: DeviceIdentity) -> None:
    with pytest.raises(ValueError):
        build_claim(device, "pk_test", "short")


def test_request_ids_are_fresh_and_valid(device: DeviceIdentity) -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    for rid in ids:
        _claim(device, rid)  # validates against RequestId


# --- identity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#b", "x" * 129, "tab\there"])
def test_identity_refuses_hardware_ids_the_contract_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        DeviceIdentity.generate(bad)


def test_client_id_is_the_hardware_id_when_valid_else_derived_from_the_key() -> None:
    key = crypto.sec1(crypto.generate_private_key().public_key())
    assert client_id_for("sim-abc-000001", key) == "sim-abc-000001"
    derived = client_id_for("serial number 12 (rev B)", key)
    # PROTOCOL.md section 4: "c-" + the kid of the device public key, 18 characters.
    assert derived == "c-" + crypto.key_id(crypto.public_key_from_sec1(key)) and len(derived) == 18
    assert client_id_for("x" * 65, key) == derived
    identity = DeviceIdentity.generate("has space")
    assert identity.client_id == "c-" + crypto.key_id(identity.private_key.public_key())


def test_state_dir_stays_inside_the_root(tmp_path: Path) -> None:
    assert device_state_dir(tmp_path, "sim-1") == tmp_path / "sim-1"
    for hostile in ("..", ".", ".hidden", "a:b", "é"):
        path = device_state_dir(tmp_path, hostile)
        assert path.parent == tmp_path and path.name.startswith("h-")


def test_identity_persists_in_its_state_dir(tmp_path: Path) -> None:
    first = DeviceIdentity.load_or_create(tmp_path / "d", "hw-1")
    again = DeviceIdentity.load_or_create(tmp_path / "d", "hw-1")
    assert first.public_key_b64 == again.public_key_b64
    assert "private_key" not in repr(first)


# --- open_answer ----------------------------------------------------------------------------------------


def test_open_answer_opens_what_the_cloud_sealed(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    claim = _claim(device)
    result = open_answer(cloud_answer(claim, cloud), device, cloud.public_key(), REQUEST_ID)
    assert result.credentials == sample_credentials("dev-42")
    assert (result.device_id, result.created, result.profile) == ("dev-42", True, "default")
    assert result.labels == {"site": "lab"} and result.groups == ("sensors",)
    assert result.cloud_key_id == crypto.key_id(cloud.public_key())
    assert "tok_secret" not in repr(result) and "ak_secret" not in repr(result)


@pytest.mark.parametrize("field", ["nonce", "ciphertext"])
def test_open_answer_refuses_a_tampered_seal(
    device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey, field: str
) -> None:
    doc = json.loads(cloud_answer(_claim(device), cloud))
    raw = bytearray(crypto.b64decode(doc["sealed"][field]))
    raw[-1] ^= 0x01
    doc["sealed"][field] = crypto.b64encode(bytes(raw))
    with pytest.raises(SealError):
        open_answer(json.dumps(doc).encode(), device, cloud.public_key(), REQUEST_ID)


def test_open_answer_refuses_an_answer_sealed_for_another_device(cloud: ec.EllipticCurvePrivateKey) -> None:
    other = DeviceIdentity.generate("other")
    me = DeviceIdentity.generate("me")
    answer = cloud_answer(_claim(other), cloud)
    with pytest.raises(SealError):
        open_answer(answer, me, cloud.public_key(), REQUEST_ID)


def test_wrong_cloud_key_is_refused_before_opening(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    answer = cloud_answer(_claim(device), cloud)
    trusted = crypto.generate_private_key().public_key()
    with pytest.raises(CloudKeyMismatch, match=crypto.key_id(trusted)):
        open_answer(answer, device, trusted, REQUEST_ID)


def test_cloud_key_id_is_checked_even_if_the_box_would_open(
    device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey
) -> None:
    doc = json.loads(cloud_answer(_claim(device), cloud))
    doc["cloud_key_id"] = "0000000000000000"
    with pytest.raises(CloudKeyMismatch):
        open_answer(json.dumps(doc).encode(), device, cloud.public_key(), REQUEST_ID)


def test_answer_to_another_request_is_stale(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    answer = cloud_answer(_claim(device, "r-other-request"), cloud)
    with pytest.raises(StaleAnswer):
        open_answer(answer, device, cloud.public_key(), REQUEST_ID)


def test_seal_is_bound_to_the_request_id(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    # Same device and cloud, but the answer's request_id relabelled: the AAD and the seal key differ.
    doc = json.loads(cloud_answer(_claim(device, "r-other-request"), cloud))
    doc["request_id"] = REQUEST_ID
    with pytest.raises(SealError):
        open_answer(json.dumps(doc).encode(), device, cloud.public_key(), REQUEST_ID)


def test_sealed_plaintext_must_be_credentials(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    answer = cloud_answer(_claim(device), cloud, plaintext=b'{"api_key": "x"}')
    with pytest.raises(InvalidAnswer, match="sealed credentials"):
        open_answer(answer, device, cloud.public_key(), REQUEST_ID)


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b"[]",
        b'{"status": "maybe"}',
        b'{"status": "ok", "request_id": "' + REQUEST_ID.encode() + b'"}',
    ],
)
def test_malformed_answers_are_invalid(
    device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey, answer: bytes
) -> None:
    with pytest.raises(InvalidAnswer):
        open_answer(answer, device, cloud.public_key(), REQUEST_ID)


def test_bad_base64_in_sealed_is_invalid(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    doc = json.loads(cloud_answer(_claim(device), cloud))
    doc["sealed"]["nonce"] = "***"
    with pytest.raises(InvalidAnswer, match="base64"):
        open_answer(json.dumps(doc).encode(), device, cloud.public_key(), REQUEST_ID)


@pytest.mark.parametrize(
    ("code", "retry_after", "retryable"),
    [
        (ErrorCode.RATE_LIMITED, 3, True),
        (ErrorCode.INTERNAL_ERROR, 1, True),
        (ErrorCode.PERMISSION_DENIED, None, False),
        (ErrorCode.VALIDATION_ERROR, None, False),
        (ErrorCode.DEVICE_EXISTS, None, False),
    ],
)
def test_error_answers_map_to_claim_rejected(
    device: DeviceIdentity,
    cloud: ec.EllipticCurvePrivateKey,
    code: ErrorCode,
    retry_after: int | None,
    retryable: bool,
) -> None:
    err = ClaimError(
        request_id=REQUEST_ID,
        code=code,
        message="no",
        retry_after=retry_after,
        errors=[FieldError(field="hardware_id", message="bad")] if code is ErrorCode.VALIDATION_ERROR else None,
    )
    with pytest.raises(ClaimRejected) as info:
        open_answer(to_json(err), device, cloud.public_key(), REQUEST_ID)
    exc = info.value
    assert isinstance(exc, ProvbridgeError)
    assert exc.code is code and exc.retry_after == retry_after and exc.retryable is retryable
    if code is ErrorCode.VALIDATION_ERROR:
        assert exc.field_errors == (("hardware_id", "bad"),)


def test_error_answer_without_request_id_is_ours(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    # The bridge cannot echo a request_id it could not parse; the answer still came on our topic.
    err = ClaimError(code=ErrorCode.VALIDATION_ERROR, message="claim is not JSON")
    with pytest.raises(ClaimRejected) as info:
        open_answer(to_json(err), device, cloud.public_key(), REQUEST_ID)
    assert info.value.code is ErrorCode.VALIDATION_ERROR


def test_error_for_another_request_is_stale(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    err = ClaimError(request_id="r-other-request", code=ErrorCode.RATE_LIMITED, message="x", retry_after=1)
    with pytest.raises(StaleAnswer):
        open_answer(to_json(err), device, cloud.public_key(), REQUEST_ID)


def test_unknown_error_code_is_final(device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey) -> None:
    answer = json.dumps({"request_id": REQUEST_ID, "status": "error", "code": "quota_exceeded", "message": "full"})
    with pytest.raises(ClaimRejected) as info:
        open_answer(answer.encode(), device, cloud.public_key(), REQUEST_ID)
    assert info.value.code == "quota_exceeded" and not info.value.retryable


def test_retryable_error_without_retry_after_stays_retryable(
    device: DeviceIdentity, cloud: ec.EllipticCurvePrivateKey
) -> None:
    # Off-contract (retry_after is required with retryable codes), but the device should still back off.
    answer = json.dumps({"request_id": REQUEST_ID, "status": "error", "code": "rate_limited", "message": "slow"})
    with pytest.raises(ClaimRejected) as info:
        open_answer(answer.encode(), device, cloud.public_key(), REQUEST_ID)
    assert info.value.code is ErrorCode.RATE_LIMITED and info.value.retryable and info.value.retry_after is None


# --- re-claim, topics, timing ---------------------------------------------------------------------------


def test_reclaim_keeps_the_first_api_key() -> None:
    first, reclaim = sample_credentials("dev-42", "ak_first"), sample_credentials("dev-42", "")
    assert merge_reclaim(first, reclaim).api_key == "ak_first"
    assert merge_reclaim(None, reclaim).api_key == ""
    assert merge_reclaim(first, sample_credentials("dev-42", "ak_rotated")).api_key == "ak_rotated"
    assert merge_reclaim(first, reclaim).mqtt == reclaim.mqtt


@pytest.mark.parametrize(
    ("topic_filter", "topic"),
    [
        ("devices/dev-42/up/#", "devices/dev-42/up/hello"),
        ("devices/+/telemetry", "devices/sim/telemetry"),
        ("t/+/x/+/#", "t/sim/x/sim/hello"),
        ("#", "hello"),
        ("+", "sim"),
        ("plain/topic", "plain/topic"),
    ],
)
def test_concrete_topic_from_publish_filter(topic_filter: str, topic: str) -> None:
    assert concrete_topic(topic_filter) == topic


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a/b+/c"])
def test_concrete_topic_refuses_invalid_filters(bad: str) -> None:
    with pytest.raises(ValueError):
        concrete_topic(bad)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("devices/d1/#", "devices/d1/hello", True),
        ("devices/d1/#", "devices/d1", True),  # '#' includes the parent level
        ("devices/+/up", "devices/d1/up", True),
        ("devices/+/up", "devices/d1/up/x", False),
        ("devices/d1/#", "devices/d2/hello", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("#", "anything/at/all", True),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


def test_answer_wait_doubles_then_caps() -> None:
    waits = [answer_wait(2.0, n) for n in range(1, 10)]
    assert 2.0 <= waits[0] <= 2.4 and 4.0 <= waits[1] <= 4.8
    assert max(waits) <= 60.0 * 1.2


def test_retry_delay_honours_retry_after_with_bounded_jitter() -> None:
    for _ in range(50):
        assert 5.0 <= retry_delay(5) <= 6.25
        assert 0.0 <= retry_delay(0) <= 0.05
        assert 1.0 <= retry_delay(None) <= 1.25
