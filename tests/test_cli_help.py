"""`provbridge --help` and every subcommand's `--help` print what they printed when the fixture was captured.

The fixture is the CLI's contract with its users (and with scripts that read it): a redesign of the code
behind it must not change it by accident. After a deliberate change, regenerate it:

    COLUMNS=100 .venv/bin/python -m tests.test_cli_help > tests/fixtures/cli_help.txt
"""

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.cli import main as cli

FIXTURE = Path(__file__).parent / "fixtures" / "cli_help.txt"
COLUMNS = "100"  # argparse wraps to the terminal's width: pinned, so the text does not depend on it
SEPARATOR = "=" * 20


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of the parser tree, the bare program first."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def render() -> str:
    """Each command's help, headed by its command line, in the parser's own order."""
    os.environ["COLUMNS"] = COLUMNS
    parser = cli.build_parser()
    blocks = []
    for path in _commands(parser):
        sub = parser
        for name in path:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        blocks.append(f"{SEPARATOR} {' '.join(('provbridge', *path, '--help'))}\n{sub.format_help()}")
    return "".join(blocks)


def test_every_help_text_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", COLUMNS)
    assert render() == FIXTURE.read_text(), f"regenerate after a deliberate change: see {__doc__}"


def test_the_fixture_covers_every_command() -> None:
    heads = [line for line in FIXTURE.read_text().splitlines() if line.startswith(SEPARATOR)]
    assert len(heads) == len(list(_commands(cli.build_parser()))) > 30
    assert f"{SEPARATOR} provbridge key create --help" in heads


def test_help_through_main_is_the_same_text(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", COLUMNS)
    with pytest.raises(SystemExit) as done:
        cli.main(["key", "create", "--help"])
    assert done.value.code == 0
    block = FIXTURE.read_text().split(f"{SEPARATOR} provbridge key create --help\n", 1)[1].split(SEPARATOR, 1)[0]
    assert capsys.readouterr().out == block


if __name__ == "__main__":
    sys.stdout.write(render())
