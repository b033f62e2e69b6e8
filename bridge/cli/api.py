"""`provbridge api` (the admin HTTP API in the foreground) and `provbridge admin-token create|list|revoke`."""

import argparse
import time
from typing import Any

from bridge.cli.common import add_command, emit, table, when
from bridge.config import Settings
from bridge.errors import NotInitialised
from bridge.ops import admin
from bridge.ops import admin_tokens as tokens
from bridge.storage import keyfiles
from bridge.storage.records import AdminToken


def _token_view(token: AdminToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "scopes": sorted(token.scopes),
        "tenant": token.tenant_name,
        "created_at": token.created_at,
        "revoked_at": token.revoked_at,
    }


def cmd_api(args: argparse.Namespace, settings: Settings) -> None:
    from bridge.api.server import run_api

    if not keyfiles.is_initialised(settings.data_dir):
        raise NotInitialised(f"{settings.data_dir} is not initialised: run `provbridge init` first")
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    run_api(settings.model_copy(update={"api": settings.api.model_copy(update=updates)}))


def cmd_admin_token_create(args: argparse.Namespace, settings: Settings) -> None:
    made = tokens.create_admin_token(admin.open_store(settings), args.name, args.scope, args.tenant, int(time.time()))
    where = f"tenant {args.tenant}" if args.tenant else "every tenant"
    text = (
        f"created admin token {made.token.id} ({made.token.name}): {', '.join(sorted(made.token.scopes))} on {where}\n"
        f"shown once, keep it like a password (send it as Authorization: Bearer ...):\n  {made.raw}"
    )
    emit(args, _token_view(made.token) | {"token": made.raw}, text)


def cmd_admin_token_list(args: argparse.Namespace, settings: Settings) -> None:
    found = admin.open_store(settings).admin_tokens()
    rows = [
        {
            "id": t.id,
            "name": t.name,
            "scopes": ",".join(sorted(t.scopes)),
            "tenant": t.tenant_name or "*",
            "created": when(t.created_at),
            "revoked": when(t.revoked_at),
        }
        for t in found
    ]
    emit(args, [_token_view(t) for t in found], table(rows, ["id", "name", "scopes", "tenant", "created", "revoked"]))


def cmd_admin_token_revoke(args: argparse.Namespace, settings: Settings) -> None:
    token = tokens.revoke_admin_token(admin.open_store(settings), args.token_id, int(time.time()))
    emit(args, _token_view(token), f"revoked admin token {token.id} ({token.name}): refused from its next request")


def add_commands(commands: Any) -> None:
    api = add_command(
        commands,
        "api",
        cmd_api,
        "run the admin HTTP API alone (serve starts it too: api.enabled); loopback only unless api.host says",
        json_flag=False,
    )
    api.add_argument("--host", help="listen address (default: api.host, 127.0.0.1)")
    api.add_argument("--port", type=int, help="listen port (default: api.port, 8780)")
    token = commands.add_parser("admin-token", help="tokens of the admin HTTP API").add_subparsers(
        dest="admin_token_command", required=True, metavar="ACTION"
    )
    create = add_command(token, "create", cmd_admin_token_create, "create an admin API token, printed once")
    create.add_argument("--name", required=True, help="who or what uses it, e.g. the backend's name")
    create.add_argument(
        "--scope",
        action="append",
        choices=tokens.SCOPES,
        required=True,
        help="read (GETs, metrics), write (read and every change), backend (cloud key, purpose keys, device tokens,"
        " API-key checks); repeat for several",
    )
    create.add_argument("--tenant", help="limit it to one tenant (default: every tenant)")
    add_command(token, "list", cmd_admin_token_list, "list admin API tokens (never their values)")
    add_command(token, "revoke", cmd_admin_token_revoke, "revoke an admin API token").add_argument("token_id")
