"""`provbridge tls init|show`: the private CA and the broker's server certificate."""

import argparse
from dataclasses import asdict
from typing import Any

from bridge.cli.common import add_command, emit
from bridge.config import Settings
from bridge.tls import certificates as tls


def tls_text(settings: Settings, result: tls.TlsInitResult) -> str:
    """What `tls init` (and `init --tls`) created or kept, for people."""
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
    text = kept + tls_text(settings, result)
    emit(args, {**asdict(result), "changed": result.changed}, text)


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
    emit(args, data, text)


def add_commands(commands: Any) -> None:
    tls_cmd = commands.add_parser("tls", help="the broker's TLS certificate and private CA").add_subparsers(
        dest="tls_command", required=True, metavar="ACTION"
    )
    tls_init = add_command(
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
    add_command(tls_cmd, "show", cmd_tls_show, "the CA fingerprint, the certificate's names and expiry dates")
