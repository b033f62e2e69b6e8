"""`provbridge rabbitmq-config`: the files of a RabbitMQ cluster, from the settings and data dir.

The content is decided by the pure functions of `bridge.rabbitmq.conf`; this module gathers their inputs (the bridge
secret, the token keys) and writes, for every node alike:

    OUTDIR/rabbitmq.conf       lines to add to each node's rabbitmq.conf (0600: the claimant's password)
    OUTDIR/definitions.json    imported at each boot (0600: password hashes)
    OUTDIR/enabled_plugins
    OUTDIR/token-<kid>.pem     the public key of every token key of the ring (the next one included)

Run it again after `provbridge keys rotate --token` and load the new next key into every node (restart, or
`rabbitmqctl add_uaa_key`): a token key is published a rotation before it signs (docs/SCALING.md).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from bridge.config import Settings
from bridge.errors import NotInitialised
from bridge.rabbitmq import conf
from bridge.storage import keyfiles


@dataclass(frozen=True)
class Written:
    files: list[Path]
    conf_file: Path
    signing_keys: list[str]


def write_rabbitmq_config(settings: Settings, outdir: Path, broker_dir: str | None = None) -> Written:
    """Write the files; `broker_dir` is where the nodes see `outdir` (default: its absolute path)."""
    if not keyfiles.is_initialised(settings.data_dir):
        raise NotInitialised(f"{settings.data_dir} is not initialised: run `provbridge init` first")
    ring = keyfiles.load_keys(settings.data_dir)
    outdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    seen = (broker_dir or str(outdir.resolve())).rstrip("/") or "/"
    files: list[Path] = []
    for kid, key in sorted(ring.token.items()):
        path = outdir / f"token-{kid}.pem"
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        keyfiles.write_public(path, pem)
        os.chmod(path, 0o644)
        files.append(path)
    rabbit = settings.rabbitmq
    config = conf.RabbitConfig(
        vhost=rabbit.vhost,
        exchange=rabbit.exchange,
        queue=rabbit.queue,
        prefix=settings.topic_prefix,
        audience=settings.token.audience,
        bridge_user=settings.broker.username,
        bridge_password_hash=conf.password_hash(keyfiles.read_secret(settings.bridge_secret_file)),
        claimant_password=conf.claimant_password(keyfiles.read_secret(settings.bridge_secret_file)),
        signing_keys={kid: f"{seen}/token-{kid}.pem" for kid in ring.token},
        definitions_path=f"{seen}/definitions.json",
        allow_anonymous=settings.broker.allow_anonymous_provisioning,
    )
    conf_file = outdir / "rabbitmq.conf"
    keyfiles.write_private(conf_file, conf.rabbitmq_conf(config).encode())
    keyfiles.write_private(outdir / "definitions.json", json.dumps(conf.definitions(config), indent=2).encode() + b"\n")
    plugins = outdir / "enabled_plugins"
    keyfiles.write_public(plugins, conf.enabled_plugins().encode())
    files += [conf_file, outdir / "definitions.json", plugins]
    return Written(files, conf_file, sorted(ring.token))
