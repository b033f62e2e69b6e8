"""docker-compose.yml stays consistent with the code and with the tested configuration (no image can be pulled on this
project's machines, so compose itself is never run here): every PROVBRIDGE_* variable is a setting that loads, and the
"cluster" profile wires PostgreSQL, three RabbitMQ nodes and two bridges as tests/test_rabbitmq_bridge.py does."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Settings, load_settings

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
CLUSTER_BRIDGES = ("cluster-bridge-a", "cluster-bridge-b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def settings_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    monkeypatch.chdir(tmp_path)  # no config/provbridge.toml: the environment alone
    for name, value in service.get("environment", {}).items():
        if name.startswith("PROVBRIDGE_"):
            monkeypatch.setenv(name, str(value))
    return load_settings(None)


@pytest.mark.parametrize(
    "name", ["setup", "bridge", "simulator", "cluster-setup", "cluster-bridge-a", "cluster-bridge-b"]
)
def test_every_provbridge_service_s_environment_is_settings_that_load(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = settings_of(compose["services"][name], monkeypatch, tmp_path)
    assert str(settings.data_dir) == "/data"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount point -> volume name."""
    return {spec.split(":")[1]: spec.split(":")[0] for spec in service.get("volumes", [])}


def test_the_cluster_profile_is_the_tested_layout(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    services = compose["services"]
    cluster = {name for name, service in services.items() if "cluster" in service.get("profiles", [])}
    assert cluster == {"postgres", "cluster-setup", "rabbit1", "rabbit2", "rabbit3", *CLUSTER_BRIDGES}
    nodes = sorted(name for name in cluster if name.startswith("rabbit"))
    bridges = {}
    for name in CLUSTER_BRIDGES:
        with monkeypatch.context() as patch:
            bridges[name] = settings_of(services[name], patch, tmp_path)
    for name, settings in bridges.items():
        assert settings.broker.mode == "rabbitmq"
        assert sorted(node.split(":")[0] for node in settings.rabbitmq.amqp) == nodes  # every node, by service name
        assert sorted(re.findall(r"//(\w+):", " ".join(settings.rabbitmq.management))) == nodes
        assert settings.storage.url is not None and "@postgres/" in settings.storage.url
        mounts = _mounts(services[name])
        assert settings.storage_key_file.parent.as_posix() in mounts  # the storage key from a volume...
        assert (
            mounts["/data"]
            != _mounts(services["cluster-bridge-b" if name.endswith("a") else "cluster-bridge-a"])["/data"]
        )  # ...and a data dir of its own: two hosts
    a, b = bridges.values()
    assert a.storage_key_file == b.storage_key_file
    assert a.rabbitmq.amqp[0] != b.rabbitmq.amqp[0]  # each bridge's first node differs
    assert a.api.enabled and not b.api.enabled  # one admin API (and JWKS) port

    setup = services["cluster-setup"]
    command = " ".join(setup["command"])
    broker_dir = re.search(r"rabbitmq-config ([^\s\"]+) --broker-dir ([^\s\"]+)", command)
    assert broker_dir is not None
    written_to, seen_at = broker_dir.groups()
    setup_mounts = _mounts(setup)
    for node in nodes:
        node_mounts = _mounts(services[node])
        assert node_mounts[seen_at] == setup_mounts[written_to]  # the nodes read what setup wrote, where it says
        assert services[node]["environment"]["RABBITMQ_ENABLED_PLUGINS_FILE"] == f"{seen_at}/enabled_plugins"
        assert f"rabbit@{services[node]['hostname']}" in command  # a peer of the classic_config cluster
    assert _mounts(services["cluster-bridge-a"])["/data"] == setup_mounts["/data"]  # setup's init is host a's
    assert _mounts(services["cluster-bridge-b"])["/data"] not in setup_mounts.values()  # b joins with its own init
    assert "provbridge init" in " ".join(services["cluster-bridge-b"]["command"])
