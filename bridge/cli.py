"""`provbridge`: run the service and administer tenants, provisioning keys and devices.

Every command exits non-zero with a one-line reason on error; `--json` gives scripts stable output.
"""

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from bridge import admin, keyfiles
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
    result = admin.init_data_dir(settings)
    if not result.created:
        _emit(
            args,
            {**asdict(result), "data_dir": str(settings.data_dir)},
            f"{settings.data_dir} is already initialised (cloud key {result.cloud_key_id}); nothing changed",
        )
        return
    text = (
        f"initialised {settings.data_dir}\n"
        f"  tenant:        {result.tenant}\n"
        f"  cloud key id:  {result.cloud_key_id}   (public key: provbridge cloud-key)\n"
        f"  first key id:  {result.key_id}\n"
        f"  provisioning key (shown once, keep it like a password):\n    {result.provision_key}"
    )
    _emit(args, {**asdict(result), "data_dir": str(settings.data_dir)}, text)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    from bridge.serve import serve

    if not keyfiles.is_initialised(settings.data_dir):
        raise UsageError(f"{settings.data_dir} is not initialised: run `provbridge init` first")
    asyncio.run(serve(settings))


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
        return now + admin.parse_duration(args.expires_in)
    if args.expires_at:
        try:
            moment = datetime.fromisoformat(args.expires_at)
        except ValueError as exc:
            raise UsageError(f"--expires-at {args.expires_at!r} is not an ISO 8601 time") from exc
        return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
    return None


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
    device = admin.open_store(settings).revoke_device(args.device_id, int(time.time()))
    _emit(args, _device_view(device), f"revoked {device.id}: it can no longer re-claim")


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
    password = admin.create_ops_user(settings, args.name)
    text = (
        f"created ops user {args.name}: it may read {settings.topic_prefix}/events/# and status topics\n"
        f"password (shown once):\n  {password}"
    )
    _emit(args, {"username": args.name, "password": password}, text)


def cmd_ops_user_list(args: argparse.Namespace, settings: Settings) -> None:
    names = sorted(keyfiles.read_ops_users(settings.data_dir))
    _emit(args, names, "\n".join(names) or "(none)")


def cmd_ops_user_delete(args: argparse.Namespace, settings: Settings) -> None:
    admin.delete_ops_user(settings, args.name)
    _emit(args, {"deleted": args.name}, f"deleted ops user {args.name}")


def cmd_cloud_key(args: argparse.Namespace, settings: Settings) -> None:
    ring = keyfiles.load_keys(settings.data_dir)
    public = ring.cloud_key.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    sec1 = crypto.b64encode(crypto.sec1(public))
    data = {"kid": ring.active_cloud, "sec1_base64": sec1, "pem": pem}
    _emit(args, data, f"kid: {ring.active_cloud}\nsec1 (base64): {sec1}\n{pem.rstrip()}")


def cmd_jwks(args: argparse.Namespace, settings: Settings) -> None:
    print(json.dumps(keyfiles.jwks(keyfiles.load_keys(settings.data_dir)), indent=2))


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

    command(commands, "init", cmd_init, "create the data dir: keys, database, default tenant, a first key")
    command(
        commands,
        "serve",
        cmd_serve,
        "run the bridge (and the embedded broker unless broker.mode=external)",
        json_flag=False,
    )
    command(commands, "broker", cmd_broker, "run only the embedded broker", json_flag=False)

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
    limit.add_argument("--max-registrations", type=int, metavar="N", help="devices it may create (default: no limit)")
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
    dlist.add_argument("--limit", type=int, default=100)
    command(device, "show", cmd_device_show, "show one device").add_argument("device_id")
    command(device, "revoke", cmd_device_revoke, "revoke a device").add_argument("device_id")

    events = command(commands, "events", cmd_events, "recent provisioning events, oldest first")
    events.add_argument("--tenant")
    events.add_argument("--event", help="e.g. device.provisioned, claim.rejected")
    events.add_argument("--limit", type=int, default=50)

    ops = commands.add_parser("ops-user", help="read-only broker accounts for watching events").add_subparsers(
        dest="ops_command", required=True, metavar="ACTION"
    )
    command(ops, "create", cmd_ops_user_create, "create an ops user; its password is printed once").add_argument("name")
    command(ops, "list", cmd_ops_user_list, "list ops users")
    command(ops, "delete", cmd_ops_user_delete, "delete an ops user").add_argument("name")

    command(commands, "cloud-key", cmd_cloud_key, "print the cloud public key to burn into firmware")
    command(commands, "jwks", cmd_jwks, "print the JWKS that verifies device tokens", json_flag=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.data_dir is not None:
            settings = settings.model_copy(update={"data_dir": args.data_dir})
        logging.basicConfig(
            level=settings.log_level,
            stream=sys.stdout,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        args.func(args, settings)
    except ProvbridgeError as exc:
        print(f"provbridge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
