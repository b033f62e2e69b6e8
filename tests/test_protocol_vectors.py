"""docs/PROTOCOL.md against the code: the test vectors, the field tables, codes and topics.

Everything is parsed from the document, then checked twice where it matters: against an
independent re-implementation of the spec in this file (pure-Python P-256, HKDF by HMAC as in
RFC 5869, AES-GCM from `cryptography`), which is what a firmware author would write, and against
provwire, which is what the bridge runs. So the document, the spec and the code cannot drift.
"""

import base64
import hashlib
import hmac
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ValidationError

import provwire
from bridge.claims.provisioning import parse_claim, parse_request
from bridge.claims.refresh_decision import RefreshDenial
from bridge.config import ClaimSettings, TokenSettings
from bridge.mosquitto.files import PUBLISH_LIMIT_FACTOR
from broker.certificates import scope_of
from provwire import crypto, models, topics
from provwire.errors import ErrorCode, InvalidPublicKey, SealError

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
GENERATOR_PATH = Path(__file__).resolve().with_name("vectors.py")
DOC = DOC_PATH.read_text(encoding="utf-8")
LABEL = "provbridge v1 test vector: "


# --------------------------------------------------------------------------- parsing the document


def _vector_block() -> str:
    marker = DOC.index("<!-- test-vectors -->")
    lines = DOC[marker:].split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("```text"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start + 1 : end]) + "\n"


def _parse_vectors(block: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(block.split("\n"), 1):
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z0-9_.]+) = (.*)", line)
        assert match, f"vector line {number} is not `name = value`: {line!r}"
        name, value = match.groups()
        assert name not in values, f"vector {name} defined twice"
        values[name] = value
    return values


BLOCK = _vector_block()
V = _parse_vectors(BLOCK)


def _table(marker: str) -> list[dict[str, str]]:
    """The markdown table that follows `<!-- {marker} -->`, as rows keyed by lowercased header."""
    lines = DOC[DOC.index(f"<!-- {marker} -->") :].split("\n")[1:]
    rows = [line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("|"))]]
    assert len(rows) >= 3, f"no table after <!-- {marker} -->"

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    header = [h.lower() for h in cells(rows[0])]
    return [dict(zip(header, cells(row), strict=True)) for row in rows[2:]]


def _code(cell: str) -> str:
    """The first `code span` of a table cell."""
    match = re.search(r"`([^`]+)`", cell)
    assert match, f"no code span in {cell!r}"
    return match.group(1)


def _h(name: str) -> bytes:
    return bytes.fromhex(V[name])


def _fixed(what: str) -> bytes:
    return hashlib.sha256((LABEL + what).encode("utf-8")).digest()


def _b64url_decode(text: str) -> bytes:
    assert re.fullmatch(r"[A-Za-z0-9_-]+", text), text
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- an independent P-256

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
A = P - 3
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
G = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
Point = tuple[int, int] | None


def _add(p1: Point, p2: Point) -> Point:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    (x1, y1), (x2, y2) = p1, p2
    if x1 == x2 and (y1 + y2) % P == 0:
        return None
    if p1 == p2:  # doubling
        numerator, denominator = 3 * x1 * x1 + A, 2 * y1
    else:
        numerator, denominator = y2 - y1, x2 - x1
    slope = numerator * pow(denominator, -1, P) % P
    x3 = (slope * slope - x1 - x2) % P
    return x3, (slope * (x1 - x3) - y1) % P


def _mul(k: int, point: Point) -> Point:
    result: Point = None
    for bit in bin(k)[2:]:
        result = _add(result, result)
        if bit == "1":
            result = _add(result, point)
    return result


def _sec1(point: Point) -> bytes:
    assert point is not None
    return b"\x04" + point[0].to_bytes(32, "big") + point[1].to_bytes(32, "big")


def _ref_point(data: bytes) -> tuple[int, int]:
    """The checks of PROTOCOL.md section 9.1, written from the text."""
    if len(data) != 65 or data[0] != 0x04:
        raise ValueError("not a 65-byte uncompressed point")
    x, y = int.from_bytes(data[1:33], "big"), int.from_bytes(data[33:], "big")
    if x >= P or y >= P:
        raise ValueError("coordinate not below p")
    if (y * y - (x * x * x + A * x + B)) % P:
        raise ValueError("not on the curve")
    return x, y


def _ref_public(scalar: bytes) -> bytes:
    k = int.from_bytes(scalar, "big")
    assert 1 <= k < N
    return _sec1(_mul(k, G))


def _ref_ecdh(scalar: bytes, peer_sec1: bytes) -> bytes:
    shared = _mul(int.from_bytes(scalar, "big"), _ref_point(peer_sec1))
    assert shared is not None
    return shared[0].to_bytes(32, "big")


def _ref_hkdf(ikm: bytes, info: bytes) -> tuple[bytes, bytes]:
    """RFC 5869 with the salt absent (HashLen zero bytes) and L = 32: (PRK, OKM)."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    return prk, hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


# --------------------------------------------------------------------------- the vectors


def test_fixed_inputs_follow_their_documented_derivation() -> None:
    assert _h("cloud_private_scalar_hex") == _fixed("cloud private key")
    assert _h("device_private_scalar_hex") == _fixed("device private key")
    assert _h("token_private_scalar_hex") == _fixed("token private key")
    assert V["request_id"] == "tv1-" + _fixed("request id")[:8].hex()
    assert _h("nonce_hex") == _fixed("nonce")[:12]
    assert V["claim_client_id"] == "c-" + hashlib.sha256(_h("device_public_key_sec1_hex")).digest()[:8].hex()
    for name, value in V.items():
        if name.endswith("_hex"):
            assert re.fullmatch(r"(?:[0-9a-f]{2})+", value), f"{name} is not lowercase hex"


@pytest.mark.parametrize("who", ["cloud", "device", "token"])
def test_public_keys(who: str) -> None:
    scalar = _h(f"{who}_private_scalar_hex")
    point = _h(f"{who}_public_key_sec1_hex")
    assert _ref_public(scalar) == point
    assert crypto.sec1(crypto.private_key_from_scalar(scalar).public_key()) == point
    if who != "token":
        assert V[f"{who}_public_key_b64"] == base64.b64encode(point).decode("ascii")
        assert crypto.b64encode(point) == V[f"{who}_public_key_b64"]
        assert crypto.b64decode(V[f"{who}_public_key_b64"]) == point
        assert len(V[f"{who}_public_key_b64"]) == 88


@pytest.mark.parametrize("who", ["cloud", "token"])
def test_key_ids(who: str) -> None:
    point = _h(f"{who}_public_key_sec1_hex")
    kid = V[f"{who}_kid"]
    assert kid == hashlib.sha256(point).digest()[:8].hex()
    assert crypto.key_id(crypto.public_key_from_sec1(point)) == kid


def test_shared_secret_is_the_same_from_both_ends() -> None:
    cloud_scalar, device_scalar = _h("cloud_private_scalar_hex"), _h("device_private_scalar_hex")
    cloud_point, device_point = _h("cloud_public_key_sec1_hex"), _h("device_public_key_sec1_hex")
    shared = _h("shared_secret_hex")
    assert len(shared) == 32
    assert _ref_ecdh(device_scalar, cloud_point) == shared
    assert _ref_ecdh(cloud_scalar, device_point) == shared
    cloud = crypto.private_key_from_scalar(cloud_scalar)
    device = crypto.private_key_from_scalar(device_scalar)
    assert crypto.shared_secret(device, crypto.public_key_from_sec1(cloud_point)) == shared
    assert crypto.shared_secret(cloud, crypto.public_key_from_sec1(device_point)) == shared


def test_key_derivation() -> None:
    shared, request_id = _h("shared_secret_hex"), V["request_id"]
    assert _h("device_key_info_hex") == b"provbridge v1 device key" == crypto.DEVICE_KEY_INFO
    seal_info = b"provbridge v1 response seal " + request_id.encode("utf-8")
    assert _h("seal_key_info_hex") == seal_info == crypto.SEAL_KEY_INFO + request_id.encode("utf-8")
    assert "`provbridge v1 device key`" in DOC and "`provbridge v1 response seal `" in DOC

    prk, device_key = _ref_hkdf(shared, _h("device_key_info_hex"))
    assert prk == _h("hkdf_prk_hex")
    assert device_key == _h("device_key_hex") == crypto.derive_device_key(shared)
    prk, seal_key = _ref_hkdf(shared, seal_info)
    assert prk == _h("hkdf_prk_hex")
    assert seal_key == _h("seal_key_hex") == crypto.derive_seal_key(shared, request_id)


def test_sealed_box_opens_to_the_plaintext() -> None:
    key, nonce, request_id = _h("seal_key_hex"), _h("nonce_hex"), V["request_id"]
    sealed = base64.b64decode(V["sealed_ciphertext_b64"], validate=True)
    plaintext = V["plaintext"].encode("utf-8")
    assert _h("aad_hex") == request_id.encode("utf-8")
    assert sealed == _h("sealed_ciphertext_hex") + _h("sealed_tag_hex")
    assert len(_h("sealed_tag_hex")) == 16 and len(nonce) == crypto.NONCE_BYTES == 12
    assert AESGCM(key).decrypt(nonce, sealed, _h("aad_hex")) == plaintext
    assert crypto.open_sealed(key, crypto.SealedBox(nonce, sealed), request_id) == plaintext
    assert crypto.seal(key, plaintext, request_id, nonce=nonce) == crypto.SealedBox(nonce, sealed)


def test_answer_is_byte_identical_to_the_model_serialisation() -> None:
    raw = V["answer_json"].encode("utf-8")
    answer = models.ClaimOk.model_validate_json(raw)
    assert models.to_json(answer) == raw
    assert answer.status == "ok" and answer.request_id == V["request_id"]
    assert answer.device_id == V["device_id"]
    assert answer.cloud_key_id == V["cloud_kid"]
    assert answer.sealed.nonce == base64.b64encode(_h("nonce_hex")).decode("ascii")
    assert answer.sealed.ciphertext == V["sealed_ciphertext_b64"]
    box = crypto.SealedBox(crypto.b64decode(answer.sealed.nonce), crypto.b64decode(answer.sealed.ciphertext))
    shared = crypto.shared_secret(
        crypto.private_key_from_scalar(_h("device_private_scalar_hex")),
        crypto.public_key_from_sec1(crypto.b64decode(V["cloud_public_key_b64"])),
    )
    opened = crypto.open_sealed(crypto.derive_seal_key(shared, answer.request_id), box, answer.request_id)
    assert opened == V["plaintext"].encode("utf-8")


def test_plaintext_is_credentials() -> None:
    raw = V["plaintext"].encode("utf-8")
    credentials = models.Credentials.model_validate_json(raw)
    assert models.to_json(credentials) == raw
    assert credentials.api_key == V["api_key"]
    mqtt = credentials.mqtt
    assert mqtt.client_id == mqtt.username == V["device_id"]
    claims = json.loads(V["token_claims_json"])
    assert mqtt.expires_at == claims["exp"]
    assert mqtt.publish == claims["acl"]["pub"] == [f"devices/{V['device_id']}/#"]
    assert mqtt.subscribe == claims["acl"]["sub"] == [f"devices/{V['device_id']}/#"]


def test_token_is_an_es256_jwt_verifiable_with_the_jwks() -> None:
    token = models.Credentials.model_validate_json(V["plaintext"]).mqtt.token
    head, body, signature = token.split(".")
    assert _b64url_decode(head) == V["token_header_json"].encode("utf-8")
    assert _b64url_decode(body) == V["token_claims_json"].encode("utf-8")
    assert len(_b64url_decode(signature)) == 64  # r || s

    header = json.loads(V["token_header_json"])
    assert header == {"alg": "ES256", "typ": "JWT", "kid": V["token_kid"]}
    point = _h("token_public_key_sec1_hex")
    jwks = json.loads(V["jwks_json"])
    (jwk,) = jwks["keys"]
    assert jwk["kid"] == V["token_kid"] and jwk["crv"] == "P-256" and jwk["alg"] == "ES256"
    assert _b64url_decode(jwk["x"]) == point[1:33] and _b64url_decode(jwk["y"]) == point[33:]
    claims = jwt.decode(
        token,
        key=jwt.PyJWK(jwk).key,
        algorithms=["ES256"],
        audience="provbridge-mqtt",
        issuer="provbridge",
        options={"verify_exp": False},
    )
    assert claims == json.loads(V["token_claims_json"])
    assert list(claims) == ["iss", "aud", "sub", "tenant", "iat", "exp", "jti", "acl"]
    assert claims["sub"] == V["device_id"]
    assert claims["exp"] - claims["iat"] == 900
    assert set(claims["acl"]) == {"pub", "sub"}


def test_claim_is_valid_and_byte_identical_to_the_model_serialisation() -> None:
    raw = V["claim_json"].encode("utf-8")
    assert len(raw) <= models.MAX_CLAIM_BYTES
    claim = models.Claim.model_validate_json(raw)
    assert models.to_json(claim) == raw
    assert claim.request_id == V["request_id"]
    assert claim.public_key == V["device_public_key_b64"]
    assert claim.public_key_sec1 == _h("device_public_key_sec1_hex")
    assert claim.cloud_key_id == V["cloud_kid"]
    assert claim.provision_key == V["provision_key"]
    assert topics.is_valid_client_id(V["claim_client_id"])
    assert V["claim_topic"] == topics.claim_topic(topics.DEFAULT_PREFIX, V["claim_client_id"])
    assert V["response_topic"] == topics.response_topic(topics.DEFAULT_PREFIX, V["claim_client_id"])
    assert topics.client_id_of_claim_topic(topics.DEFAULT_PREFIX, V["claim_topic"]) == V["claim_client_id"]


INVALID_CLAIMS = sorted(name for name in V if name.startswith("invalid_claim."))


def test_there_are_invalid_claim_vectors() -> None:
    assert len(INVALID_CLAIMS) >= 10


@pytest.mark.parametrize("name", INVALID_CLAIMS)
def test_invalid_claim_is_refused_on_its_field(name: str) -> None:
    field, patch = V[name].split(" ", 1)
    payload = json.loads(V["claim_json"]) | json.loads(patch)
    with pytest.raises(ValidationError) as caught:
        models.Claim.model_validate_json(json.dumps(payload, ensure_ascii=False))
    fields = {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()}
    assert fields == {field}


UNREADABLE = sorted(name for name in V if name.startswith(("unreadable_claim.", "unreadable_refresh.")))


@pytest.mark.parametrize("name", UNREADABLE)
def test_nan_and_infinity_vectors_are_answered_as_not_json(name: str) -> None:
    base = V["claim_json"] if name.startswith("unreadable_claim.") else V["refresh_json"]
    patch = V[name]
    assert re.search(r"\b(NaN|Infinity)\b", patch), patch  # the vector holds what JSON does not have
    payload = json.dumps(json.loads(base) | json.loads(patch)).encode()  # Python writes them back as they were
    if name.startswith("unreadable_claim."):
        answer = parse_claim(payload)
    else:
        answer = parse_request(models.TokenRefresh, payload, models.MAX_REFRESH_BYTES, "token refresh")
    assert isinstance(answer, models.ClaimError) and answer.code is ErrorCode.VALIDATION_ERROR
    assert answer.request_id is None and [e.field for e in answer.errors or []] == [""]


def test_key_formats() -> None:
    assert re.fullmatch(r"pk_[A-Za-z0-9_-]{43}", V["provision_key"])
    assert _b64url_decode(V["provision_key"][3:]) == _fixed("provisioning key")
    assert re.fullmatch(r"dk_[A-Za-z0-9_-]{43,}", V["api_key"])
    assert _b64url_decode(V["api_key"][3:]) == _fixed("api key")
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    assert f"`{alphabet}`" in DOC
    assert re.fullmatch(rf"PROV-[{alphabet}]{{4}}-[{alphabet}]{{4}}", V["human_code"])
    code = V["human_code"].replace("PROV-", "").replace("-", "")
    assert sum(alphabet.index(c) << (5 * (7 - i)) for i, c in enumerate(code)) == int.from_bytes(
        _fixed("human code")[:5], "big"
    )
    assert re.fullmatch(r"dev_[a-z2-7]{26}", V["device_id"])
    assert topics.is_valid_client_id(V["device_id"])
    suffix = V["device_id"][4:].upper() + "======"
    assert base64.b32decode(suffix) == _fixed("device id")[:16]
    assert json.loads(V["token_claims_json"])["jti"] == _fixed("jti")[:16].hex()


def _vector_named(cell: str) -> str:
    """The value a row of the fixed-data table names: a vector line, or a member of one."""
    name = _code(cell)
    if name == "jti":
        return str(json.loads(V["token_claims_json"])["jti"])
    if name == "key_id_prefix":
        return str(json.loads(V["event_device_provisioned_json"])["key_id_prefix"])
    return V[name]


def _made_from(label: str, rule: str) -> str:
    """A rule of the fixed-data table applied as an outsider reads it: which bytes, which encoding, prefix."""
    data = _fixed(label)
    count = re.search(r"\b(?:all (\d+)|the first (\d+)) bytes", rule)
    assert count, rule
    data = data[: int(count.group(1) or count.group(2))]
    if "base64url" in rule:
        text = base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
    elif "Crockford base32" in rule:
        alphabet_match = re.search(r"alphabet `([0-9A-Z]{32})`", rule)
        assert alphabet_match, rule
        alphabet, number, bits = alphabet_match.group(1), int.from_bytes(data, "big"), 8 * len(data)
        digits = "".join(alphabet[(number >> (bits - 5 * (i + 1))) & 31] for i in range(bits // 5))
        assert "then `PROV-` + digits 1–4 + `-` + digits 5–8" in rule
        text = f"PROV-{digits[:4]}-{digits[4:]}"
    elif "lowercase base32" in rule:
        text = base64.b32encode(data).decode("ascii").rstrip("=").lower()
    elif "lowercase hex" in rule:
        text = data.hex()
    else:
        raise AssertionError(f"no encoding in {rule!r}")
    stated = re.search(r"(\d+) characters(?: after `[a-z]+_`|, no prefix)", rule)
    if stated:
        assert len(text) == int(stated.group(1)), rule
    prefix = re.match(r"`([a-z]+_)` \+ ", rule)
    text = (prefix.group(1) if prefix else "") + text
    truncated = re.search(r"the first (\d+) characters", rule)
    return text[: int(truncated.group(1))] if truncated else text


def test_fixed_data_table_says_how_each_value_is_made() -> None:
    """Section 15's table of fixed data, applied literally, reproduces the vectors."""
    rows = _table("fixed-data")
    assert [_code(row["vector"]) for row in rows] == [
        "provision_key",
        "api_key",
        "device_id",
        "jti",
        "human_code",
        "key_id_prefix",
    ]
    assert f'`SHA-256("{LABEL}" ‖ label)`' in DOC
    for row in rows:
        assert _made_from(_code(row["label"]), row["made from `f(label)`"]) == _vector_named(row["vector"]), row


def test_flood_limit_table_matches_the_config_defaults() -> None:
    """Section 7.4's table and notes give the defaults of bridge/config.py, so the two cannot drift."""
    defaults = ClaimSettings()
    rows = _table("flood-limits")
    covered = set()
    for row in rows:
        per_second, burst = re.findall(r"`claims\.(rate_\w+)`", row["settings"])
        assert per_second == burst.replace("_burst", "_per_second"), row
        rate, size = getattr(defaults, per_second), getattr(defaults, burst)
        assert float(row["rate (per second)"]) == rate, row
        assert int(row["burst"]) == size, row
        assert int(row["longest `retry_after` (s)"]) == max(1, math.ceil(1 / rate)), row
        covered.add(per_second)
    # Every limit a device's own requests count against (the events budget counts the bridge's events).
    limits = {name for name in ClaimSettings.model_fields if name.endswith("_per_second")} - {"rate_events_per_second"}
    assert covered == limits
    assert defaults.rate_limits
    assert f"`claims.max_in_flight` ({defaults.max_in_flight})" in DOC
    assert f"`claims.retry_after_seconds` ({defaults.retry_after_seconds})" in DOC
    assert f"`claims.rate_client_pause_seconds` ({defaults.rate_client_pause_seconds:g} s)" in DOC
    plugin_rate = PUBLISH_LIMIT_FACTOR * defaults.rate_client_per_second
    plugin_burst = PUBLISH_LIMIT_FACTOR * defaults.rate_client_burst
    assert f"twice the client-id limit ({plugin_rate:g} per second, burst {plugin_burst})" in DOC
    assert PUBLISH_LIMIT_FACTOR == 2


REJECTED_KEYS = sorted(name for name in V if name.startswith("reject_") and name.endswith("_public_key_hex"))


@pytest.mark.parametrize("name", REJECTED_KEYS)
def test_bad_public_key_is_rejected(name: str) -> None:
    data = _h(name)
    with pytest.raises(ValueError):
        _ref_point(data)
    with pytest.raises(InvalidPublicKey):
        crypto.public_key_from_sec1(data)
    payload = json.loads(V["claim_json"]) | {"public_key": base64.b64encode(data).decode("ascii")}
    with pytest.raises(ValidationError) as caught:
        models.Claim.model_validate_json(json.dumps(payload))
    assert [error["loc"] for error in caught.value.errors()] == [("public_key",)]


def test_x0_public_key_is_accepted_and_x_equal_p_is_its_unreduced_twin() -> None:
    good, bad = _h("accept_x0_public_key_hex"), _h("reject_x_equals_p_public_key_hex")
    assert _ref_point(good) == (0, int.from_bytes(good[33:], "big"))
    assert crypto.sec1(crypto.public_key_from_sec1(good)) == good
    assert int.from_bytes(bad[1:33], "big") == P and bad[33:] == good[33:]
    assert len(REJECTED_KEYS) >= 4


@pytest.mark.parametrize("name", ["reject_tampered_ciphertext_b64", "reject_tampered_tag_b64"])
def test_tampered_box_does_not_open(name: str) -> None:
    key, nonce, request_id = _h("seal_key_hex"), _h("nonce_hex"), V["request_id"]
    tampered = base64.b64decode(V[name], validate=True)
    original = base64.b64decode(V["sealed_ciphertext_b64"], validate=True)
    assert len(tampered) == len(original)
    assert sum(bin(a ^ b).count("1") for a, b in zip(tampered, original, strict=True)) == 1
    with pytest.raises(SealError):
        crypto.open_sealed(key, crypto.SealedBox(nonce, tampered), request_id)


def test_box_does_not_open_for_another_request_id() -> None:
    wrong = V["reject_wrong_request_id"]
    assert wrong != V["request_id"]
    sealed = crypto.SealedBox(_h("nonce_hex"), base64.b64decode(V["sealed_ciphertext_b64"], validate=True))
    shared = _h("shared_secret_hex")
    with pytest.raises(SealError):  # the seal key of the other request_id
        crypto.open_sealed(crypto.derive_seal_key(shared, wrong), sealed, wrong)
    with pytest.raises(SealError):  # the right seal key, but the other request_id as AAD
        crypto.open_sealed(_h("seal_key_hex"), sealed, wrong)


@pytest.mark.parametrize("name", sorted(name for name in V if name.startswith("error_")))
def test_error_examples(name: str) -> None:
    raw = V[name].encode("utf-8")
    error = models.ClaimError.model_validate_json(raw)
    assert models.to_json(error) == raw
    assert name.startswith(f"error_{error.code.value}_")
    assert (error.retry_after is not None) == error.code.retryable
    assert (error.request_id is None) == name.endswith("_unreadable_json")


@pytest.mark.parametrize("name", sorted(name for name in V if name.startswith(("event_", "status_"))))
def test_event_and_status_examples(name: str) -> None:
    raw = V[name].encode("utf-8")
    if name.startswith("event_"):
        event = models.Event.model_validate_json(raw)
        assert models.to_json(event) == raw
        assert name == f"event_{event.event.replace('.', '_')}_json"
        assert f"| `{event.event}` |" in DOC
    else:
        status = models.BridgeStatus.model_validate_json(raw)
        assert models.to_json(status) == raw
        assert name == f"status_{status.status}_json"


def _matches(example: Any, actual: Any) -> bool:
    """`example` equals `actual`, where a string with `…` stands for its head…tail."""
    if isinstance(example, str) and isinstance(actual, str) and "…" in example:
        head, tail = example.split("…", 1)
        return actual.startswith(head) and actual.endswith(tail) and len(actual) >= len(head) + len(tail)
    if isinstance(example, dict) and isinstance(actual, dict):
        return list(example) == list(actual) and all(_matches(example[k], actual[k]) for k in example)
    if isinstance(example, list) and isinstance(actual, list):
        return len(example) == len(actual) and all(map(_matches, example, actual))
    return type(example) is type(actual) and example == actual


def test_json_examples_in_the_prose_match_the_vectors() -> None:
    """Each ```json block is one pretty object, or one compact object per line; each must be a vector."""
    blocks = re.findall(r"```json\n(.*?)```", DOC, flags=re.DOTALL)
    wire = [json.loads(value) for value in V.values() if value.startswith("{")]
    examples: list[Any] = []
    for block in blocks:
        lines = [line for line in block.split("\n") if line]
        if all(line.startswith("{") and line.endswith("}") for line in lines):
            assert all(line in V.values() for line in lines), "compact example differs from every vector"
            examples.extend(json.loads(line) for line in lines)
        else:
            examples.append(json.loads(block))
    assert len(examples) >= 8
    for example in examples:
        assert any(_matches(example, actual) for actual in wire), f"example matches no vector: {example}"


# --------------------------------------------------------------------------- token refresh (section 10.1)


def _ref_refresh_mac_input(device_id: str, request_id: str, timestamp: str) -> bytes:
    """The MAC input as section 10.1 describes it, written from the text."""
    return b"provbridge v1 token refresh\n" + f"{device_id}\n{request_id}\n{timestamp}".encode("ascii")


def test_refresh_fixed_inputs() -> None:
    assert V["refresh_request_id"] == "tv1-" + _fixed("refresh request id")[:8].hex()
    iat = json.loads(V["token_claims_json"])["iat"]
    assert int(V["refresh_timestamp"]) == iat + 600
    assert V["refresh_topic"] == topics.token_topic(topics.DEFAULT_PREFIX, V["claim_client_id"])
    assert topics.client_id_of_token_topic(topics.DEFAULT_PREFIX, V["refresh_topic"]) == V["claim_client_id"]


def test_refresh_mac() -> None:
    device_id, request_id, timestamp = V["device_id"], V["refresh_request_id"], V["refresh_timestamp"]
    mac_input = _ref_refresh_mac_input(device_id, request_id, timestamp)
    assert mac_input == _h("refresh_mac_input_hex")
    assert crypto.refresh_mac_input(device_id, request_id, int(timestamp)) == mac_input
    mac = hmac.new(_h("device_key_hex"), mac_input, hashlib.sha256).digest()
    assert mac == _h("refresh_mac_hex")
    assert crypto.refresh_mac(_h("device_key_hex"), device_id, request_id, int(timestamp)) == mac
    assert crypto.refresh_mac_matches(_h("device_key_hex"), device_id, request_id, int(timestamp), mac)
    for other in ((device_id, request_id, int(timestamp) + 1), (device_id, V["request_id"], int(timestamp))):
        assert not crypto.refresh_mac_matches(_h("device_key_hex"), *other, mac)


def test_refresh_json_is_byte_identical_to_the_model_serialisation() -> None:
    raw = V["refresh_json"].encode("utf-8")
    assert len(raw) <= models.MAX_REFRESH_BYTES
    refresh = models.TokenRefresh.model_validate_json(raw)
    assert models.to_json(refresh) == raw
    assert refresh.device_id == V["device_id"] and refresh.request_id == V["refresh_request_id"]
    assert refresh.timestamp == int(V["refresh_timestamp"])
    assert refresh.mac == base64.b64encode(_h("refresh_mac_hex")).decode("ascii")
    assert refresh.mac_bytes == _h("refresh_mac_hex")


# --------------------------------------------------------------------------- certificate credentials (10.4)


def test_the_csr_is_for_the_device_key_and_proves_possession() -> None:
    csr = x509.load_der_x509_csr(base64.b64decode(V["csr_b64"], validate=True))
    assert csr.is_signature_valid and isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert crypto.sec1(csr.public_key()) == _h("device_public_key_sec1_hex")  # type: ignore[arg-type]
    assert csr.subject.rfc4514_string() == "CN=SN-4711-0042"
    assert crypto.csr_key_sec1(crypto.parse_csr_der(base64.b64decode(V["csr_b64"]))) == _h("device_public_key_sec1_hex")


def test_the_certificate_claim_is_the_claim_with_its_csr() -> None:
    raw = V["certificate_claim_json"].encode("utf-8")
    claim = models.Claim.model_validate_json(raw)
    assert models.to_json(claim) == raw
    assert claim.csr == V["csr_b64"] and claim.request_id == V["request_id"]
    assert claim.public_key == V["device_public_key_b64"]


def test_the_certificate_answer_opens_to_the_certificate_credentials() -> None:
    box = base64.b64decode(V["certificate_sealed_ciphertext_b64"])
    plaintext = AESGCM(_h("seal_key_hex")).decrypt(_h("nonce_hex"), box, V["request_id"].encode("ascii"))
    assert plaintext == V["certificate_plaintext"].encode("utf-8")
    credentials = models.Credentials.model_validate_json(plaintext)
    mqtt = credentials.mqtt
    assert mqtt.token is None and mqtt.certificate is not None and mqtt.tls
    device_cert = x509.load_der_x509_certificate(base64.b64decode(V["device_certificate_b64"]))
    ca_cert = x509.load_der_x509_certificate(base64.b64decode(V["device_ca_certificate_b64"]))
    pem = serialization.Encoding.PEM
    assert mqtt.certificate == (device_cert.public_bytes(pem) + ca_cert.public_bytes(pem)).decode("ascii")
    # What the broker relies on: issued by the CA whose key is the fixed scalar, for the device key and id.
    ca_key = crypto.private_key_from_scalar(_h("device_ca_private_scalar_hex"))
    assert ca_cert.public_key() == ca_key.public_key()
    device_cert.verify_directly_issued_by(ca_cert)
    assert crypto.sec1(device_cert.public_key()) == _h("device_public_key_sec1_hex")  # type: ignore[arg-type]
    assert device_cert.subject.rfc4514_string() == f"CN={V['device_id']},OU=acme,O=provbridge"
    assert int(device_cert.not_valid_after_utc.timestamp()) == mqtt.expires_at
    scope = scope_of(device_cert)
    assert scope is not None and list(scope.publish) == mqtt.publish and list(scope.subscribe) == mqtt.subscribe


def test_renewal_mac_matches_an_independent_computation() -> None:
    device_id, request_id, timestamp, csr = (
        V["device_id"],
        V["renewal_request_id"],
        V["refresh_timestamp"],
        V["csr_b64"],
    )
    label = b"provbridge v1 certificate renewal"
    assert len(label) == 33 and label == crypto.RENEWAL_MAC_LABEL
    mac_input = b"\n".join((label, device_id.encode(), request_id.encode(), timestamp.encode(), csr.encode()))
    assert mac_input == _h("renewal_mac_input_hex")
    mac = hmac.new(_h("device_key_hex"), mac_input, hashlib.sha256).digest()
    assert mac == _h("renewal_mac_hex")
    assert crypto.refresh_mac(_h("device_key_hex"), device_id, request_id, int(timestamp), csr) == mac
    # Not valid as a token refresh MAC, nor with any other CSR.
    assert not crypto.refresh_mac_matches(_h("device_key_hex"), device_id, request_id, int(timestamp), mac)
    assert not crypto.refresh_mac_matches(_h("device_key_hex"), device_id, request_id, int(timestamp), mac, csr[:-4])


def test_renewal_json_is_byte_identical_to_the_model_serialisation() -> None:
    raw = V["renewal_json"].encode("utf-8")
    assert len(raw) <= models.MAX_REFRESH_BYTES
    renewal = models.TokenRefresh.model_validate_json(raw)
    assert models.to_json(renewal) == raw
    assert renewal.csr == V["csr_b64"] and renewal.mac_bytes == _h("renewal_mac_hex")
    assert renewal.csr_public_key_sec1 == _h("device_public_key_sec1_hex")


def test_a_renewal_with_the_longest_csr_and_ids_fits_the_refresh_limit() -> None:
    longest = {
        "request_id": "r" * 64,
        "device_id": V["device_id"],
        "timestamp": 1 << 40,
        "mac": "A" * 44,
        "csr": "A" * models.MAX_CSR_CHARS,
    }
    assert len(json.dumps(longest, separators=(",", ":"))) <= models.MAX_REFRESH_BYTES


INVALID_REFRESHES = sorted(name for name in V if name.startswith("invalid_refresh."))


def test_there_are_invalid_refresh_vectors() -> None:
    assert len(INVALID_REFRESHES) >= 5


@pytest.mark.parametrize("name", INVALID_REFRESHES)
def test_invalid_refresh_is_refused_on_its_field(name: str) -> None:
    field, patch = V[name].split(" ", 1)
    payload = json.loads(V["refresh_json"]) | json.loads(patch)
    with pytest.raises(ValidationError) as caught:
        models.TokenRefresh.model_validate_json(json.dumps(payload))
    assert {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()} == {field}


def test_refresh_situation_table() -> None:
    rows = _table("refresh-situations")
    answers = " ".join(row["answer"] for row in rows)
    used = set(re.findall(r"`([a-z_]+)`", answers))
    assert used - {"errors", "retry_after"} == {code.value for code in ErrorCode} - {"device_exists"}
    reasons = {
        re.findall(r"`([a-z_]+)`", row["`reason` in the `token.refresh_rejected` event"])[0] for row in rows[:-2]
    }
    assert reasons == {r.value for r in RefreshDenial}
    assert all(f"`{r.value}`" in DOC for r in RefreshDenial)


# --------------------------------------------------------------------------- the tables and constants

WIRE_MODELS: dict[str, type[BaseModel]] = {
    name: model
    for name, model in vars(models).items()
    if isinstance(model, type)
    and issubclass(model, models._Strict | models._Answer)
    and not name.startswith("_")  # the bases: _Strict, _Answer, _CarriesCsr
    and model.__module__ == models.__name__
}


def test_every_wire_model_has_a_field_table() -> None:
    documented = set(re.findall(r"<!-- fields: (\w+) -->", DOC))
    assert documented == set(WIRE_MODELS)


LIMIT_KEYWORDS = ("minLength", "maxLength", "minimum", "maximum", "pattern")


def _json_type_and_limits(schema: dict[str, Any], defs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if "anyOf" in schema:
        (schema,) = [branch for branch in schema["anyOf"] if branch.get("type") != "null"]
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    limits = {k: v for k, v in schema.items() if k in LIMIT_KEYWORDS}
    return schema["type"], limits


@pytest.mark.parametrize("model_name", sorted(WIRE_MODELS))
def test_field_table_matches_the_model(model_name: str) -> None:
    model = WIRE_MODELS[model_name]
    rows = _table(f"fields: {model_name}")
    names = [_code(row["field"]).rsplit(".", 1)[-1] for row in rows]
    assert names == list(model.model_fields), "the table must list every field, in wire order"
    schema = model.model_json_schema()
    for row, name in zip(rows, names, strict=True):
        field = model.model_fields[name]
        presence = (row.get("required") or row["present"]).split()[0].lower()
        assert presence in ("yes", "no", "always", "optional"), row
        always = field.is_required() or field.default is not None
        assert (presence in ("yes", "always")) == always, f"{model_name}.{name}: required/present"
        json_type, limits = _json_type_and_limits(schema["properties"][name], schema.get("$defs", {}))
        assert row["type"].split()[0] == json_type, f"{model_name}.{name}: type"
        if "limits" in row:
            cell = row["limits"]
            outside_code = re.sub(r"`[^`]*`", "", cell)
            numbers = {int(n) for n in re.findall(r"[0-9]+", outside_code)}
            bounds = {v for k, v in limits.items() if k != "pattern"}
            assert numbers == bounds, f"{model_name}.{name}: limits {cell!r} vs {limits}"
            if "pattern" in limits:
                assert f"`{limits['pattern'].removeprefix('^').removesuffix('$')}`" in cell
            if name in ("provision_key", "hardware_id", "device_name"):
                assert "printable" in cell


def test_error_code_table() -> None:
    rows = _table("error-codes")
    documented = {_code(row["code"]): row["retryable"] for row in rows}
    assert set(documented) == {code.value for code in ErrorCode}
    for code in ErrorCode:
        assert documented[code.value] == ("yes" if code.retryable else "no")


def test_situation_table_uses_real_codes() -> None:
    answers = " ".join(row["answer"] for row in _table("situations"))
    used = set(re.findall(r"`([a-z_]+)`", answers))
    assert {code.value for code in ErrorCode} <= used
    field_names = set(models.Claim.model_fields) | set(models.ClaimError.model_fields)
    assert used - {code.value for code in ErrorCode} <= field_names | {"_", "ok"}


def test_topic_table() -> None:
    documented = {_code(row["topic"]) for row in _table("topics")}
    assert documented == {
        topics.claim_topic("{prefix}", "{client_id}"),
        topics.response_topic("{prefix}", "{client_id}"),
        topics.event_topic("{prefix}", "{tenant}", "{event}"),
        topics.status_topic("{prefix}"),
        topics.token_topic("{prefix}", "{client_id}"),
        topics.presence_topic("{prefix}", "{device_id}"),
    }
    assert topics.claim_subscription("{prefix}") in DOC
    assert topics.token_subscription("{prefix}") in DOC


def test_constants_in_the_prose() -> None:
    assert provwire.PROTOCOL_VERSION == 1 and topics.DEFAULT_PREFIX == "prov/v1"
    assert f"`{topics.DEFAULT_PREFIX}`" in DOC
    assert f"`{topics.CLIENT_ID_RE.pattern}`" in DOC
    assert models.MAX_CLAIM_BYTES == 16384 and "16384 bytes" in DOC
    assert models.MAX_REFRESH_BYTES == 1024 and "at most 1024 bytes" in DOC
    assert f"`{crypto.REFRESH_MAC_LABEL.decode()}`" in DOC
    assert "300 s" in DOC and TokenSettings().refresh_skew_seconds == 300
    assert crypto.SEC1_UNCOMPRESSED_LEN == 65 and crypto.NONCE_BYTES == 12
    for bad in ("", "a/b", "a+b", "x" * 65, "é"):
        assert not topics.is_valid_client_id(bad)


def test_generator_reproduces_the_block() -> None:
    """tests/vectors.py regenerates the block exactly, so regenerating after a change is safe."""
    spec = importlib.util.spec_from_file_location("provbridge_protocol_vectors", GENERATOR_PATH)
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    try:
        rendered = generator.render()
    except TypeError as exc:  # cryptography < 44 has no deterministic ECDSA (RFC 6979)
        pytest.skip(f"deterministic ECDSA unavailable: {exc}")
    assert rendered == BLOCK
