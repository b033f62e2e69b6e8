"""`provbridge ops-user create|list|delete`: read-only broker accounts for watching events."""

import argparse
from typing import Any

from bridge.cli.common import add_command, emit
from bridge.config import Settings
from bridge.ops import admin
from bridge.storage import keyfiles


def cmd_ops_user_create(args: argparse.Namespace, settings: Settings) -> None:
    keyfiles.load_keys(settings.data_dir)
    from bridge.mosquitto.files import ops_user_created  # its dynamic-security hash, for Mosquitto

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
    emit(args, {"username": args.name, "password": password}, text)


def cmd_ops_user_list(args: argparse.Namespace, settings: Settings) -> None:
    names = sorted(keyfiles.read_ops_users(settings.data_dir))
    emit(args, names, "\n".join(names) or "(none)")


def cmd_ops_user_delete(args: argparse.Namespace, settings: Settings) -> None:
    keyfiles.load_keys(settings.data_dir)  # an uninitialised data dir is refused, not created by the lock
    from bridge.mosquitto.files import ops_user_deleted

    with keyfiles.ops_users_locked(settings.data_dir):  # as in create
        admin.delete_ops_user(settings, args.name)
        mosquitto = ops_user_deleted(settings, args.name)
    text = f"deleted ops user {args.name}" + (f"\nMosquitto: {mosquitto}" if mosquitto else "")
    emit(args, {"deleted": args.name}, text)


def add_commands(commands: Any) -> None:
    ops = commands.add_parser("ops-user", help="read-only broker accounts for watching events").add_subparsers(
        dest="ops_command", required=True, metavar="ACTION"
    )
    add_command(ops, "create", cmd_ops_user_create, "create an ops user; its password is printed once").add_argument(
        "name"
    )
    add_command(ops, "list", cmd_ops_user_list, "list ops users")
    add_command(ops, "delete", cmd_ops_user_delete, "delete an ops user").add_argument("name")
