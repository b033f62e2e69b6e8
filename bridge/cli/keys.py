"""`provbridge cloud-key|jwks|keys`: the bridge's own cloud and token keys, published and rotated."""

import argparse
import json
import time
from dataclasses import asdict
from typing import Any

from cryptography.hazmat.primitives import serialization

from bridge.cli.common import add_command, emit, table, when
from bridge.config import Settings
from bridge.storage import keyfiles, rotation, sharedfiles
from provwire import crypto


def cmd_cloud_key(args: argparse.Namespace, settings: Settings) -> None:
    ring = keyfiles.load_keys(settings.data_dir)
    public = ring.cloud_key.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    sec1 = crypto.b64encode(crypto.sec1(public))
    data = {"kid": ring.active_cloud, "sec1_base64": sec1, "pem": pem}
    emit(args, data, f"kid: {ring.active_cloud}\nsec1 (base64): {sec1}\n{pem.rstrip()}")


def cmd_jwks(args: argparse.Namespace, settings: Settings) -> None:
    print(json.dumps(keyfiles.jwks(keyfiles.load_keys(settings.data_dir)), indent=2))


def cmd_keys_rotate(args: argparse.Namespace, settings: Settings) -> None:
    now = int(time.time())
    done = sharedfiles.rotate(settings, "token" if args.token else "cloud", now)
    if done.kind == "token":
        text = (
            f"token key {done.new_kid} is active (was {done.old_kid}); jwks.json lists both, so tokens signed"
            f" before keep working until they expire. Token key {done.next_kid} is published for the next rotation"
        )
        cached = settings.token.jwks_max_age_seconds
        published = "made now" if done.published_at is None else f"published {now - done.published_at} s ago"
        if done.published_at is None or now - done.published_at < cached:
            text += (
                f"\nwarning: {done.new_kid} was {published}, less than the JWKS cache time"
                f" (token.jwks_max_age_seconds = {cached}): a verifier that caches the JWKS (EMQX) may refuse its"
                " tokens until it fetches /.well-known/jwks.json again"
            )
    else:
        text = (
            f"cloud key {done.new_kid} is active (was {done.old_kid}); devices provisioned with older cloud keys"
            f" keep working. Give new firmware {settings.data_dir / 'cloud_public.pem'} (`provbridge cloud-key`)"
        )
    if done.pruned:
        text += f"\npruned retired token keys whose tokens have all expired: {', '.join(done.pruned)}"
    emit(args, asdict(done), text)


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> None:
    infos = rotation.key_status(settings.data_dir)
    rows = [
        {
            "kind": k.kind,
            "kid": k.kid,
            "status": k.status,
            "retired": when(k.retired_at),
            "prunable": when(k.prunable_at),
        }
        for k in infos
    ]
    emit(args, [asdict(k) for k in infos], table(rows, ["kind", "kid", "status", "retired", "prunable"]))


def cmd_keys_prune(args: argparse.Namespace, settings: Settings) -> None:
    pruned = sharedfiles.prune(settings, int(time.time()))
    emit(args, {"pruned": list(pruned)}, f"pruned {', '.join(pruned)}" if pruned else "nothing to prune")


def add_commands(commands: Any) -> None:
    add_command(commands, "cloud-key", cmd_cloud_key, "print the cloud public key to burn into firmware")
    add_command(commands, "jwks", cmd_jwks, "print the JWKS that verifies device tokens", json_flag=False)

    keys = commands.add_parser("keys", help="the bridge's cloud and token keys: rotate, list").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    rotate = add_command(keys, "rotate", cmd_keys_rotate, "make a new cloud or token key the active one")
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--token", action="store_true", help="a new token-signing key (old tokens stay valid)")
    which.add_argument("--cloud", action="store_true", help="a new cloud key for new firmware (devices keep theirs)")
    add_command(keys, "list", cmd_keys_list, "every key on disk: active or retired, and when a token key can go")
    add_command(keys, "prune", cmd_keys_prune, "remove retired token keys whose tokens have all expired")
