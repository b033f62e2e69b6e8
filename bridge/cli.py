"""`provbridge`: run the service and administer tenants, provisioning keys and devices.

Every command exits non-zero with a one-line reason on error; `--json` gives scripts stable output.
"""

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from bridge import admin, doctor, keyfiles, logs, revocation, rotation, tls
from bridge.config import Settings, load_settings
from bridge.errors import ProvbridgeError, UsageError
from bridge.store import Device, ProvisionKey
from provwire import crypto

EPILOG = """\
quick start:
  provbridge init                       create ./data (keys, database, a first key printed once)
  provbridge serve                      embedded broker + bridge on 127.0.0.1:1883
  provbridge key create --tenant default --name line-1 --max-registrations 500
  provbridge-sim --key pk_... --devices 10

settings come from config/provbridge.toml (or --config), overridden by PROVBRIDGE_* variables,
e.g. PROVBRIDGE_DATA_DIR=/var/lib/provbridge PROVBRIDGE_BROKER__PORT=1884.
"""


# What SQLite stores and `_when` prints: larger numbers would fail there with a traceback, not a reason.
MAX_TIMESTAMP = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
MAX_COUNT = 2**31 - 1


def _count(minimum: int) -> Callable[[str], int]:
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


_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _unreadable_argument(argv: Sequence[str]) -> str | None:
    """The first argument that is not text the data dir, the database and stdout can take, if any.

    Bytes that are not UTF-8 reach Python as lone surrogates (PEP 383), and a NUL cannot be in a path:
    either would surface deep inside SQLite, a path or print() as a traceback. Control characters and
    line breaks would break the one-line error (argparse echoes arguments) and, in a key's name or a
    label, every table and event that shows it later.
    """
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return f"argument {arg!r} is not valid UTF-8"
        if _LINE_BREAKING.search(arg):
            return f"argument {arg!r} contains a control character or line break"
    return None


def _when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _key_view(key: ProvisionKey) -> dict[str, Any]:
    view = asdict(key)
    view.pop("key_hash")
    view.pop("tenant_id")
    view["tenant"] = view.pop("tenant_name")
    return view


def _key_row(key: ProvisionKey) -> dict[str, Any]:
    limit = "∞" if key.max_registrations is None else key.max_registrations
    return {
        "id": key.id,
        "tenant": key.tenant_name,
        "name": key.name,
        "kind": key.kind,
        "profile": key.profile,
        "used": f"{key.registrations}/{limit}",
        "expires": _when(key.expires_at),
        "reclaim": key.reclaim_policy,
        "status": key.status,
    }


def _device_view(device: Device) -> dict[str, Any]:
    view = asdict(device)
    view["public_key"] = crypto.b64encode(device.public_key)
    view.pop("tenant_id")
    view["tenant"] = view.pop("tenant_name")
    return view


# --- commands ------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, settings: Settings) -> None:
    if args.tls_san and not args.tls:
        raise UsageError("--tls-san needs --tls")
    result = admin.init_data_dir(settings)
    tls_result = tls.ensure_tls(settings, args.tls_san) if args.tls else None
    data = {**asdict(result), "data_dir": str(settings.data_dir)}
    if tls_result is not None:
        data["tls"] = {**asdict(tls_result), "changed": tls_result.changed}
    tls_text = "" if tls_result is None else "\n" + _tls_text(settings, tls_result)
    if not result.created:
        unchanged = "" if tls_result is not None and tls_result.changed else "; nothing changed"
        text = f"{settings.data_dir} is already initialised (cloud key {result.cloud_key_id}){unchanged}"
        _emit(args, data, text + tls_text)
        return
    text = (
        f"initialised {settings.data_dir}\n"
        f"  tenant:        {result.tenant}\n"
        f"  cloud key id:  {result.cloud_key_id}   (public key: provbridge cloud-key)\n"
        f"  first key id:  {result.key_id}\n"
        f"  provisioning key (shown once, keep it like a password):\n    {result.provision_key}"
    )
    _emit(args, data, text + tls_text)


def _tls_text(settings: Settings, result: tls.TlsInitResult) -> str:
    lines = [
        f"TLS ({result.ca_file.parent}):",
        f"  CA:      {'created' if result.ca_created else 'kept'}, {result.ca_file} (SHA-256 {result.ca_fingerprint})",
        f"  server:  {'issued' if result.server_created else 'kept'} for {', '.join(result.server_names)};"
        f" expires {result.server_expires:%Y-%m-%d}",
    ]
    if result.missing_names:
        lines.append(f"  not covered: {', '.join(result.missing_names)} (re-issue with `provbridge tls init --force`)")
    if result.changed:
        lines.append(
            f"  devices pin {result.ca_file}; (re)start `provbridge serve` to listen on TLS port"
            f" {settings.broker.tls_port}"
        )
    return "\n".join(lines)


def cmd_tls_init(args: argparse.Namespace, settings: Settings) -> None:
    result = tls.ensure_tls(settings, args.tls_san, force=args.force or args.new_ca, replace_ca=args.new_ca)
    kept = "" if result.changed else "TLS files kept; nothing changed\n"
    text = kept + _tls_text(settings, result)
    _emit(args, {**asdict(result), "changed": result.changed}, text)


def cmd_tls_show(args: argparse.Namespace, settings: Settings) -> None:
    status = tls.tls_status(settings.data_dir)
    offered = tls.tls_offered(settings)
    data = {**asdict(status), "listening": offered, "tls_port": settings.broker.tls_port}
    text = (
        f"TLS files in {status.directory}\n"
        f"  CA:      {status.ca_subject}, expires {status.ca_expires:%Y-%m-%d}, SHA-256 {status.ca_fingerprint}"
        f"{'' if status.ca_key_present else ' (ca.key not here)'}\n"
        f"  server:  {', '.join(status.server_names)}; expires {status.server_expires:%Y-%m-%d}"
        f"{'' if status.server_issued_by_ca else ' (NOT issued by this CA)'}\n"
        f"  broker:  {'TLS on port ' + str(settings.broker.tls_port) if offered else 'TLS off (broker.tls_listen)'}"
    )
    _emit(args, data, text)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    from bridge.processes import run_processes
    from bridge.serve import serve

    if not keyfiles.is_initialised(settings.data_dir):
        raise UsageError(f"{settings.data_dir} is not initialised: run `provbridge init` first")
    processes = settings.claims.processes if args.processes is None else args.processes
    if processes < 1:
        raise UsageError("--processes must be at least 1")
    if processes > 1:
        run_processes(settings, processes)
    else:
        asyncio.run(serve(settings))


def cmd_mosquitto_config(args: argparse.Namespace, settings: Settings) -> None:
    from bridge.mosquitto_files import write_mosquitto_config

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
    _emit(args, data, "\n".join(lines))


def cmd_broker(args: argparse.Namespace, settings: Settings) -> None:
    from bridge.serve import embedded_broker_settings
    from broker.embedded import run_broker_forever

    if not keyfiles.is_initialised(settings.data_dir):
        raise UsageError(f"{settings.data_dir} is not initialised: run `provbridge init` first")
    run_broker_forever(embedded_broker_settings(settings))


def cmd_tenant_create(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    tenant_id = admin.create_tenant(store, args.name, int(time.time()))
    _emit(args, {"id": tenant_id, "name": args.name}, f"created tenant {args.name} ({tenant_id})")


def cmd_tenant_list(args: argparse.Namespace, settings: Settings) -> None:
    rows = admin.open_store(settings).tenants()
    for row in rows:
        row["created"] = _when(row.pop("created_at"))
    _emit(args, rows, _table(rows, ["id", "name", "devices", "keys", "created"]))


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"label {pair!r} must look like name=value")
        labels[name] = value
    return labels


def _expiry(args: argparse.Namespace, now: int) -> int | None:
    if args.expires_in and args.expires_at:
        raise UsageError("give --expires-in or --expires-at, not both")
    if args.expires_in:
        expires_at = now + admin.parse_duration(args.expires_in)
    elif args.expires_at:
        try:
            moment = datetime.fromisoformat(args.expires_at)
        except ValueError as exc:
            raise UsageError(f"--expires-at {args.expires_at!r} is not an ISO 8601 time") from exc
        expires_at = int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
    else:
        return None
    if expires_at > MAX_TIMESTAMP:
        raise UsageError("expiry is after 9999-12-31: give an earlier one, or none for a key that never expires")
    return expires_at


def cmd_key_create(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    now = int(time.time())
    spec = admin.KeySpec(
        tenant=args.tenant,
        name=args.name,
        profile=args.profile,
        hardware_id_pattern=args.hardware_id_pattern,
        expires_at=_expiry(args, now),
        max_registrations=1 if args.one_time else args.max_registrations,
        labels=_labels(args.label),
        groups=args.group,
        reclaim_policy=args.reclaim,
        human_code=args.code,
    )
    key, raw = admin.create_key(store, settings, spec, now)
    text = (
        f"created {key.kind} {key.id} ({key.name}) for tenant {key.tenant_name}\n"
        f"shown once, keep it like a password:\n  {raw}"
    )
    _emit(args, {**_key_view(key), "provision_key": raw}, text)


def cmd_key_list(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    keys = store.keys(store.tenant_id(args.tenant) if args.tenant else None)
    columns = ["id", "tenant", "name", "kind", "profile", "used", "expires", "reclaim", "status"]
    _emit(args, [_key_view(k) for k in keys], _table([_key_row(k) for k in keys], columns))


def cmd_key_revoke(args: argparse.Namespace, settings: Settings) -> None:
    key = admin.open_store(settings).revoke_key(args.key_id, int(time.time()))
    _emit(args, _key_view(key), f"revoked {key.id} ({key.name}): new claims with it are refused")


def cmd_device_list(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    devices = store.devices(store.tenant_id(args.tenant) if args.tenant else None, limit=args.limit)
    rows = [
        {
            "id": d.id,
            "tenant": d.tenant_name,
            "hardware_id": d.hardware_id,
            "name": d.name or "",
            "profile": d.profile,
            "status": d.status,
            "created": _when(d.created_at),
        }
        for d in devices
    ]
    _emit(
        args,
        [_device_view(d) for d in devices],
        _table(rows, ["id", "tenant", "hardware_id", "name", "profile", "status", "created"]),
    )


def cmd_device_show(args: argparse.Namespace, settings: Settings) -> None:
    view = _device_view(admin.open_store(settings).device(args.device_id))
    text = "\n".join(f"{k:>14}: {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in view.items())
    _emit(args, view, text)


def cmd_device_revoke(args: argparse.Namespace, settings: Settings) -> None:
    device = revocation.revoke_device(settings, admin.open_store(settings), args.device_id)
    broker = (
        "Mosquitto has disabled its account (live session ended)"
        if settings.broker.mode == "external"
        else "the embedded broker refuses its current token (connect, publish, subscribe, live session)"
    )
    text = f"revoked {device.id}: re-claims and token refreshes are refused, and {broker}"
    _emit(args, _device_view(device), text)


def cmd_events(args: argparse.Namespace, settings: Settings) -> None:
    events = admin.open_store(settings).events(args.tenant, args.event, args.limit)
    rows = [
        {
            "time": e["time"],
            "tenant": e["tenant"],
            "event": e["event"],
            "device": e.get("device_id", ""),
            "hardware_id": e.get("hardware_id", ""),
            "reason": e.get("reason", ""),
        }
        for e in events
    ]
    _emit(args, events, _table(rows, ["time", "tenant", "event", "device", "hardware_id", "reason"]))


def cmd_ops_user_create(args: argparse.Namespace, settings: Settings) -> None:
    keyfiles.load_keys(settings.data_dir)
    from bridge.mosquitto_files import ops_user_created  # its dynamic-security hash, for Mosquitto

    # Both files are read, changed and rewritten: concurrent runs take turns. The lock also covers the
    # running Mosquitto's copy, so that it sees creates and deletes in the files' order.
    with keyfiles.ops_users_locked(settings.data_dir):
        password = admin.create_ops_user(settings, args.name)
        mosquitto = ops_user_created(settings, args.name, password)
    text = (
        f"created ops user {args.name}: it may read {settings.topic_prefix}/events/# and status topics\n"
        + (f"Mosquitto: {mosquitto}\n" if mosquitto else "")
        + f"password (shown once):\n  {password}"
    )
    _emit(args, {"username": args.name, "password": password}, text)


def cmd_ops_user_list(args: argparse.Namespace, settings: Settings) -> None:
    names = sorted(keyfiles.read_ops_users(settings.data_dir))
    _emit(args, names, "\n".join(names) or "(none)")


def cmd_ops_user_delete(args: argparse.Namespace, settings: Settings) -> None:
    keyfiles.load_keys(settings.data_dir)  # an uninitialised data dir is refused, not created by the lock
    from bridge.mosquitto_files import ops_user_deleted

    with keyfiles.ops_users_locked(settings.data_dir):  # as in create
        admin.delete_ops_user(settings, args.name)
        mosquitto = ops_user_deleted(settings, args.name)
    text = f"deleted ops user {args.name}" + (f"\nMosquitto: {mosquitto}" if mosquitto else "")
    _emit(args, {"deleted": args.name}, text)


def cmd_cloud_key(args: argparse.Namespace, settings: Settings) -> None:
    ring = keyfiles.load_keys(settings.data_dir)
    public = ring.cloud_key.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    sec1 = crypto.b64encode(crypto.sec1(public))
    data = {"kid": ring.active_cloud, "sec1_base64": sec1, "pem": pem}
    _emit(args, data, f"kid: {ring.active_cloud}\nsec1 (base64): {sec1}\n{pem.rstrip()}")


def cmd_jwks(args: argparse.Namespace, settings: Settings) -> None:
    print(json.dumps(keyfiles.jwks(keyfiles.load_keys(settings.data_dir)), indent=2))


def cmd_keys_rotate(args: argparse.Namespace, settings: Settings) -> None:
    done = rotation.rotate(settings.data_dir, "token" if args.token else "cloud", int(time.time()))
    if done.kind == "token":
        text = (
            f"token key {done.new_kid} is active (was {done.old_kid}); jwks.json lists both, so tokens signed"
            f" before keep working until they expire"
        )
    else:
        text = (
            f"cloud key {done.new_kid} is active (was {done.old_kid}); devices provisioned with older cloud keys"
            f" keep working. Give new firmware {settings.data_dir / 'cloud_public.pem'} (`provbridge cloud-key`)"
        )
    if done.pruned:
        text += f"\npruned retired token keys whose tokens have all expired: {', '.join(done.pruned)}"
    _emit(args, asdict(done), text)


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> None:
    infos = rotation.key_status(settings.data_dir)
    rows = [
        {
            "kind": k.kind,
            "kid": k.kid,
            "status": k.status,
            "retired": _when(k.retired_at),
            "prunable": _when(k.prunable_at),
        }
        for k in infos
    ]
    _emit(args, [asdict(k) for k in infos], _table(rows, ["kind", "kid", "status", "retired", "prunable"]))


def cmd_keys_prune(args: argparse.Namespace, settings: Settings) -> None:
    pruned = rotation.prune(settings.data_dir, int(time.time()))
    _emit(args, {"pruned": list(pruned)}, f"pruned {', '.join(pruned)}" if pruned else "nothing to prune")


def cmd_doctor(args: argparse.Namespace) -> None:
    # It loads the settings itself: a configuration that does not load is one of its findings.
    report = doctor.run_checks(args.config, args.data_dir)
    _emit(args, report.as_dict(), "\n".join(check.line() for check in report.checks))
    if not report.ok:
        raise doctor.DoctorFailed(f"{len(report.failed)} of {len(report.checks)} checks failed")


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provbridge",
        description="Self-hosted MQTT device provisioning: claims in, devices and scoped tokens out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML config file (default: config/provbridge.toml if present)")
    parser.add_argument("--data-dir", type=Path, help="data directory (default: data, or PROVBRIDGE_DATA_DIR)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(sub: Any, name: str, func: Any, help_: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    init = command(commands, "init", cmd_init, "create the data dir: keys, database, default tenant, a first key")
    init.add_argument("--tls", action="store_true", help="also create a private CA and the broker's certificate")
    init.add_argument(
        "--tls-san", action="append", default=[], metavar="NAME", help="another name or IP for the certificate"
    )
    serve = command(
        commands,
        "serve",
        cmd_serve,
        "run the bridge (and the embedded broker unless broker.mode=external)",
        json_flag=False,
    )
    serve.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="bridge processes sharing the claims (external broker only; default: claims.processes)",
    )
    command(commands, "broker", cmd_broker, "run only the embedded broker", json_flag=False)
    mosq = command(
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

    tenant = commands.add_parser("tenant", help="create and list tenants").add_subparsers(
        dest="tenant_command", required=True, metavar="ACTION"
    )
    command(tenant, "create", cmd_tenant_create, "create a tenant").add_argument("name")
    command(tenant, "list", cmd_tenant_list, "list tenants")

    key = commands.add_parser("key", help="provisioning keys").add_subparsers(
        dest="key_command", required=True, metavar="ACTION"
    )
    create = command(key, "create", cmd_key_create, "create a provisioning key; its raw value is printed once")
    create.add_argument("--tenant", default="default", help="tenant name (default: default)")
    create.add_argument("--name", required=True, help="a name for people, e.g. the production line")
    create.add_argument("--profile", default="default", help="topic profile from the config (default: default)")
    create.add_argument("--hardware-id-pattern", metavar="REGEX", help="hardware ids must fully match this")
    create.add_argument("--expires-in", metavar="DURATION", help="e.g. 12h, 30d")
    create.add_argument("--expires-at", metavar="ISO8601", help="e.g. 2027-01-31T00:00:00Z")
    limit = create.add_mutually_exclusive_group()
    limit.add_argument(
        "--max-registrations", type=_count(0), metavar="N", help="devices it may create (default: no limit)"
    )
    limit.add_argument("--one-time", action="store_true", help="same as --max-registrations 1")
    create.add_argument("--label", action="append", default=[], metavar="NAME=VALUE", help="label for its devices")
    create.add_argument("--group", action="append", default=[], metavar="GROUP", help="group for its devices")
    create.add_argument(
        "--reclaim",
        choices=["reject", "rotate"],
        default="reject",
        help="a known hardware id with a new public key: reject (default) or rotate (factory reset)",
    )
    create.add_argument(
        "--code",
        action="store_true",
        help="a one-time human code PROV-XXXX-XXXX instead of a pk_ key (default TTL 24h)",
    )
    command(key, "list", cmd_key_list, "list provisioning keys").add_argument("--tenant")
    command(key, "revoke", cmd_key_revoke, "revoke a key: new claims with it are refused").add_argument("key_id")

    device = commands.add_parser("device", help="provisioned devices").add_subparsers(
        dest="device_command", required=True, metavar="ACTION"
    )
    dlist = command(device, "list", cmd_device_list, "list devices, newest first")
    dlist.add_argument("--tenant")
    dlist.add_argument("--limit", type=_count(1), default=100)
    command(device, "show", cmd_device_show, "show one device").add_argument("device_id")
    command(device, "revoke", cmd_device_revoke, "revoke a device").add_argument("device_id")

    events = command(commands, "events", cmd_events, "recent provisioning events, oldest first")
    events.add_argument("--tenant")
    events.add_argument("--event", help="e.g. device.provisioned, claim.rejected")
    events.add_argument("--limit", type=_count(1), default=50)

    ops = commands.add_parser("ops-user", help="read-only broker accounts for watching events").add_subparsers(
        dest="ops_command", required=True, metavar="ACTION"
    )
    command(ops, "create", cmd_ops_user_create, "create an ops user; its password is printed once").add_argument("name")
    command(ops, "list", cmd_ops_user_list, "list ops users")
    command(ops, "delete", cmd_ops_user_delete, "delete an ops user").add_argument("name")

    tls_cmd = commands.add_parser("tls", help="the broker's TLS certificate and private CA").add_subparsers(
        dest="tls_command", required=True, metavar="ACTION"
    )
    tls_init = command(
        tls_cmd, "init", cmd_tls_init, "create the private CA and server certificate in <data_dir>/tls if missing"
    )
    tls_init.add_argument(
        "--tls-san", "--san", action="append", default=[], metavar="NAME", help="another name or IP to cover"
    )
    tls_init.add_argument(
        "--force", action="store_true", help="re-issue the server certificate and key (same CA: devices keep working)"
    )
    tls_init.add_argument(
        "--new-ca", action="store_true", help="replace the CA too: every device must be given the new ca.pem"
    )
    command(tls_cmd, "show", cmd_tls_show, "the CA fingerprint, the certificate's names and expiry dates")

    command(commands, "cloud-key", cmd_cloud_key, "print the cloud public key to burn into firmware")
    command(commands, "jwks", cmd_jwks, "print the JWKS that verifies device tokens", json_flag=False)

    keys = commands.add_parser("keys", help="the bridge's cloud and token keys: rotate, list").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    rotate = command(keys, "rotate", cmd_keys_rotate, "make a new cloud or token key the active one")
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--token", action="store_true", help="a new token-signing key (old tokens stay valid)")
    which.add_argument("--cloud", action="store_true", help="a new cloud key for new firmware (devices keep theirs)")
    command(keys, "list", cmd_keys_list, "every key on disk: active or retired, and when a token key can go")
    command(keys, "prune", cmd_keys_prune, "remove retired token keys whose tokens have all expired")
    command(
        commands,
        "doctor",
        cmd_doctor,
        "check config, data dir, key files, database, broker and clock; one line per check, exit 1 on a failure",
    ).set_defaults(loads_settings=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    unreadable = _unreadable_argument(argv)
    if unreadable is not None:
        print(f"provbridge: error: {unreadable}", file=sys.stderr)
        return 2  # a usage error, like argparse's
    args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "loads_settings", True):
            args.func(args)
            return 0
        settings = load_settings(args.config)
        if args.data_dir is not None:
            settings = settings.model_copy(update={"data_dir": args.data_dir})
        logs.configure(settings.log_level, settings.log_format)
        args.func(args, settings)
    except ProvbridgeError as exc:
        print(f"provbridge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
