"""`provbridge tenant|key|device|events`: administer what the database holds."""

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from bridge.cli.common import add_command, count, emit, table, when
from bridge.config import Settings
from bridge.errors import NotFound, UsageError
from bridge.ops import admin, devices, lifecycle
from bridge.storage.records import Device, ProvisionKey
from bridge.tls.certificates import certificate_listener_enabled
from provwire import crypto

# What SQLite stores and `when` prints: a later expiry would fail there with a traceback, not a reason.
MAX_TIMESTAMP = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())


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
        "expires": when(key.expires_at),
        "reclaim": key.reclaim_policy,
        "credential": key.credential_type,
        "status": key.status,
    }


def _device_view(device: Device) -> dict[str, Any]:
    view = asdict(device)
    view["public_key"] = crypto.b64encode(device.public_key)
    view.pop("tenant_id")
    view["tenant"] = view.pop("tenant_name")
    return view


def cmd_tenant_create(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    created = admin.create_tenant(store, settings, args.name, int(time.time()))
    key = created.default_key
    text = (
        f"created tenant {created.name} ({created.id}) and its default key {key.id}\n"
        f"shown once, keep it like a password:\n  {created.provision_key}"
    )
    data = {
        "id": created.id,
        "name": created.name,
        "default_key": _key_view(key),
        "provision_key": created.provision_key,
    }
    emit(args, data, text)


def cmd_tenant_list(args: argparse.Namespace, settings: Settings) -> None:
    page = admin.list_tenants(admin.open_store(settings), args.after, args.limit)
    rows = [
        {"id": t.id, "name": t.name, "devices": t.devices, "keys": t.keys, "created": when(t.created_at)}
        for t in page.tenants
    ]
    text = table(rows, ["id", "name", "devices", "keys", "created"])
    if page.next_cursor:
        text += f"\nmore: the next page is --after {page.next_cursor}"
    emit(args, {"tenants": [asdict(t) for t in page.tenants], "next_cursor": page.next_cursor}, text)


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"label {pair!r} must look like name=value")
        labels[name] = value
    return labels


def _label_changes(args: argparse.Namespace) -> admin.LabelChanges:
    return admin.LabelChanges(_labels(args.label), args.remove_label, args.group, args.remove_group)


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
        credential_type=args.credential,
        certificate_validity_seconds=(
            admin.parse_duration(args.certificate_validity) if args.certificate_validity else None
        ),
        preprovisioned_only=args.preprovisioned_only,
    )
    key, raw = admin.create_key(store, settings, spec, now)
    text = (
        f"created {key.kind} {key.id} ({key.name}) for tenant {key.tenant_name}\n"
        f"shown once, keep it like a password:\n  {raw}"
    )
    if key.credential_type == "certificate":
        text += "\n" + _certificate_listener_note(settings)
    emit(args, {**_key_view(key), "provision_key": raw}, text)


def _certificate_listener_note(settings: Settings) -> str:
    """What an operator must know after making a certificate key: where its devices connect, and whether they can."""
    port = settings.broker.certificate_port
    if certificate_listener_enabled(settings):
        return (
            f"its devices connect with their certificates to port {port}; the listener is set up when"
            " `provbridge serve` starts (and by `provbridge mosquitto-config`): restart it if the device CA is new"
        )
    return (
        f"warning: the broker has no certificate listener (port {port}): it needs TLS (`provbridge tls init`) and"
        " broker.certificate_listen not \"off\" (nor Mosquitto's dynsec mode); until then this key's devices get"
        " certificates they cannot connect with"
    )


def cmd_key_list(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    page = admin.list_keys(store, store.tenant_id(args.tenant) if args.tenant else None, args.after, args.limit)
    columns = ["id", "tenant", "name", "kind", "profile", "used", "expires", "reclaim", "credential", "status"]
    text = table([_key_row(k) for k in page.keys], columns)
    if page.next_cursor:
        text += f"\nmore: the next page is --after {page.next_cursor}"
    emit(args, {"keys": [_key_view(k) for k in page.keys], "next_cursor": page.next_cursor}, text)


def cmd_key_revoke(args: argparse.Namespace, settings: Settings) -> None:
    key = admin.revoke_key(admin.open_store(settings), args.key_id, int(time.time()))
    text = f"revoked {key.id} ({key.name}): new claims with it are refused (`key reinstate` undoes it)"
    emit(args, _key_view(key), text)


def cmd_key_reinstate(args: argparse.Namespace, settings: Settings) -> None:
    key = admin.reinstate_key(admin.open_store(settings), args.key_id, int(time.time()))
    emit(args, _key_view(key), f"reinstated {key.id} ({key.name}): claims with it are taken again")


def cmd_key_update(args: argparse.Namespace, settings: Settings) -> None:
    now = int(time.time())
    update = admin.KeyUpdate(
        name=args.name,
        profile=args.profile,
        max_registrations=args.max_registrations,
        unlimited=args.unlimited,
        expires_at=_expiry(args, now),
        no_expiry=args.no_expiry,
        labels=_label_changes(args),
        reclaim_policy=args.reclaim,
        preprovisioned_only=args.preprovisioned_only,
    )
    key, changed = admin.update_key(admin.open_store(settings), settings, args.key_id, update, now)
    text = f"updated {key.id} ({key.name}): " + (", ".join(changed) if changed else "nothing was different")
    emit(args, _key_view(key) | {"changed": changed}, text)


def cmd_key_codes(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    now = int(time.time())
    spec = admin.KeySpec(
        tenant=args.tenant,
        name=args.name,
        profile=args.profile,
        expires_at=_expiry(args, now),
        labels=_labels(args.label),
        groups=args.group,
        human_code=True,
    )
    codes = admin.create_codes(store, settings, spec, args.count, now)
    rows = [{"key_id": key.id, "code": raw, "expires_at": when(key.expires_at)} for key, raw in codes]
    if args.json:
        emit(args, rows, "")
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, ["key_id", "code", "expires_at"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    print(out.getvalue(), end="")


def cmd_device_list(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    where = devices.device_filter(
        tenant_id=store.tenant_id(args.tenant) if args.tenant else None,
        status=args.status,
        hardware_id=args.hardware_id,
        search=args.search,
        label=args.label,
        presence=args.presence,
    )
    page = devices.list_devices(store, where, args.after, args.limit)
    rows = [
        {
            "id": d.id,
            "tenant": d.tenant_name,
            "hardware_id": d.hardware_id,
            "name": d.name or "",
            "profile": d.profile,
            "status": d.status,
            "presence": {None: "-", True: "online", False: "offline"}[d.online],
            "last_seen": when(d.last_seen),
            "created": when(d.created_at),
        }
        for d in page.devices
    ]
    columns = ["id", "tenant", "hardware_id", "name", "profile", "status", "presence", "last_seen", "created"]
    text = table(rows, columns)
    if page.next_cursor:
        text += f"\nmore: the next page is --after {page.next_cursor}"
    emit(args, {"devices": [_device_view(d) for d in page.devices], "next_cursor": page.next_cursor}, text)


def cmd_device_update(args: argparse.Namespace, settings: Settings) -> None:
    update = devices.DeviceUpdate(
        name=args.name,
        clear_name=args.clear_name,
        profile=args.profile,
        labels=_label_changes(args),
    )
    store = admin.open_store(settings)
    device, changed = devices.update_device(store, settings, args.device_id, update, int(time.time()))
    text = f"updated {device.id}: " + (", ".join(changed) if changed else "nothing was different")
    emit(args, _device_view(device) | {"changed": changed}, text)


def cmd_device_rotate_api_key(args: argparse.Namespace, settings: Settings) -> None:
    device, raw = devices.rotate_api_key(admin.open_store(settings), args.device_id, int(time.time()))
    text = (
        f"new API key for {device.id}; the old one no longer verifies\n"
        f"shown once, give it to the device's backend over a channel you trust:\n  {raw}"
    )
    emit(args, {"device_id": device.id, "api_key": raw}, text)


def cmd_device_verify_api_key(args: argparse.Namespace, settings: Settings) -> None:
    # From stdin, not the command line, where other users of the host could read it (ps, shell history).
    api_key = sys.stdin.readline(200).strip()
    device = devices.verify_api_key(admin.open_store(settings), api_key)
    if device is None:
        raise NotFound("not a valid API key: no active device has it")
    emit(
        args,
        {"device_id": device.id, "tenant": device.tenant_name},
        f"valid: {device.id} (tenant {device.tenant_name})",
    )


def cmd_device_show(args: argparse.Namespace, settings: Settings) -> None:
    view = _device_view(admin.open_store(settings).device(args.device_id))
    text = "\n".join(f"{k:>14}: {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in view.items())
    emit(args, view, text)


def _brokers_told(settings: Settings) -> str:
    if settings.broker.mode == "external" and settings.broker.mosquitto_auth == "dynsec":
        return "Mosquitto has deleted its dynamic-security client (live session ended)"
    broker = "Mosquitto's provbridge_jwt plugin" if settings.broker.mode == "external" else "the embedded broker"
    return f"{broker} refuses them (connect, publish, subscribe; live sessions end within about a second)"


def cmd_device_revoke(args: argparse.Namespace, settings: Settings) -> None:
    device = lifecycle.revoke_device(settings, admin.open_store(settings), args.device_id)
    text = (
        f"revoked {device.id}: re-claims and token refreshes are refused, every credential it holds too:"
        f" {_brokers_told(settings)}"
    )
    emit(args, _device_view(device), text)


def cmd_device_reinstate(args: argparse.Namespace, settings: Settings) -> None:
    device = lifecycle.reinstate_device(settings, admin.open_store(settings), args.device_id)
    text = (
        f"reinstated {device.id}: its claims and refreshes are taken again; the credentials it held before stay"
        f" refused ({_brokers_told(settings)}), so it re-claims or refreshes for new ones"
    )
    emit(args, _device_view(device), text)


def cmd_device_reset(args: argparse.Namespace, settings: Settings) -> None:
    device = lifecycle.reset_device(settings, admin.open_store(settings), args.device_id)
    text = (
        f"reset {device.id}: its next valid claim (hardware id {device.hardware_id}) may bring a new key pair, once;"
        f" until then its refreshes are refused, and every credential it holds is refused: {_brokers_told(settings)}"
    )
    emit(args, _device_view(device), text)


def cmd_device_delete(args: argparse.Namespace, settings: Settings) -> None:
    device = lifecycle.delete_device(settings, admin.open_store(settings), args.device_id)
    text = (
        f"deleted {device.device_id}: hardware id {device.hardware_id} of tenant {device.tenant} is free for a new"
        f" device; every credential it held is refused: {_brokers_told(settings)}"
    )
    emit(args, {"deleted": device.device_id, "tenant": device.tenant, "hardware_id": device.hardware_id}, text)


def cmd_denylist_publish(args: argparse.Namespace, settings: Settings) -> None:
    entries = lifecycle.publish_denylist(settings, admin.open_store(settings))
    data = {"devices": len(entries.devices), "older_credentials": len(entries.older_credentials)}
    text = (
        f"wrote the denylist from the database: {data['devices']} devices refused whole, {data['older_credentials']}"
        " with older credentials refused"
    )
    emit(args, data, text)


def cmd_events(args: argparse.Namespace, settings: Settings) -> None:
    page = admin.open_store(settings).events_page(args.tenant, args.event, args.device, args.before, args.limit)
    # Each event with its sequence number: the oldest one's, as --before, gives the page before it.
    events = [{"seq": seq} | body for seq, body in page]
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
    text = table(rows, ["time", "tenant", "event", "device", "hardware_id", "reason"])
    if len(events) == args.limit:
        text += f"\nolder events: --before {events[0]['seq']}"
    emit(args, events, text)


def add_commands(commands: Any) -> None:
    tenant = commands.add_parser("tenant", help="create and list tenants").add_subparsers(
        dest="tenant_command", required=True, metavar="ACTION"
    )
    tenant_create = add_command(
        tenant, "create", cmd_tenant_create, "create a tenant and its default key (printed once)"
    )
    tenant_create.add_argument("name")
    tenant_list = add_command(tenant, "list", cmd_tenant_list, "list tenants by name, a page at a time")
    tenant_list.add_argument(
        "--limit", type=count(1), default=100, help=f"tenants per page, at most {admin.MAX_TENANT_PAGE} (default 100)"
    )
    tenant_list.add_argument("--after", metavar="NAME", help="the page after this tenant (a page's next_cursor)")

    key = commands.add_parser("key", help="provisioning keys").add_subparsers(
        dest="key_command", required=True, metavar="ACTION"
    )
    create = add_command(key, "create", cmd_key_create, "create a provisioning key; its raw value is printed once")
    create.add_argument("--tenant", default="default", help="tenant name (default: default)")
    create.add_argument("--name", required=True, help="a name for people, e.g. the production line")
    create.add_argument("--profile", default="default", help="topic profile from the config (default: default)")
    create.add_argument(
        "--hardware-id-pattern",
        metavar="REGEX",
        help="hardware ids must fully match this RE2 regular expression (matched in linear time; no backreferences"
        " or look-around)",
    )
    create.add_argument("--expires-in", metavar="DURATION", help="e.g. 12h, 30d")
    create.add_argument("--expires-at", metavar="ISO8601", help="e.g. 2027-01-31T00:00:00Z")
    limit = create.add_mutually_exclusive_group()
    limit.add_argument(
        "--max-registrations", type=count(0), metavar="N", help="devices it may create (default: no limit)"
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
        "--credential",
        choices=["token", "certificate"],
        default="token",
        help="what its devices get: token (default; an MQTT password, a JWT) or certificate (an X.509 client"
        " certificate for a CSR in the claim; makes the device CA data/tls/device-ca.pem if missing)",
    )
    create.add_argument(
        "--certificate-validity",
        metavar="DURATION",
        help="--credential certificate: how long each certificate is valid, e.g. 7d (default), at most 397d;"
        " devices renew before it ends",
    )
    create.add_argument(
        "--preprovisioned-only",
        action="store_true",
        help="create devices only for hardware ids on the tenant's allowlist (`provbridge allowlist`); others are"
        " refused (reason not_preprovisioned)",
    )
    create.add_argument(
        "--code",
        action="store_true",
        help="a one-time human code PROV-XXXX-XXXX instead of a pk_ key (valid 24h, claims.code_ttl_seconds;"
        " --expires-in may shorten it, not lengthen it)",
    )
    klist = add_command(key, "list", cmd_key_list, "list provisioning keys, oldest first, a page at a time")
    klist.add_argument("--tenant")
    klist.add_argument("--limit", type=count(1), default=100, help="keys per page, at most 1000 (default 100)")
    klist.add_argument("--after", metavar="CURSOR", help="the next page: the cursor the previous page ended with")
    add_command(key, "revoke", cmd_key_revoke, "revoke a key: new claims with it are refused").add_argument("key_id")
    add_command(key, "reinstate", cmd_key_reinstate, "take claims with a revoked key again").add_argument("key_id")
    update = add_command(
        key,
        "update",
        cmd_key_update,
        "change a key: name, profile, registrations, expiry, labels, groups, re-claim policy (one transaction, an"
        " event); what is not given stays",
    )
    update.add_argument("key_id")
    update.add_argument("--name", help="a new name")
    update.add_argument("--profile", help="topic profile for the devices it makes from now on")
    registrations = update.add_mutually_exclusive_group()
    registrations.add_argument(
        "--max-registrations", type=count(1), metavar="N", help="devices it may create in all (those made count)"
    )
    registrations.add_argument("--unlimited", action="store_true", help="no limit on the devices it may create")
    update.add_argument("--expires-in", metavar="DURATION", help="from now, e.g. 12h, 30d")
    update.add_argument("--expires-at", metavar="ISO8601", help="e.g. 2027-01-31T00:00:00Z")
    update.add_argument("--no-expiry", action="store_true", help="the key never expires (not for human codes)")
    update.add_argument("--label", action="append", default=[], metavar="NAME=VALUE", help="add or change a label")
    update.add_argument("--remove-label", action="append", default=[], metavar="NAME", help="remove a label")
    update.add_argument("--group", action="append", default=[], metavar="GROUP", help="add a group")
    update.add_argument("--remove-group", action="append", default=[], metavar="GROUP", help="remove a group")
    update.add_argument("--reclaim", choices=["reject", "rotate"], help="re-claim policy (see `key create --help`)")
    allowlisted = update.add_mutually_exclusive_group()
    allowlisted.add_argument(
        "--preprovisioned-only",
        action="store_const",
        const=True,
        help="from now on create devices only for hardware ids on the tenant's allowlist",
    )
    allowlisted.add_argument(
        "--any-hardware-id",
        dest="preprovisioned_only",
        action="store_const",
        const=False,
        help="from now on create devices for any hardware id (the default)",
    )
    codes = add_command(
        key,
        "codes",
        cmd_key_codes,
        "make N one-time human codes at once, printed once as CSV (key_id,code,expires_at); one transaction",
    )
    codes.add_argument("--count", type=count(1), required=True, metavar="N", help="how many (at most 10000)")
    codes.add_argument("--tenant", default="default", help="tenant name (default: default)")
    codes.add_argument("--name", required=True, help="a name they share, e.g. the batch")
    codes.add_argument("--profile", default="default", help="topic profile from the config (default: default)")
    codes.add_argument("--expires-in", metavar="DURATION", help="shorter than claims.code_ttl_seconds (24h)")
    codes.add_argument("--expires-at", metavar="ISO8601", help="e.g. 2027-01-31T00:00:00Z")
    codes.add_argument("--label", action="append", default=[], metavar="NAME=VALUE", help="label for their devices")
    codes.add_argument("--group", action="append", default=[], metavar="GROUP", help="group for their devices")

    device = commands.add_parser("device", help="provisioned devices").add_subparsers(
        dest="device_command", required=True, metavar="ACTION"
    )
    dlist = add_command(device, "list", cmd_device_list, "list devices, newest first, a page at a time")
    dlist.add_argument("--tenant")
    dlist.add_argument("--status", choices=["active", "revoked"])
    dlist.add_argument("--hardware-id", metavar="ID", help="only devices with this hardware id (one per tenant)")
    dlist.add_argument("--search", metavar="TEXT", help="a device id (dev_...), or the start of hardware ids")
    dlist.add_argument("--label", metavar="NAME=VALUE", help="only devices with this label")
    dlist.add_argument("--presence", choices=["online", "offline"], help="offline: seen, not connected now")
    dlist.add_argument("--limit", type=count(1), default=100, help="devices per page, at most 1000 (default 100)")
    dlist.add_argument("--after", metavar="CURSOR", help="the next page: the cursor the previous page ended with")
    add_command(device, "show", cmd_device_show, "show one device").add_argument("device_id")
    add_command(
        device, "revoke", cmd_device_revoke, "revoke a device: its claims, refreshes and credentials are refused"
    ).add_argument("device_id")
    add_command(
        device,
        "reinstate",
        cmd_device_reinstate,
        "make a revoked device active again (the credentials it held stay refused: it re-claims or refreshes)",
    ).add_argument("device_id")
    add_command(
        device,
        "reset",
        cmd_device_reset,
        "a device lost its key pair (storage wiped): let its next valid claim bring a new one, once;"
        " refuse what it holds now",
    ).add_argument("device_id")
    add_command(
        device,
        "delete",
        cmd_device_delete,
        "delete a device: its hardware id is free again; every credential it held is refused",
    ).add_argument("device_id")
    dupdate = add_command(
        device,
        "update",
        cmd_device_update,
        "change a device's name, profile, labels or groups (one transaction, an event); what is not given stays",
    )
    dupdate.add_argument("device_id")
    dupdate.add_argument("--name", help="a new name")
    dupdate.add_argument("--clear-name", action="store_true", help="remove its name")
    dupdate.add_argument("--profile", help="topic profile of the tokens it gets from its next refresh or re-claim")
    dupdate.add_argument("--label", action="append", default=[], metavar="NAME=VALUE", help="add or change a label")
    dupdate.add_argument("--remove-label", action="append", default=[], metavar="NAME", help="remove a label")
    dupdate.add_argument("--group", action="append", default=[], metavar="GROUP", help="add a group")
    dupdate.add_argument("--remove-group", action="append", default=[], metavar="GROUP", help="remove a group")
    add_command(
        device, "rotate-api-key", cmd_device_rotate_api_key, "a new dk_ API key for a device, printed once"
    ).add_argument("device_id")
    add_command(
        device,
        "verify-api-key",
        cmd_device_verify_api_key,
        "read a dk_ API key on stdin: which device and tenant it belongs to (exit 1 when none active has it)",
    )

    denylist = commands.add_parser("denylist", help="the credentials brokers refuse").add_subparsers(
        dest="denylist_command", required=True, metavar="ACTION"
    )
    add_command(
        denylist,
        "publish",
        cmd_denylist_publish,
        "rewrite <data_dir>/denylist.json from the database (after a failed write; serve does it at start too)",
    )
    events = add_command(commands, "events", cmd_events, "recent provisioning events, oldest first")
    events.add_argument("--tenant")
    events.add_argument("--event", help="e.g. device.provisioned, claim.rejected")
    events.add_argument("--device", metavar="DEVICE_ID", help="only this device's events")
    events.add_argument("--limit", type=count(1), default=50)
    events.add_argument(
        "--before", type=count(1), metavar="SEQ", help="only events older than this one (the page before: its seq)"
    )
