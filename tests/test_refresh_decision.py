"""`decide_refresh`, table-driven: the checks after the MAC (PROTOCOL.md §10.1), with no database or broker."""

from dataclasses import replace

import pytest

from bridge.claims import refresh_decision
from bridge.claims.refresh_decision import RefreshDenial, RefreshFacts, RefreshGranted, RefreshRefused, decide_refresh
from provwire import crypto
from provwire.models import TokenRefresh
from tests.helpers.bridge import device_row
from tests.helpers.imports import imports_of

NOW = 1_800_000_000
SKEW = 300
DEVICE = device_row(
    id="dev_" + "a" * 26, hardware_id="SN-1", public_key=b"\x04" + b"\x01" * 64, cloud_key_id="cloudkid00000000"
)
REQUEST = TokenRefresh(
    request_id="r-refresh-0001", device_id=DEVICE.id, timestamp=NOW - 10, mac=crypto.b64encode(b"\0" * 32)
)

CASES: dict[str, tuple[RefreshFacts, RefreshDenial | None]] = {
    "deleted since the MAC check": (RefreshFacts(None, False), RefreshDenial.BAD_MAC),
    "re-keyed since the MAC check": (
        RefreshFacts(replace(DEVICE, public_key=b"\x04" + b"\x02" * 64), False),
        RefreshDenial.BAD_MAC,
    ),
    "moved to another cloud key": (
        RefreshFacts(replace(DEVICE, cloud_key_id="cloudkid00000001"), False),
        RefreshDenial.BAD_MAC,
    ),
    "revoked": (RefreshFacts(replace(DEVICE, status="revoked"), True), RefreshDenial.DEVICE_REVOKED),
    "replayed": (RefreshFacts(DEVICE, True), RefreshDenial.REPLAYED),
    "granted": (RefreshFacts(DEVICE, False), None),
}


@pytest.mark.parametrize("name", CASES)
def test_decide_refresh(name: str) -> None:
    facts, reason = CASES[name]
    verdict = decide_refresh(REQUEST, DEVICE, facts, NOW, SKEW)
    if reason is None:
        assert verdict == RefreshGranted(DEVICE, REQUEST.timestamp + SKEW)
    else:
        assert isinstance(verdict, RefreshRefused) and verdict.reason is reason


@pytest.mark.parametrize("timestamp", [NOW - SKEW - 1, NOW + SKEW + 1])
def test_a_timestamp_beyond_the_skew_is_stale_and_checked_before_the_replay(timestamp: int) -> None:
    stale = REQUEST.model_copy(update={"timestamp": timestamp})
    verdict = decide_refresh(stale, DEVICE, RefreshFacts(DEVICE, True), NOW, SKEW)
    assert isinstance(verdict, RefreshRefused) and verdict.reason is RefreshDenial.STALE_TIMESTAMP


def test_the_refresh_decision_imports_nothing_that_does_io() -> None:
    modules = imports_of(refresh_decision)
    assert modules <= {"dataclasses", "enum", "bridge.storage.records", "provwire.models"}, modules
