"""Fixtures: an initialised data dir and a running bridge with its embedded broker on loopback.

The database is SQLite in the data dir. A test module marked `both_backends` (`pytestmark =
pytest.mark.both_backends`) runs each of its tests twice, on SQLite and on a fresh database of a real PostgreSQL
server the session starts on loopback (tests/helpers/postgres.py): the storage-dependent tests are one suite for both.

The helpers tests share (the one MQTT client, the bridge, devices, Mosquitto, ...) are in tests/helpers/.
"""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import Profile, Settings, StorageSettings
from bridge.ops import admin
from tests.helpers.bridge import Bridge, make_settings, serving_bridge
from tests.helpers.brokers import EMBEDDED, JWT, bridge_on, use_jwt_plugin
from tests.helpers.postgres import PostgresServer, require_postgres

SQLITE, POSTGRESQL = "sqlite", "postgresql"


def pytest_configure(config: pytest.Config) -> None:
    # The session log below needs every record, so the root logger is opened to DEBUG; pytest's own
    # capture (caplog, failure reports) is kept at WARNING, where the closed root logger used to cut.
    if config.getoption("log_level") is None and not config.getini("log_level"):
        config.option.log_level = "WARNING"
    logging.getLogger().setLevel(logging.DEBUG)
    config.addinivalue_line("markers", "both_backends: run each test on SQLite and on PostgreSQL")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "storage_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_backends"):
        metafunc.parametrize("storage_url", [SQLITE, POSTGRESQL], indirect=True)


@pytest.fixture(scope="session", autouse=True)
def session_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every log record of the pytest process, DEBUG up, in `<basetemp>/session-log/pytest.log`: what
    tests/secret_scan.py scans after the whole suite (records of claim workers arrive here too)."""
    path = tmp_path_factory.mktemp("session-log", numbered=False) / "pytest.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (of each pytest-xdist worker), started when a test first needs it."""
    require_postgres()
    root = tmp_path_factory.mktemp("postgres")
    with PostgresServer(root) as server:
        yield server
        server.dump_rows(root / "rows")  # for the secret scan, as the SQLite files the suite leaves


@pytest.fixture
def storage_url(request: pytest.FixtureRequest) -> str | None:
    """`storage.url` of the test: None (SQLite in the data dir), or a fresh PostgreSQL database's URL for the
    PostgreSQL run of a `both_backends` test."""
    if getattr(request, "param", SQLITE) == SQLITE:
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def initialised(tmp_path: Path, storage_url: str | None, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, str]:
    """Settings on a free port and a fresh data dir (and database), with the raw first key `init` printed. The
    environment carries the database's URL too, for the CLI the test runs."""
    s = make_settings(tmp_path / "data", storage=StorageSettings(url=storage_url))
    if storage_url is not None:
        monkeypatch.setenv("PROVBRIDGE_STORAGE__URL", storage_url)
    result = admin.init_data_dir(s)
    assert result.created and result.provision_key
    return s, result.provision_key


@pytest.fixture
def settings(initialised: tuple[Settings, str]) -> Settings:
    return initialised[0]


@pytest.fixture
def bridge(initialised: tuple[Settings, str]) -> Iterator[Bridge]:
    with serving_bridge(*initialised) as running:
        yield running


@pytest.fixture
def jwt_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mosquitto verifies device tokens with the provbridge_jwt plugin, for the CLI run in this process too
    (skipped when the plugin cannot be built, except under CI)."""
    use_jwt_plugin(monkeypatch)


@pytest.fixture(params=[EMBEDDED, JWT])
def verifying_broker(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bridge]:
    """The brokers that verify tokens themselves, so every unexpired token of a device is valid."""
    with bridge_on(request.param, initialised, monkeypatch) as bridge:
        yield bridge


# A second topic profile beside the default one (devices/{device_id}/#), so that a change of profile shows in what
# a device gets.
SENSOR = Profile(publish=["telemetry/{tenant}/{device_id}"], subscribe=["config/{device_id}/#"])


@pytest.fixture
def profiled(initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Bridge]:
    """The bridge with the "sensor" profile configured, for it and for the CLI run in the test (the environment,
    which the CLI reads over its config file)."""
    settings, first_key = initialised
    profiles = {"default": Profile(), "sensor": SENSOR}
    monkeypatch.setenv("PROVBRIDGE_PROFILES", json.dumps({name: p.model_dump() for name, p in profiles.items()}))
    with serving_bridge(settings.model_copy(update={"profiles": profiles}), first_key) as bridge:
        yield bridge
