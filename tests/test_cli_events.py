"""`provbridge events` a page at a time: each event carries its sequence number, and `--before` the oldest
one's gives the page before it, so an operator can read a long history back without a limit on one page."""

import pytest

from bridge.config import Settings
from tests.helpers.cli import cli_json, cli_run


def test_events_page_back_with_before(capsys: pytest.CaptureFixture[str], settings: Settings) -> None:
    for n in range(5):
        assert cli_run(capsys, settings, "key", "create", "--name", f"line-{n}")[0] == 0
    everything = cli_json(capsys, settings, "events", "--event", "key.created", "--limit", "1000")
    names = [e["key_name"] for e in everything if e.get("key_name", "").startswith("line-")]
    assert names == [f"line-{n}" for n in range(5)]

    newest = cli_json(capsys, settings, "events", "--event", "key.created", "--limit", "2")
    assert [e["key_name"] for e in newest] == ["line-3", "line-4"]
    older = cli_json(
        capsys, settings, "events", "--event", "key.created", "--limit", "2", "--before", str(newest[0]["seq"])
    )
    assert [e["key_name"] for e in older] == ["line-1", "line-2"]
    assert all(e["seq"] < newest[0]["seq"] for e in older)

    code, out, _ = cli_run(capsys, settings, "events", "--event", "key.created", "--limit", "2")
    assert code == 0 and f"older events: --before {newest[0]['seq']}" in out


def test_a_bad_before_is_refused(capsys: pytest.CaptureFixture[str], settings: Settings) -> None:
    code, _, err = cli_run(capsys, settings, "events", "--before", "zero")
    assert code == 2 and "not a whole number" in err
