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
LAYERS = ["", "metrics", "storage", "tls", "claims", "mosquitto", "rabbitmq", "ops", "edges", "api", "cli"]


def _modules(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _bridge_modules() -> list[str]:
    return _modules("bridge")


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


@pytest.mark.parametrize("module", [m for m in _bridge_modules() if not m.startswith("bridge.storage")])
def test_only_the_storage_package_touches_sqlite(module: str) -> None:
    """The storage seam: outside bridge/storage/ code sees `Store`, `Transaction` and StorageError, never sqlite3."""
    assert "sqlite3" not in imports_of(importlib.import_module(module))


def test_every_exception_is_under_the_root_and_in_an_errors_module() -> None:
    from provwire.errors import ProvbridgeError

    misplaced = []
    for package in ("provwire", "bridge", "broker", "device_sim"):
        for name in _modules(package):
            module = importlib.import_module(name)
            for value in vars(module).values():
                if not (isinstance(value, type) and issubclass(value, BaseException)) or value.__module__ != name:
                    continue
                if not issubclass(value, ProvbridgeError):
                    misplaced.append(f"{name}.{value.__name__} is not a ProvbridgeError")
                if not name.endswith(".errors"):
                    misplaced.append(f"{name}.{value.__name__} is outside its package's errors module")
    assert not misplaced, "\n".join(misplaced)


def test_one_class_per_exception_name() -> None:
    """No two packages define an exception of the same name (`UsageError` is one class, re-exported)."""
    from provwire.errors import ProvbridgeError

    seen: dict[str, set[type]] = {}
    for package in ("provwire", "bridge", "broker", "device_sim"):
        for name in _modules(package):
            for value in vars(importlib.import_module(name)).values():
                if isinstance(value, type) and issubclass(value, ProvbridgeError):
                    seen.setdefault(value.__name__, set()).add(value)
    assert {name: classes for name, classes in seen.items() if len(classes) > 1} == {}
