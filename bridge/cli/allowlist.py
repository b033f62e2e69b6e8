"""`provbridge allowlist`: pre-provisioned hardware ids (bridge/ops/allowlist.py)."""

import argparse
import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

from bridge.cli.common import add_command, count, emit, table, when
from bridge.config import Settings
from bridge.errors import UsageError
from bridge.ops import admin
from bridge.ops import allowlist as ops
from bridge.storage.records import AllowlistEntry


def _entry_view(entry: AllowlistEntry) -> dict[str, Any]:
    return {
        "hardware_id": entry.hardware_id,
        "device_id": entry.device_id,
        "api_key_made": entry.api_key_hash is not None,
        "name": entry.name,
        "labels": entry.labels,
        "created_at": entry.created_at,
    }


def _credentials_csv(added: list[ops.Added]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["hardware_id", "device_id", "api_key"])
    for a in added:
        writer.writerow([a.entry.hardware_id, a.entry.device_id, a.api_key])
    return out.getvalue().rstrip("\n")


def _labels(pairs: list[str]) -> dict[str, str]:
    try:
        return ops.parse_labels(";".join(pairs))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_allowlist_add(args: argparse.Namespace, settings: Settings) -> None:
    store = admin.open_store(settings)
    new = ops.NewEntry(args.hardware_id, args.name, _labels(args.label))
    added = ops.add_entry(store, args.tenant, new, args.with_credentials, int(time.time()))
    text = f"{added.entry.hardware_id} is on the allowlist of tenant {args.tenant}"
    data = _entry_view(added.entry)
    if added.api_key is not None:
        text += (
            f"; its device will be {added.entry.device_id}, with this API key"
            f" (shown once, keep it like a password):\n  {added.api_key}"
        )
        data["api_key"] = added.api_key
    emit(args, data, text)


def cmd_allowlist_list(args: argparse.Namespace, settings: Settings) -> None:
    page = ops.list_entries(admin.open_store(settings), args.tenant, args.after, args.limit)
    rows = [
        {
            "hardware_id": e.hardware_id,
            "device_id": e.device_id or "-",
            "name": e.name or "-",
            "labels": ",".join(f"{k}={v}" for k, v in e.labels.items()) or "-",
            "added": when(e.created_at),
        }
        for e in page.entries
    ]
    text = table(rows, ["hardware_id", "device_id", "name", "labels", "added"])
    if page.next_cursor:
        text += f"\nmore: --after {page.next_cursor}"
    emit(args, {"entries": [_entry_view(e) for e in page.entries], "next_cursor": page.next_cursor}, text)


def cmd_allowlist_remove(args: argparse.Namespace, settings: Settings) -> None:
    ops.remove_entry(admin.open_store(settings), args.tenant, args.hardware_id, int(time.time()))
    emit(args, {"removed": args.hardware_id}, f"{args.hardware_id} is off the allowlist of tenant {args.tenant}")


def cmd_allowlist_import(args: argparse.Namespace, settings: Settings) -> None:
    path = Path(args.file)
    try:
        # One byte past the limit is enough to refuse the file: never more in memory.
        if args.file == "-":
            data = sys.stdin.buffer.read(ops.MAX_IMPORT_BYTES + 1)
        else:
            with path.open("rb") as source:
                data = source.read(ops.MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    store = admin.open_store(settings)
    done = ops.import_csv(store, args.tenant, data, dry_run=args.dry_run, with_credentials=args.with_credentials)
    if done.dry_run:
        emit(args, {"dry_run": True, "entries": done.entries}, f"{done.entries} entries would be imported: no problems")
        return
    skipped = _skipped_line(done.skipped)
    if args.with_credentials:
        # The API keys go to stdout once, as CSV for the flashing station; the summary to stderr.
        print(f"imported {done.entries} entries; their device ids and API keys (shown once):", file=sys.stderr)
        if skipped:
            print(skipped, file=sys.stderr)
        rows = [
            {"hardware_id": a.entry.hardware_id, "device_id": a.entry.device_id, "api_key": a.api_key}
            for a in done.credentials
        ]
        emit(args, rows, _credentials_csv(done.credentials))
        return
    data = {"dry_run": False, "entries": done.entries, "skipped": done.skipped}
    emit(args, data, f"imported {done.entries} entries" + (f"\n{skipped}" if skipped else ""))


def _skipped_line(skipped: list[str]) -> str:
    """What an import left out because claims made devices of those hardware ids meanwhile; '' if nothing."""
    if not skipped:
        return ""
    shown = ", ".join(skipped[:20]) + (f" and {len(skipped) - 20} more" if len(skipped) > 20 else "")
    return f"skipped {len(skipped)}: became devices while the import ran: {shown}"


def add_commands(commands: Any) -> None:
    allowlist = commands.add_parser(
        "allowlist", help="pre-provisioned hardware ids (`key create --preprovisioned-only` admits only these)"
    ).add_subparsers(dest="allowlist_command", required=True, metavar="ACTION")
    add = add_command(allowlist, "add", cmd_allowlist_add, "put one hardware id on a tenant's allowlist")
    add.add_argument("hardware_id")
    add.add_argument("--tenant", default="default", help="tenant name (default: default)")
    add.add_argument("--name", help="the device's name (over the one its claim gives)")
    add.add_argument("--label", action="append", default=[], metavar="NAME=VALUE", help="a label for the device")
    add.add_argument(
        "--with-credentials",
        action="store_true",
        help="make its device id and API key now, the key printed once (to flash into the device)",
    )
    listing = add_command(allowlist, "list", cmd_allowlist_list, "a tenant's allowlist, newest first, a page at a time")
    listing.add_argument("--tenant", default="default", help="tenant name (default: default)")
    listing.add_argument("--limit", type=count(1), default=100, help="entries per page, at most 1000 (default 100)")
    listing.add_argument("--after", metavar="CURSOR", help="the next page: the cursor the previous page ended with")
    remove = add_command(allowlist, "remove", cmd_allowlist_remove, "take a hardware id off a tenant's allowlist")
    remove.add_argument("hardware_id")
    remove.add_argument("--tenant", default="default", help="tenant name (default: default)")
    imp = add_command(
        allowlist,
        "import",
        cmd_allowlist_import,
        "put a CSV file of hardware ids on a tenant's allowlist, all or nothing (header: hardware_id[,name][,labels];"
        " labels as name=value;name=value)",
    )
    imp.add_argument("file", metavar="FILE", help="the CSV file, - for stdin")
    imp.add_argument("--tenant", default="default", help="tenant name (default: default)")
    imp.add_argument("--dry-run", action="store_true", help="check every line and report; change nothing")
    imp.add_argument(
        "--with-credentials",
        action="store_true",
        help="make each entry's device id and API key; printed once, as CSV hardware_id,device_id,api_key",
    )
