"""`provbridge storage`: move the data dir's SQLite database into PostgreSQL."""

import argparse
import re
import time
from typing import Any

from bridge.cli.common import add_command, emit, table
from bridge.config import Settings
from bridge.storage import keyfiles
from bridge.storage.copy import copy_to_postgres
from bridge.storage.postgres import where
from bridge.storage.sharedfiles import copy_files


def _postgres_url(text: str) -> str:
    if not re.match(r"^postgres(ql)?://", text):
        raise argparse.ArgumentTypeError("not a postgresql:// URL")
    return text


def cmd_storage_copy(args: argparse.Namespace, settings: Settings) -> None:
    keyfiles.load_keys(settings.data_dir)  # refuses an uninitialised data dir with a clear reason
    copied = copy_to_postgres(settings.database_file, args.to, copy_files(settings, int(time.time())))
    rows = [{"table": name, "rows": str(count)} for name, count in copied.rows.items()]
    text = table(rows, ["table", "rows"]) + (
        f"\ncopied {sum(copied.rows.values())} rows into PostgreSQL at {where(args.to)}, each table verified row for"
        f" row, and {len(copied.files)} key files and the bridge secret, sealed with {settings.storage_key_file}"
        f" and verified. Set storage.url (PROVBRIDGE_STORAGE__URL) to it and start the bridge with this data dir;"
        f" another host joins with `provbridge init`, given the same storage.url and a copy of"
        f" {settings.storage_key_file.name}. {settings.database_file} was not changed."
    )
    emit(args, {"rows": copied.rows, "files": copied.files, "to": where(args.to)}, text)


def add_commands(commands: Any) -> None:
    storage = commands.add_parser("storage", help="the bridge's database: copy SQLite into PostgreSQL").add_subparsers(
        dest="storage_command", required=True, metavar="ACTION"
    )
    copy = add_command(
        storage,
        "copy",
        cmd_storage_copy,
        "with the bridge stopped, copy the data dir's SQLite database into an empty PostgreSQL database (the schema"
        " is made there), verify every table row for row; on any difference nothing is kept",
    )
    copy.add_argument("--to", required=True, type=_postgres_url, metavar="URL", help="postgresql://user@host/db")
