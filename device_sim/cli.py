"""`provbridge-sim`: provision a simulated fleet against a running bridge and report how it went."""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim import hostinfo
from device_sim.device import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT_S
from device_sim.errors import UsageError
from device_sim.fleet import DeviceOutcome, FleetConfig, Summary, run_fleet, summarise
from provwire import crypto, topics

KEY_ENV = "PROVBRIDGE_SIM_KEY"
DATA_DIR_ENV = "PROVBRIDGE_DATA_DIR"  # the bridge's own data dir setting; its cloud key is the default
TABLE_MAX_DEVICES = 20  # above this a per-device table is noise: show progress instead

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_READER_GONE = 141  # stdout's reader went away (`provbridge-sim ... | head`), as for a tool killed by SIGPIPE


DESCRIPTION = """\
Simulate devices provisioning themselves through a provbridge bridge over MQTT.

Each simulated device (hardware id <prefix><index:06d>) keeps a P-256 key pair in its own directory
under --state-dir, publishes a claim (with this host's real hardware and network facts) using the
provisioning key, opens the sealed credentials the bridge answers with, stores them encrypted
(AES-256-GCM) next to its key, then reconnects with its MQTT token and publishes one message on its
own topic. A device counts as successful only when that publish is acknowledged.

With --certificate (for a provisioning key made with `provbridge key create --credential certificate`)
each claim also carries a CSR for the device's key; the device keeps the certificate chain it gets in
its vault, and proves it by connecting with TLS and that certificate, no password, to the broker's
certificate listener.

Re-running with the same --state-dir re-claims the same devices with the same keys (the bridge
answers created=no); use another --state-dir or --hardware-id-prefix for a fresh fleet.
"""

EPILOG = f"""\
environment:
  {KEY_ENV}   the provisioning key, when --key is not given. Prefer it to --key: a
                       command line is visible to every user of the host (ps).
  {DATA_DIR_ENV}  the bridge's data dir; the default --cloud-key is read from it.

exit status:
  0  every device got credentials and connected with its token or certificate
  1  at least one device failed (see the table or the "failures" of --json)
  2  usage error (bad argument, unreadable cloud key, missing provisioning key)
  130 interrupted

examples:
  {KEY_ENV}=pk_... provbridge-sim --devices 5
  provbridge-sim --cloud-key data/cloud_public.pem --devices 1000 --concurrency 64 --json
  provbridge-sim --devices 5 --refresh     the same 5 devices renew their tokens, no provisioning key
  provbridge-sim --certificate --ca-file data/tls/ca.pem --devices 5
                                           claim certificates, connect with them to port 8884
"""


def default_cloud_key() -> str:
    return str(Path(os.environ.get(DATA_DIR_ENV) or "data") / "cloud_public.pem")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provbridge-sim",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="MQTT broker host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=1883, help="MQTT broker port (default: %(default)s)")
    parser.add_argument(
        "--key",
        metavar="PROVISION_KEY",
        help=f"provisioning key (pk_...) the devices claim with; default: ${KEY_ENV}",
    )
    parser.add_argument(
        "--cloud-key",
        default=default_cloud_key(),
        metavar="PEM_PATH|BASE64",
        help="the bridge's cloud public key: a PEM file, or the base64 of its 65-byte SEC1 point "
        f"(default: %(default)s, written by `provbridge init`; ${DATA_DIR_ENV}/cloud_public.pem "
        f"when ${DATA_DIR_ENV} is set)",
    )
    parser.add_argument("--devices", type=int, default=1, metavar="N", help="devices to simulate (default: 1)")
    parser.add_argument(
        "--concurrency", type=int, default=16, metavar="C", help="devices in flight at once (default: 16)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("sim-data"),
        help="where each device keeps its key and credentials vault (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix", default=topics.DEFAULT_PREFIX, help="provisioning topic prefix (default: %(default)s)"
    )
    parser.add_argument(
        "--hardware-id-prefix",
        metavar="PREFIX",
        help="hardware ids are PREFIX + 6-digit index (default: sim-<8 hex of this host's machine id>-)",
    )
    parser.add_argument(
        "--first-index", type=int, default=1, metavar="I", help="index of the first device (default: 1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="wait for each answer/ack before re-sending or giving up; re-sends wait twice as long "
        "each time (default: %(default)s)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        metavar="N",
        help="claim sends per device, counting re-sends after a timeout or a retryable error (default: %(default)s)",
    )
    parser.add_argument(
        "--claim-username",
        metavar="NAME",
        help="username for the claim connection, for brokers that refuse anonymous clients "
        "(usually 'provision'; default: connect anonymously)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="use TLS for the claim connection (the broker port must be a TLS one)",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="the only CA to trust for the broker, e.g. data/tls/ca.pem from `provbridge init --tls` "
        "(default: the system CAs); the broker's name is checked against its certificate too",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="devices that hold credentials in --state-dir renew their token, or their certificate (a CSR for the "
        "same key), over the token topic (no provisioning key needed; --cloud-key must be the one they claimed "
        "with) instead of re-claiming; the others claim",
    )
    parser.add_argument(
        "--certificate",
        action="store_true",
        help="claim certificate credentials: each claim carries a CSR for the device's key, as a provisioning key "
        "made with `--credential certificate` requires; devices then connect with TLS and the certificate "
        "(--ca-file must name the broker's CA) to the certificate listener. With --refresh, devices renew "
        "whatever they hold, token or certificate, with or without this flag",
    )
    parser.add_argument(
        "--certificate-port",
        type=int,
        metavar="PORT",
        help="where devices holding a certificate connect, the broker's certificate listener "
        "(broker.certificate_port; default: the port their credentials name, 8884 unless configured)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout instead of text")
    return parser


def load_cloud_public_key(spec: str) -> ec.EllipticCurvePublicKey:
    """A PEM file path, or the base64 SEC1 point itself. Raises UsageError with a one-line reason."""
    path = Path(spec)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read cloud key {spec}: {exc.strerror}") from exc
        if b"-----BEGIN" not in data:
            return _sec1_key(data.decode("ascii", errors="replace").strip(), f"cloud key file {spec}")
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise UsageError(f"cloud key {spec} is not a PEM public key") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise UsageError(f"cloud key {spec} is not a P-256 public key")
        return key
    try:
        return crypto.public_key_from_sec1(crypto.b64decode(spec))
    except ValueError:  # binascii.Error, InvalidPublicKey and non-ASCII input are all ValueErrors
        pass
    if path.exists():
        raise UsageError(f"cloud key {spec} is not a file")
    raise UsageError(
        f"cloud key {spec}: no such file, and not base64 of a SEC1 P-256 point "
        "(run `provbridge init` first, or pass --cloud-key)"
    )


def _sec1_key(text: str, what: str) -> ec.EllipticCurvePublicKey:
    try:
        return crypto.public_key_from_sec1(crypto.b64decode(text))
    except ValueError as exc:
        raise UsageError(f"{what} is neither PEM nor base64 of a SEC1 P-256 point") from exc


def _provision_key(arg: str | None, refresh: bool = False) -> str:
    key = arg if arg is not None else os.environ.get(KEY_ENV)
    if not key and refresh:
        return ""  # devices without stored credentials will fail, each with its reason
    if not key:
        raise UsageError(f"no provisioning key: pass --key or set {KEY_ENV}")
    # The reason never quotes the key: error output ends up in CI logs and terminals.
    if len(key) > 256 or not key.isprintable():
        raise UsageError("the provisioning key must be 1-256 printable characters")
    return key


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port")
    if args.certificate_port is not None and not 1 <= args.certificate_port <= 65535:
        raise UsageError(f"--certificate-port {args.certificate_port} is not a TCP port")
    if args.devices < 1:
        raise UsageError("--devices must be at least 1")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    if args.max_attempts < 1:
        raise UsageError("--max-attempts must be at least 1")
    if args.first_index < 0 or args.first_index + args.devices > 1_000_000:
        raise UsageError("device indexes must stay within 0..999999")
    if not args.prefix or any(c in args.prefix for c in "+#") or args.prefix.endswith("/"):
        raise UsageError(f"--prefix {args.prefix!r} must be a topic without wildcards or trailing '/'")
    if args.ca_file is not None and not args.ca_file.is_file():
        raise UsageError(f"--ca-file {args.ca_file} not found")
    if args.hardware_id_prefix is not None:
        sample = hostinfo.simulated_hardware_id(0, args.hardware_id_prefix)
        if len(sample) > 128 or not sample.isprintable() or any(c in sample for c in "+#/"):
            raise UsageError("--hardware-id-prefix must be printable, without '+', '#' or '/'")


def _config(args: argparse.Namespace) -> FleetConfig:
    _check(args)
    return FleetConfig(
        host=args.host,
        port=args.port,
        provision_key=_provision_key(args.key, args.refresh),
        cloud_public_key=load_cloud_public_key(args.cloud_key),
        state_dir=args.state_dir,
        prefix=args.prefix,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        hardware_id_prefix=args.hardware_id_prefix,
        first_index=args.first_index,
        claim_username=args.claim_username,
        tls=args.tls,
        ca_file=args.ca_file,
        refresh=args.refresh,
        certificate=args.certificate,
        certificate_port=args.certificate_port,
        # Read once: every simulated device runs on this host, so they share its facts.
        hardware=hostinfo.hardware(),
        network=hostinfo.network(),
    )


# --- output ---------------------------------------------------------------------------------------------


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(outcomes: list[DeviceOutcome], out: TextIO) -> None:
    rows = [("device", "hardware_id", "device_id", "created", "latency ms", "status")]
    for o in outcomes:
        created = "refreshed" if o.refreshed else "-" if o.created is None else ("yes" if o.created else "no")
        rows.append((str(o.index), o.hardware_id, o.device_id or "-", created, _fmt_ms(o.latency_ms), o.status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)


# What to do about the failures an operator running the simulator is likely to meet.
HINTS = {
    "rejected: device_exists": "these hardware ids were provisioned with other keys: reuse the --state-dir "
    "of that run, or pick another --hardware-id-prefix",
    "rejected: permission_denied": "the provisioning key is wrong, revoked, expired or used up "
    "(`provbridge events` says which)",
    "claim timeout": "no answer: is `provbridge serve` running, with the same --prefix?",
    "rejected: validation_error (csr)": "the provisioning key issues certificates and --certificate was not "
    "given, or it issues tokens and --certificate was given",
}


def print_summary(summary: Summary, outcomes: list[DeviceOutcome], out: TextIO) -> None:
    latency = (
        "no latency (no device got an answer)"
        if summary.p50_ms is None
        else f"claim latency p50 {_fmt_ms(summary.p50_ms)} ms, p95 {_fmt_ms(summary.p95_ms)} ms, "
        f"max {_fmt_ms(summary.max_ms)} ms"
    )
    print(
        f"{summary.succeeded}/{summary.devices} devices ok ({summary.created} created), "
        f"{summary.failed} failed in {summary.elapsed_s:.2f}s; {latency}",
        file=out,
    )
    for status, count in summary.failures.items():
        example = next(o for o in outcomes if not o.ok and o.status == status)
        print(f"  {count} x {status}: e.g. {example.hardware_id}: {example.error}", file=out)
        if status in HINTS:
            print(f"    hint: {HINTS[status]}", file=out)


class Progress:
    """One line on stderr: rewritten in place on a terminal, every ~10% otherwise (CI logs)."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out = total, out
        self.done = self.failed = 0
        self.tty = out.isatty()
        self.step = max(1, total // 10)

    def __call__(self, outcome: DeviceOutcome) -> None:
        self.done += 1
        self.failed += not outcome.ok
        line = f"provisioned {self.done}/{self.total} (ok {self.done - self.failed}, failed {self.failed})"
        if self.tty:
            print(f"\r{line}", end="\n" if self.done == self.total else "", file=self.out, flush=True)
        elif self.done % self.step == 0 or self.done == self.total:
            print(line, file=self.out, flush=True)


# --- entry point ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Quietly: with stdout on /dev/null, Python's last flush at exit has no dead pipe to warn about.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_READER_GONE
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except UsageError as exc:
        print(f"provbridge-sim: {exc}", file=sys.stderr)
        return EXIT_USAGE

    show_table = args.devices <= TABLE_MAX_DEVICES and not args.json
    progress = None if show_table or (args.json and not sys.stderr.isatty()) else Progress(args.devices, sys.stderr)
    started = time.monotonic()
    try:
        outcomes = run_fleet(config, args.devices, args.concurrency, on_done=progress)
    except KeyboardInterrupt:
        print("\nprovbridge-sim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary = summarise(outcomes, time.monotonic() - started)

    if args.json:
        doc = summary.as_dict() | {"results": [o.as_dict() for o in outcomes]}
        print(json.dumps(doc, indent=2))
    else:
        if show_table:
            print_table(outcomes, sys.stdout)
            print(file=sys.stdout)
        print_summary(summary, outcomes, sys.stdout)
    return EXIT_OK if summary.all_ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
