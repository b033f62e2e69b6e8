"""The CLI as a new user meets it: contradictory options are refused, pipes that close end quietly (issue 9, item 4)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.cli import main as cli
from bridge.cli.common import EXIT_READER_GONE
from bridge.config import Settings
from bridge.storage.store import Store
from device_sim import cli as sim_cli
from tests.helpers.bridge import Bridge


def _keys(settings: Settings) -> int:
    store = Store(settings.database)
    try:
        return len(store.keys(None))
    finally:
        store.close()


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--code", "--max-registrations", "5"], "a human code is always one-time"),
        (["--code", "--expires-in", "400d"], "a human code lives at most 86400 s"),
        (["--code", "--expires-at", "2999-01-01T00:00:00Z"], "a human code lives at most 86400 s"),
        (["--max-registrations", "0"], "at least 1"),
        (["--expires-in", "0d"], "bad duration"),
        (["--expires-in", "1d", "--expires-at", "2999-01-01T00:00:00Z"], "not both"),
        (["--expires-at", "2001-01-01T00:00:00Z"], "in the future"),
    ],
)
def test_contradictory_or_out_of_range_key_options_exit_2_and_create_nothing(
    settings: Settings, capsys: pytest.CaptureFixture[str], options: list[str], reason: str
) -> None:
    before = _keys(settings)
    assert cli.main(["--data-dir", str(settings.data_dir), "key", "create", "--name", "x", *options]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("provbridge: error: ") and reason in err and err.count("\n") == 1, err
    assert _keys(settings) == before


def test_a_code_may_be_shorter_lived_than_the_default_and_is_one_time(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(settings.data_dir)]
    now = int(time.time())
    assert cli.main([*data, "key", "create", "--name", "c", "--code", "--expires-in", "2h", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    key = next(k for k in Store(settings.database).keys(None) if k.id == created["id"])
    assert key.max_registrations == 1 and now + 7200 <= (key.expires_at or 0) <= int(time.time()) + 7200
    assert cli.main([*data, "key", "create", "--name", "c1", "--code", "--one-time"]) == 0  # consistent: fine


def test_errors_about_the_state_not_the_arguments_still_exit_1(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(settings.data_dir)]
    assert cli.main([*data, "tenant", "create", "default"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["--data-dir", str(settings.data_dir.parent / "nothing"), "serve"]) == 1
    assert "provbridge init" in capsys.readouterr().err


def _run_into_a_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run a command whose stdout is a pipe nobody reads any more, as `... | head -1` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte is written: every write fails
    try:
        return subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, timeout=120, check=False)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("command", [["device", "list"], ["key", "list", "--json"], ["events"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(settings: Settings, command: list[str]) -> None:
    argv = [sys.executable, "-m", "bridge.cli.main", "--data-dir", str(settings.data_dir), *command]
    done = _run_into_a_closed_pipe(argv)
    assert done.stderr == b"", done.stderr.decode()
    assert done.returncode == EXIT_READER_GONE


def test_the_simulator_also_ends_quietly_when_its_reader_goes_away(bridge: Bridge, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "device_sim.cli", "--port", str(bridge.port), "--key", bridge.provision_key]
    argv += ["--cloud-key", str(bridge.settings.data_dir / "cloud_public.pem"), "--state-dir", str(tmp_path / "sim")]
    done = _run_into_a_closed_pipe([*argv, "--devices", "2", "--timeout", "10"])
    assert done.stderr == b"", done.stderr.decode()
    assert done.returncode == sim_cli.EXIT_READER_GONE
    assert bridge.store.count("devices") == 2  # the work was done; only its report had no reader
