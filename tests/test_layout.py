"""Rules of the code's shape that review would otherwise have to remember: the layers, and where SQL lives."""

import importlib
import re
from pathlib import Path

import pytest

from tests.helpers.imports import imports_of

ROOT = Path(__file__).resolve().parents[1]
SQL = re.compile(r"\.execute(many|script)?\(|\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE TABLE|PRAGMA)\b [a-z_*(]")

# bridge's packages from the bottom up: a module imports from its own package and the ones below only.
# (`bridge.config`, `.errors`, `.logs` and `.tokens` are the ground floor every package stands on.)
LAYERS = ["", "storage", "tls", "claims", "mosquitto", "ops", "edges", "cli"]


def _bridge_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "bridge").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _layer(module: str) -> int:
    parts = module.split(".")
    package = parts[1] if len(parts) > 2 else ""  # bridge.config -> ground floor; bridge.claims.x -> claims
    return LAYERS.index(package)


@pytest.mark.parametrize("module", _bridge_modules())
def test_imports_run_down_the_layers(module: str) -> None:
    imported = {name for name in imports_of(importlib.import_module(module)) if name.startswith("bridge.")}
    upward = sorted(name for name in imported if _layer(name) > _layer(module))
    assert not upward, f"{module} (layer {LAYERS[_layer(module)] or 'ground'}) imports from above: {upward}"


def test_no_sql_outside_the_storage_package() -> None:
    offenders = []
    for package in ("bridge", "broker", "provwire", "device_sim"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name.startswith("bridge/storage/"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if SQL.search(line):
                    offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_rule_sees_sql() -> None:
    assert SQL.search('db.execute("SELECT 1")') and SQL.search("SELECT name FROM sqlite_master")
    assert not SQL.search("select a key, then update the row")
