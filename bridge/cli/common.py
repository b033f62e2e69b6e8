"""What the `provbridge` command modules share: declaring a subcommand, a count argument, printing results."""

import argparse
import io
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

# What a shell reports for a command killed by SIGPIPE (128 + 13), as `yes | head -1` does.
EXIT_READER_GONE = 141
# What SQLite stores: larger numbers would fail there with a traceback, not a reason.
MAX_COUNT = 2**31 - 1


def add_command(sub: Any, name: str, func: Any, help_: str, json_flag: bool = True) -> argparse.ArgumentParser:
    """A subcommand of `sub` that runs `func`; its help line is also its description."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(func=func)
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `minimum` to MAX_COUNT (out of range: exit 2 with the reason)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if not minimum <= value <= MAX_COUNT:
            raise argparse.ArgumentTypeError(f"{value} is not between {minimum} and {MAX_COUNT}")
        return value

    return parse


def when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def reader_gone() -> int:
    """Stop quietly when the reader of stdout went away (`provbridge device list | head -1`).

    Python would try to flush the dead pipe once more at exit and print a warning: point stdout at
    /dev/null first. Returns the exit code, EXIT_READER_GONE.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # stdout is not a file (a test's StringIO)
        pass
    return EXIT_READER_GONE
