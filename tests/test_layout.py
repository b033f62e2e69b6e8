"""Rules of the code's shape that review would otherwise have to remember."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The storage modules: the only ones that may speak SQL (issue 10 moves them into bridge/storage/).
STORAGE = {"bridge/store.py", "bridge/store_readonly.py", "bridge/migrations.py"}
SQL = re.compile(r"\.execute(many|script)?\(|\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE TABLE|PRAGMA)\b [a-z_*(]")


def test_no_sql_outside_the_storage_modules() -> None:
    offenders = []
    for package in ("bridge", "broker", "provwire", "device_sim"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name in STORAGE:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if SQL.search(line):
                    offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_rule_sees_sql() -> None:
    assert SQL.search('db.execute("SELECT 1")') and SQL.search("SELECT name FROM sqlite_master")
    assert not SQL.search("select a key, then update the row")
