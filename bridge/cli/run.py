"""`provbridge init|serve|broker|mosquitto-config|rabbitmq-config`: set up a data dir, run the bridge and its broker."""

import argparse
import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bridge import metrics
from bridge.cli.common import add_command, emit
from bridge.cli.tls import tls_text
from bridge.config import Settings
from bridge.errors import NotInitialised, UsageError
from bridge.ops import admin
from bridge.storage import keyfiles, sharedfiles
from bridge.storage.store import Store
from bridge.tls import certificates as tls


def cmd_init(args: argparse.Namespace, settings: Settings) -> None:
    if args.tls_san and not args.tls:
        raise UsageError("--tls-san needs --tls")
    result = admin.init_data_dir(settings)
    tls_result = tls.ensure_tls(settings, args.tls_san) if args.tls else None
    data = {**asdict(result), "data_dir": str(settings.data_dir)}
    if tls_result is not None:
        data["tls"] = {**asdict(tls_result), "changed": tls_result.changed}
    tls_part = "" if tls_result is None else "\n" + tls_text(settings, tls_result)
    if result.joined:
        text = (
            f"initialised {settings.data_dir} from the database: this deployment's keys and bridge secret"
            f" (cloud key {result.cloud_key_id}); its tenants and provisioning keys are already there"
        )
        emit(args, data, text + tls_part)
        return
    if not result.created:
        unchanged = "" if tls_result is not None and tls_result.changed else "; nothing changed"
        text = f"{settings.data_dir} is already initialised (cloud key {result.cloud_key_id}){unchanged}"
        emit(args, data, text + tls_part)
        return
    text = (
        f"initialised {settings.data_dir}\n"
        f"  tenant:        {result.tenant}\n"
        f"  cloud key id:  {result.cloud_key_id}   (public key: provbridge cloud-key)\n"
        f"  first key id:  {result.key_id}\n"
        f"  provisioning key (shown once, keep it like a password):\n    {result.provision_key}"
    )
    emit(args, data, text + tls_part)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    if not keyfiles.is_initialised(settings.data_dir):
        raise NotInitialised(f"{settings.data_dir} is not initialised: run `provbridge init` first")
    metrics.share(settings.data_dir)  # before anything imports prometheus_client: every process it starts counts too
    if sharedfiles.is_shared(settings):  # the deployment's keys as they are now, before any process loads them
        store = Store(settings.database)
        try:
            sharedfiles.sync(settings, store)
        finally:
            store.close()
    from bridge.edges.processes import run_processes
    from bridge.edges.serve import serve

    processes = settings.claims.processes if args.processes is None else args.processes
    if processes < 1:
        raise UsageError("--processes must be at least 1")
    # Every process knows how many share the claims: each enforces its share of the flood limits.
    settings = settings.model_copy(update={"claims": settings.claims.model_copy(update={"processes": processes})})
    api = None
    if settings.api.enabled:
        from bridge.api.server import ApiProcess

        api = ApiProcess(settings)  # its own process, off the claim path; dies with this one
        api.start()
    try:
        if processes > 1:
            run_processes(settings, processes)
        else:
            asyncio.run(serve(settings))
    finally:
        if api is not None:
            api.stop()


def cmd_broker(args: argparse.Namespace, settings: Settings) -> None:
    from bridge.edges.serve import embedded_broker_settings
    from broker.embedded import run_broker_forever

    if not keyfiles.is_initialised(settings.data_dir):
        raise NotInitialised(f"{settings.data_dir} is not initialised: run `provbridge init` first")
    run_broker_forever(embedded_broker_settings(settings))


def cmd_mosquitto_config(args: argparse.Namespace, settings: Settings) -> None:
    from bridge.mosquitto.files import write_mosquitto_config

    done = write_mosquitto_config(
        settings, args.outdir, broker_dir=args.broker_dir, user=args.user, plugin=args.plugin, bind=args.bind
    )
    lines = [f"wrote {path}" for path in done.files]
    lines.append(f"listeners: {', '.join(done.listeners)}; ops users: {', '.join(done.ops_users) or '(none)'}")
    if done.devices_kept:
        lines.append(f"kept {done.devices_kept} device client(s) the bridge had mirrored")
    if done.ops_missing:
        missing = ", ".join(done.ops_missing)
        lines.append(f"not on Mosquitto (created before its hashes were kept, re-create them): {missing}")
    lines += [f"note: {note}" for note in done.notes]
    lines.append(f"start it with: mosquitto -c {done.conf_file}")
    data = {
        "conf_file": str(done.conf_file),
        "files": [str(p) for p in done.files],
        "listeners": done.listeners,
        "plugin": done.plugin,
        "ops_users": done.ops_users,
        "ops_missing": done.ops_missing,
        "devices_kept": done.devices_kept,
        "notes": done.notes,
    }
    emit(args, data, "\n".join(lines))


def cmd_rabbitmq_config(args: argparse.Namespace, settings: Settings) -> None:
    from bridge.rabbitmq.files import write_rabbitmq_config

    done = write_rabbitmq_config(settings, args.outdir, broker_dir=args.broker_dir)
    lines = [f"wrote {path}" for path in done.files]
    lines += [
        f"token keys RabbitMQ will accept: {', '.join(done.signing_keys)}",
        f"add {done.conf_file} to every node's rabbitmq.conf and use {args.outdir}/enabled_plugins; then start the"
        ' nodes, and the bridges with broker.mode = "rabbitmq" (they declare the claim queue)',
    ]
    data = {"conf_file": str(done.conf_file), "files": [str(p) for p in done.files], "signing_keys": done.signing_keys}
    emit(args, data, "\n".join(lines))


def add_commands(commands: Any) -> None:
    init = add_command(commands, "init", cmd_init, "create the data dir: keys, database, default tenant, a first key")
    init.add_argument("--tls", action="store_true", help="also create a private CA and the broker's certificate")
    init.add_argument(
        "--tls-san", action="append", default=[], metavar="NAME", help="another name or IP for the certificate"
    )
    serve = add_command(
        commands,
        "serve",
        cmd_serve,
        "run the bridge (and the embedded broker unless broker.mode is external or rabbitmq)",
        json_flag=False,
    )
    serve.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="bridge processes sharing the claims (external or rabbitmq broker only; default: claims.processes)",
    )
    add_command(commands, "broker", cmd_broker, "run only the embedded broker", json_flag=False)
    mosq = add_command(
        commands,
        "mosquitto-config",
        cmd_mosquitto_config,
        "write mosquitto.conf, dynamic security and ACL files for an external Mosquitto 2.0",
    )
    mosq.add_argument("outdir", type=Path, metavar="OUTDIR", help="where to write them (created 0700)")
    mosq.add_argument("--broker-dir", metavar="DIR", help="where Mosquitto sees OUTDIR (e.g. in a container)")
    mosq.add_argument("--user", help="the user Mosquitto runs as when started as root (default: you)")
    mosq.add_argument("--plugin", metavar="PATH", help="mosquitto_dynamic_security.so (default: found here)")
    mosq.add_argument("--bind", metavar="ADDRESS", help="listen address (default: broker.host)")
    rabbit = add_command(
        commands,
        "rabbitmq-config",
        cmd_rabbitmq_config,
        "write rabbitmq.conf lines, definitions and token keys for a RabbitMQ 3.10 cluster",
    )
    rabbit.add_argument("outdir", type=Path, metavar="OUTDIR", help="where to write them (created 0700)")
    rabbit.add_argument("--broker-dir", metavar="DIR", help="where the RabbitMQ nodes see OUTDIR (default: OUTDIR)")
