"""`provbridge`: run the service and administer tenants, provisioning keys and devices.

Every command exits non-zero with a one-line reason on error; `--json` gives scripts stable output.
"""

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from bridge import logs
from bridge.cli import admin as cli_admin
from bridge.cli import allowlist as cli_allowlist
from bridge.cli import api as cli_api
from bridge.cli import keys as cli_keys
from bridge.cli import ops as cli_ops
from bridge.cli import run as cli_run
from bridge.cli import storage as cli_storage
from bridge.cli import tls as cli_tls
from bridge.cli.common import add_command, emit, reader_gone
from bridge.config import load_settings
from bridge.errors import DoctorFailed, ProvbridgeError, UsageError
from bridge.ops import doctor

EPILOG = """\
quick start:
  provbridge init                       create ./data (keys, database, a first key printed once)
  provbridge serve                      embedded broker + bridge on 127.0.0.1:1883
  provbridge key create --tenant default --name line-1 --max-registrations 500
  provbridge-sim --key pk_... --devices 10

settings come from config/provbridge.toml (or --config), overridden by PROVBRIDGE_* variables,
e.g. PROVBRIDGE_DATA_DIR=/var/lib/provbridge PROVBRIDGE_BROKER__PORT=1884.
"""

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


def cmd_doctor(args: argparse.Namespace) -> None:
    # It loads the settings itself: a configuration that does not load is one of its findings.
    report = doctor.run_checks(args.config, args.data_dir)
    emit(args, report.as_dict(), "\n".join(check.line() for check in report.checks))
    if not report.ok:
        raise DoctorFailed(f"{len(report.failed)} of {len(report.checks)} checks failed")


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
    # `provbridge --help` lists the commands in the order they are added here.
    cli_run.add_commands(commands)  # init, serve, broker, mosquitto-config
    cli_admin.add_commands(commands)  # tenant, key, device, events
    cli_allowlist.add_commands(commands)  # allowlist
    cli_api.add_commands(commands)  # api, admin-token
    cli_ops.add_commands(commands)  # ops-user
    cli_tls.add_commands(commands)  # tls
    cli_keys.add_commands(commands)  # cloud-key, jwks, keys
    cli_storage.add_commands(commands)  # storage
    add_command(
        commands,
        "doctor",
        cmd_doctor,
        "check config, data dir, key files, database, hardware-id patterns, broker, the dynsec mirror's size and"
        " clock; one line per check, exit 1 on a failure (a WARN line does not fail)",
    ).set_defaults(loads_settings=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 1 failed (the reason on stderr), 2 bad arguments, 141 the reader of stdout went away."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a reader that went away shows here, not in a warning at interpreter exit
    except BrokenPipeError:
        return reader_gone()
    return code


def _run(argv: Sequence[str] | None) -> int:
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
    except UsageError as exc:
        print(f"provbridge: error: {exc}", file=sys.stderr)
        return 2  # like argparse's own usage errors
    except ProvbridgeError as exc:
        print(f"provbridge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
