"""`provbridge` as an operator runs it: the settings as a config file, and the CLI in this process."""

import json
from typing import Any

import pytest

from bridge.cli import main as cli
from bridge.config import Settings


def config_toml(settings: Settings) -> str:
    """The settings `mosquitto-config` must see, as an operator's config file."""
    b = settings.broker
    return "\n".join(
        [
            f'topic_prefix = "{settings.topic_prefix}"',
            f'log_level = "{settings.log_level}"',
            "[broker]",
            f'mode = "{b.mode}"',
            f'host = "{b.host}"',
            f"port = {b.port}",
            f"tls_port = {b.tls_port}",
            f'tls_listen = "{b.tls_listen}"',
            f"certificate_port = {b.certificate_port}",
            f'certificate_listen = "{b.certificate_listen}"',
            f'username = "{b.username}"',
            f"allow_anonymous_provisioning = {'true' if b.allow_anonymous_provisioning else 'false'}",
            f'protocol = "{b.protocol}"',
            f"dynsec = {'true' if b.dynsec else 'false'}",
            f'mosquitto_auth = "{b.mosquitto_auth}"',
            f"dynsec_janitor_seconds = {b.dynsec_janitor_seconds}",
            "[claims]",
            f"rate_limits = {'true' if settings.claims.rate_limits else 'false'}",
            "[api]",
            f"enabled = {'true' if settings.api.enabled else 'false'}",
            f'host = "{settings.api.host}"',
            f"port = {settings.api.port}",
            *(["[storage]", f'url = "{settings.storage.url}"'] if settings.storage.url else []),
            *(_rabbitmq_toml(settings) if b.mode == "rabbitmq" else []),
            "",
        ]
    )


def _rabbitmq_toml(settings: Settings) -> list[str]:
    r = settings.rabbitmq
    return [
        "[rabbitmq]",
        f"amqp = {json.dumps(r.amqp)}",
        f"management = {json.dumps(r.management)}",
        f'vhost = "{r.vhost}"',
        f'queue = "{r.queue}"',
        f"revoke_sweep_seconds = {r.revoke_sweep_seconds}",
    ]


def run_cli(settings: Settings, *argv: str) -> int:
    """`provbridge --config <settings as TOML> --data-dir <data dir> ARGV...`, in this process."""
    config = settings.data_dir.parent / "provbridge-test.toml"
    config.write_text(config_toml(settings))
    return cli.main(["--config", str(config), "--data-dir", str(settings.data_dir), *argv])


def cli_run(capsys: pytest.CaptureFixture[str], settings: Settings, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `provbridge ARGV` (argparse's own refusals included: exit 2)."""
    capsys.readouterr()
    try:
        code = run_cli(settings, *argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], settings: Settings, *argv: str) -> Any:
    """The `--json` output of `provbridge ARGV`, which must succeed."""
    code, out, err = cli_run(capsys, settings, *argv, "--json")
    assert code == 0, err
    return json.loads(out)
