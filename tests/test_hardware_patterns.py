"""Hardware-id patterns run in RE2: linear time whatever the admin wrote (issue 9, item 1).

A pattern like `([A-Z0-9]+-?)+` backtracks exponentially in Python's `re` on `"A" * n + "!"`: one claim
with such a hardware id used to stall every claim behind it. These tests send that claim through the real
broker, create keys through the real CLI, and run the real doctor on databases shaped as older versions
left them.
"""

import json
import time

import pytest

from bridge.claims import hardware_pattern
from bridge.claims.decision import Denial, key_denial
from bridge.cli import main as cli
from bridge.config import Settings
from bridge.errors import InvalidPattern
from bridge.ops import admin, doctor
from bridge.storage.store import Store
from provwire.errors import ErrorCode
from provwire.models import ClaimError, ClaimOk
from tests.helpers.bridge import Bridge, provision_key_row
from tests.helpers.devices import Device

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends

SEGMENTS = r"([A-Z0-9]+-?)+"  # an ordinary admin pattern, exponential in a backtracking engine
HOSTILE_ID = "A" * 127 + "!"  # 128 characters, the most a hardware id may have


# --- the engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hardware_id", "matches"),
    [("SN-4711-0042", True), ("A", True), ("AB-CD-", True), ("-AB", False), ("ab-12", False), (HOSTILE_ID, False)],
)
def test_the_segments_pattern_is_accepted_and_matched_as_written(hardware_id: str, matches: bool) -> None:
    assert hardware_pattern.fullmatch(SEGMENTS, hardware_id) is matches
    expected = None if matches else Denial.HARDWARE_ID_MISMATCH
    assert key_denial(provision_key_row(hardware_id_pattern=SEGMENTS), hardware_id, now=0) is expected


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "invalid escape sequence"),  # a backreference
        (r"(?=SN)SN-\d+", "invalid perl operator"),  # look-ahead
        (r"SN-\d+\Z", "invalid escape sequence"),  # Python's \Z (RE2 spells it \z)
        ("a{,2}", "literal text"),  # Python repeats {,2}; RE2 would match the text "a{,2}"
        ("a{4294967296}", "literal text"),
        ("x" * (hardware_pattern.MAX_PATTERN_LENGTH + 1), "longer than"),
    ],
)
def test_patterns_re2_cannot_run_as_meant_are_refused_with_the_reason(pattern: str, why: str) -> None:
    with pytest.raises(InvalidPattern, match=why):
        hardware_pattern.compile_pattern(pattern)
    # A stored one (from before RE2) refuses every claim rather than being matched some other way.
    assert (
        key_denial(provision_key_row(hardware_id_pattern=pattern), "SN-1", now=0) is Denial.HARDWARE_ID_PATTERN_INVALID
    )


def _differences(pattern: str, known: list[str] | None = None) -> list[str]:
    return hardware_pattern.differences(pattern, doctor.python_matches, known or [])


def test_differences_find_what_python_re_matched_and_re2_does_not() -> None:
    assert _differences(SEGMENTS) == []
    assert _differences(r"[0-9A-F]{8}") == []
    # RE2's \d, \w and \s are ASCII; Python's are Unicode.
    assert "'SN-٣' matched before and no longer does" in _differences(r"SN-\d")
    assert any("matched before and no longer does" in found for found in _differences(r"\w+"))
    # POSIX classes: a set of characters to Python, a class to RE2.
    assert _differences("[[:alpha:]]+")
    # A device Python's re let in that RE2 would refuse is named with the count.
    found = _differences(r"SN-\d+", ["SN-1", "SN-٣", "SN-٤"])
    assert found[0] == "2 of its devices' hardware ids no longer match, e.g. 'SN-٣'"


@pytest.mark.parametrize("pattern", [r"ID-\D{4}", r"[^\s]+", r"\W"])
def test_differences_find_what_re2_lets_in_that_python_re_refused(pattern: str) -> None:
    # The allow-list grew: a non-ASCII digit, space or letter is not \d, \s, \w to RE2.
    assert any("did not match before and now does" in found for found in _differences(pattern)), pattern


def test_a_pattern_python_re_backtracks_on_cannot_stall_the_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "PYTHON_MATCH_TIMEOUT_SECONDS", 1.0)
    # RE2 runs it; Python's re takes 2^40 steps on the probe "a" * 40 (\b\B never holds).
    assert _differences(r"(a|a){40}\b\B") == [
        "Python's re did not answer in time on strings built from it (it backtracks), so it cannot be compared"
    ]


def test_braces_in_classes_and_escaped_braces_are_not_repetitions() -> None:
    assert hardware_pattern.fullmatch(r"[{,5}]", ",")  # a class holding "{", ",", "5" and "}"
    assert hardware_pattern.fullmatch(r"\{,5}", "{,5}")
    with pytest.raises(InvalidPattern, match="literal text"):
        hardware_pattern.compile_pattern(r"\\{,5}")  # an escaped backslash, then a brace RE2 takes literally


# --- through the broker --------------------------------------------------------------------------


def test_a_hostile_hardware_id_is_answered_and_claims_keep_flowing(bridge: Bridge) -> None:
    key = bridge.create_key(hardware_id_pattern=SEGMENTS)
    with (
        Device(bridge, hardware_id=HOSTILE_ID, client_id="c-hostile") as hostile,
        Device(bridge, hardware_id="SN-4711-0042") as normal,
    ):
        hostile.conn.publish(f"{bridge.prefix}/claim/{hostile.client_id}", hostile.claim_payload(key))
        # Sent after the hostile claim, to the same single claim worker: answered only if that one ended.
        ok = normal.claim(key)
        _, raw = hostile.conn.next_message()
    assert isinstance(ok, ClaimOk) and ok.created
    refused = ClaimError.model_validate_json(raw)
    assert refused.code is ErrorCode.PERMISSION_DENIED
    rejected = [e for e in bridge.store.events(event="claim.rejected") if e.get("hardware_id") == HOSTILE_ID]
    assert [e["reason"] for e in rejected] == ["hardware_id_mismatch"]


# --- key creation --------------------------------------------------------------------------------


def test_the_cli_accepts_the_segments_pattern_and_refuses_a_backreference(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(settings.data_dir)]
    assert cli.main([*data, "key", "create", "--name", "seg", "--hardware-id-pattern", SEGMENTS, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "seg"
    keys_before = len(Store(settings.database).keys())
    assert cli.main([*data, "key", "create", "--name", "br", "--hardware-id-pattern", r"(a)\1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("provbridge: error: hardware id pattern is not one the linear-time engine") and "\\1" in err
    assert len(Store(settings.database).keys()) == keys_before


# --- patterns stored before RE2, and the doctor ----------------------------------------------------


def _legacy(store: Store, key_id: str, pattern: str) -> None:
    """Make a key look as an older version stored it: a pattern for Python's re, no syntax recorded."""
    with store.transaction() as tx:
        tx.connection.execute(
            "UPDATE provision_keys SET hardware_id_pattern = ?, pattern_syntax = NULL WHERE id = ?", (pattern, key_id)
        )


def _doctor_patterns_line(settings: Settings, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["--data-dir", str(settings.data_dir), "doctor"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("patterns: "))
    return code, line


def test_doctor_names_stored_patterns_re2_refuses_or_reads_otherwise(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    store, now = bridge.store, int(time.time())
    spec = admin.KeySpec
    digits, _ = admin.create_key(store, bridge.settings, spec("default", "digits", hardware_id_pattern="SN-.+"), now)
    backref, _ = admin.create_key(store, bridge.settings, spec("default", "backref"), now)
    modern, _ = admin.create_key(store, bridge.settings, spec("default", "modern", hardware_id_pattern=r"SN-\d+"), now)
    code, line = _doctor_patterns_line(bridge.settings, capsys)
    assert line.startswith("patterns: ok (2 active key(s)"), line  # RE2-era \d is RE2's \d: nothing to flag

    _legacy(store, digits.id, r"SN-\d+")
    _legacy(store, backref.id, r"(SN)-\1")
    code, line = _doctor_patterns_line(bridge.settings, capsys)
    assert code == 1 and line.startswith("patterns: FAIL: "), line
    assert f"key {digits.id} (digits)" in line and "'SN-٣' matched before and no longer does" in line
    assert f"key {backref.id} (backref)" in line and "invalid escape sequence" in line
    assert modern.id not in line


def test_doctor_names_devices_of_a_legacy_pattern_that_re2_would_refuse(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    key = bridge.create_key(name="line", hardware_id_pattern="SN-.+")
    with Device(bridge, hardware_id="SN-٣٤", client_id="c-legacy") as device:
        assert isinstance(device.claim(key), ClaimOk)
    key_id = next(k.id for k in bridge.store.keys(None) if k.name == "line")
    _legacy(bridge.store, key_id, r"SN-\d+")  # what Python's re matched when the device claimed
    _, line = _doctor_patterns_line(bridge.settings, capsys)
    assert "1 of its devices' hardware ids no longer match, e.g. 'SN-٣٤'" in line, line


def test_doctor_passes_when_no_key_has_a_pattern(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    _, line = _doctor_patterns_line(settings, capsys)
    assert (
        line
        == "patterns: ok (0 active key(s) with a hardware-id pattern, all run by RE2 as meant (0 written before RE2))"
    )
