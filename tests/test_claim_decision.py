"""`decide`, table-driven: every branch of PROTOCOL.md §7.2's decision order, with no database, broker or clock.

Each case gives the rows the claim's transaction read (`ClaimFacts`) and checks the verdict: the answer's
code, or the action granted, and the events with their reasons.
"""

import hashlib
import json
from dataclasses import dataclass, field, replace

import pytest

from bridge.claims import decision as claim_decision
from bridge.claims.decision import Action, Answered, ClaimFacts, ClaimRequest, Fresh, Granted, decide
from bridge.storage.records import Device, ProvisionKey, StoredAnswer
from provwire import crypto
from provwire.models import Claim
from tests.helpers.bridge import device_row, provision_key_row
from tests.helpers.imports import imports_of

NOW = 1_800_000_000.0
KEY_HASH = hashlib.sha256(b"pk_test").digest()
PUBLIC_KEY = crypto.sec1(crypto.generate_private_key().public_key())
OTHER_PUBLIC_KEY = crypto.sec1(crypto.generate_private_key().public_key())
CLAIM = Claim(
    request_id="r-decide-0001",
    provision_key="pk_test",
    hardware_id="SN-1",
    public_key=crypto.b64encode(PUBLIC_KEY),
)
REQUEST = ClaimRequest("c-1", CLAIM, b"digest", KEY_HASH, "cloudkid00000001", NOW)
FRESH = Fresh(device_id="dev_" + "a" * 26, api_key="dk_new")


def key(**overrides: object) -> ProvisionKey:
    return provision_key_row(**({"key_hash": KEY_HASH} | overrides))


def device(**overrides: object) -> Device:
    return device_row(**({"id": "dev_" + "b" * 26, "hardware_id": "SN-1", "public_key": PUBLIC_KEY} | overrides))


@dataclass
class Case:
    facts: ClaimFacts
    code: str | None = None  # the error code answered, or None for a grant
    action: Action | None = None
    events: list[tuple[str, str | None]] = field(default_factory=list)  # (event, reason)


CASES = {
    # A replay comes before everything, even a key revoked since.
    "replay, same claim": Case(ClaimFacts(StoredAnswer(b"digest", b"the stored answer"), key(status="revoked"), None)),
    "replay, other claim": Case(ClaimFacts(StoredAnswer(b"other", b"x"), key(), None), code="validation_error"),
    "unknown key": Case(ClaimFacts(None, None, None), "permission_denied", events=[("claim.rejected", "unknown_key")]),
    "a row whose hash differs": Case(
        ClaimFacts(None, key(key_hash=b"\0" * 32), None),
        "permission_denied",
        events=[("claim.rejected", "unknown_key")],
    ),
    "key revoked": Case(
        ClaimFacts(None, key(status="revoked"), None), "permission_denied", events=[("claim.rejected", "key_revoked")]
    ),
    "key expired": Case(
        ClaimFacts(None, key(expires_at=int(NOW)), None),
        "permission_denied",
        events=[("claim.rejected", "key_expired")],
    ),
    "hardware id off pattern": Case(
        ClaimFacts(None, key(hardware_id_pattern="LINE-[0-9]+"), None),
        "permission_denied",
        events=[("claim.rejected", "hardware_id_mismatch")],
    ),
    "pattern RE2 cannot run": Case(
        ClaimFacts(None, key(hardware_id_pattern=r"(SN)-\1"), None),
        "permission_denied",
        events=[("claim.rejected", "hardware_id_pattern_invalid")],
    ),
    "device revoked": Case(
        ClaimFacts(None, key(), device(status="revoked")),
        "permission_denied",
        events=[("claim.rejected", "device_revoked")],
    ),
    "other public key, reject policy": Case(
        ClaimFacts(None, key(), device(public_key=OTHER_PUBLIC_KEY)),
        "device_exists",
        events=[("claim.rejected", "public_key_mismatch")],
    ),
    "other public key, a rotate key that did not create it": Case(
        ClaimFacts(None, key(reclaim_policy="rotate"), device(public_key=OTHER_PUBLIC_KEY, key_id="key_0")),
        "device_exists",
        events=[("claim.rejected", "public_key_mismatch")],
    ),
    "new device, key exhausted": Case(
        ClaimFacts(None, key(max_registrations=3, registrations=3), None),
        "permission_denied",
        events=[("claim.rejected", "key_exhausted")],
    ),
    "known device of another key, key exhausted": Case(
        ClaimFacts(None, key(max_registrations=1, registrations=1), device(key_id="key_0")),
        "permission_denied",
        events=[("claim.rejected", "key_exhausted")],
    ),
    "new device": Case(ClaimFacts(None, key(), None), action=Action.CREATE, events=[("device.provisioned", None)]),
    "new device, the key's last use": Case(
        ClaimFacts(None, key(max_registrations=3, registrations=2), None),
        action=Action.CREATE,
        events=[("device.provisioned", None), ("key.exhausted", None)],
    ),
    "same public key": Case(
        ClaimFacts(None, key(), device()), action=Action.RECLAIM, events=[("device.reclaimed", None)]
    ),
    "same public key, its exhausted creating key": Case(
        ClaimFacts(None, key(max_registrations=1, registrations=1), device()),
        action=Action.RECLAIM,
        events=[("device.reclaimed", None)],
    ),
    "other public key, its rotate creating key": Case(
        ClaimFacts(None, key(reclaim_policy="rotate"), device(public_key=OTHER_PUBLIC_KEY)),
        action=Action.ROTATE,
        events=[("device.reprovisioned", None)],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_decide(name: str) -> None:
    case = CASES[name]
    verdict = decide(REQUEST, case.facts, FRESH)
    assert [(e.event, e.reason) for e in verdict.events] == case.events
    if case.code is None and case.action is None:  # the replay
        assert verdict == Answered(b"the stored answer", [])
    elif case.code is not None:
        assert isinstance(verdict, Answered)
        answer = json.loads(verdict.answer)
        assert (answer["code"], answer["request_id"]) == (case.code, CLAIM.request_id)
    else:
        assert isinstance(verdict, Granted) and verdict.action is case.action


def test_a_new_device_takes_the_fresh_id_and_api_key_and_the_claims_facts() -> None:
    verdict = decide(REQUEST, ClaimFacts(None, key(labels={"site": "ber"}), None), FRESH)
    assert isinstance(verdict, Granted)
    made = verdict.device
    assert (made.id, made.hardware_id, made.public_key, made.cloud_key_id) == (
        FRESH.device_id,
        "SN-1",
        PUBLIC_KEY,
        REQUEST.cloud_kid,
    )
    assert verdict.api_key == FRESH.api_key and made.labels == {"site": "ber"} and made.created_at == int(NOW)
    assert verdict.events[0].device_id == FRESH.device_id and verdict.events[0].tenant == "t"


def test_a_reclaim_keeps_the_device_and_its_api_key() -> None:
    known = device()
    verdict = decide(REQUEST, ClaimFacts(None, key(), known), FRESH)
    assert isinstance(verdict, Granted) and verdict.device == known and verdict.api_key == ""


def test_a_rotation_records_the_claims_public_key_and_a_new_api_key() -> None:
    known = device(public_key=OTHER_PUBLIC_KEY)
    verdict = decide(REQUEST, ClaimFacts(None, key(reclaim_policy="rotate"), known), FRESH)
    assert isinstance(verdict, Granted) and verdict.api_key == FRESH.api_key
    assert verdict.device == replace(known, public_key=PUBLIC_KEY, cloud_key_id=REQUEST.cloud_kid, updated_at=int(NOW))


def test_deciding_twice_gives_the_same_verdict() -> None:
    facts = ClaimFacts(None, key(max_registrations=3, registrations=2), None)
    assert decide(REQUEST, facts, FRESH) == decide(REQUEST, facts, FRESH)


# The decision's module may import only these: no database, network, files, processes, clock or randomness.
PURE_IMPORTS = {
    "dataclasses",
    "enum",
    "hmac",
    "typing",
    "bridge.claims.hardware_pattern",
    "bridge.errors",
    "bridge.storage.records",
    "provwire.errors",
    "provwire.models",
}


def test_the_decision_imports_nothing_that_does_io() -> None:
    imported = imports_of(claim_decision)
    assert imported <= PURE_IMPORTS, imported - PURE_IMPORTS
