"""`python -m device_sim.demo --devices 100`: a whole provisioning run on a throwaway bridge.

It uses the bridge only the way an operator does, through the `provbridge` command in subprocesses
(never by importing it): `provbridge init --json` in a temporary data dir, `provbridge serve` on a
free loopback port, then the simulator with the key `init` printed, then SIGINT to the bridge.
Exit status 0 only if every device was provisioned and connected with its token.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_sim import cli
from device_sim.device import DEFAULT_TIMEOUT_S
from device_sim.errors import ConnectError, DemoError
from device_sim.session import Session
from provwire import topics

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def log(message: str) -> None:
    # Demo narration goes to stderr, so that `--json` leaves only the summary on stdout.
    print(f"demo: {message}", file=sys.stderr, flush=True)


def provbridge_command() -> list[str]:
    """The admin CLI: next to this interpreter (a venv), else on PATH, else through the interpreter."""
    beside = Path(sys.executable).with_name("provbridge")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("provbridge")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from bridge.cli.main import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def init_data_dir(command: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run `provbridge init --json`; return the provisioning key it printed (never shown here)."""
    done = subprocess.run([*command, "init", "--json"], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoError(f"`provbridge init` failed ({done.returncode}): {reason}")
    try:
        doc = json.loads(done.stdout)
        key, tenant = doc["provision_key"], doc.get("tenant", "?")
    except (ValueError, KeyError, TypeError) as exc:
        raise DemoError("`provbridge init --json` printed no provision_key") from exc
    if not isinstance(key, str) or not key:
        raise DemoError("`provbridge init --json` printed an empty provision_key")
    log(f"initialised {cwd} (tenant {tenant})")
    return key


def wait_for_port(port: int, serve: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise DemoError(f"`provbridge serve` exited with {serve.returncode} during startup")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"nothing accepted connections on {HOST}:{port} within {STARTUP_TIMEOUT_S:.0f}s")


def wait_for_bridge(port: int, serve: subprocess.Popen[bytes], deadline: float) -> None:
    """Wait until the bridge answers claims, not just until the broker listens.

    The probe is an empty JSON object on a claim topic: the bridge answers it `validation_error`
    without creating anything and without a provisioning key being sent or spent. (The retained
    status topic would do too, but anonymous clients may not subscribe to it.)
    """
    client_id = f"demo-probe-{secrets.token_hex(4)}"
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise DemoError(f"`provbridge serve` exited with {serve.returncode} during startup")
        session = Session(client_id)
        try:
            step = min(deadline, time.monotonic() + 2.0)
            session.connect(HOST, port, step)
            session.subscribe(topics.response_topic(topics.DEFAULT_PREFIX, client_id), step)
            session.publish(topics.claim_topic(topics.DEFAULT_PREFIX, client_id), b"{}")
            if _answered(session, topics.response_topic(topics.DEFAULT_PREFIX, client_id), step):
                return
        except ConnectError:
            time.sleep(0.2)  # broker still starting, or the bridge not subscribed yet
        finally:
            session.close()
    raise DemoError(f"the bridge did not answer a probe claim within {STARTUP_TIMEOUT_S:.0f}s")


def _answered(session: Session, response_topic: str, deadline: float) -> bool:
    while (message := session.next_message(deadline)) is not None:
        topic, payload = message
        try:
            doc = json.loads(payload)
        except ValueError:
            continue
        if topic == response_topic and isinstance(doc, dict) and doc.get("status") == "error":
            return True
    return False


def stop(serve: subprocess.Popen[bytes]) -> None:
    """SIGINT first (the bridge's clean shutdown: status offline, broker closed), then harder."""
    if serve.poll() is not None:
        return
    serve.send_signal(signal.SIGINT)
    try:
        serve.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log(f"bridge ignored SIGINT for {STOP_TIMEOUT_S:.0f}s; terminating it")
        serve.terminate()
        try:
            serve.wait(5)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m device_sim.demo",
        description="Start a throwaway bridge (provbridge init + serve in a temp dir, on a free port), "
        "provision N simulated devices against it, print the summary, stop the bridge. "
        "Exit status 0 only if every device was provisioned and connected with its token.",
    )
    parser.add_argument("--devices", type=int, default=100, metavar="N", help="devices (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, metavar="C", help="in flight (default: %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="per answer (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="JSON summary on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs) afterwards")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.devices < 1 or args.concurrency < 1:
        print("demo: --devices and --concurrency must be at least 1", file=sys.stderr)
        return cli.EXIT_USAGE
    workdir = Path(tempfile.mkdtemp(prefix="provbridge-demo-"))
    port = free_port()
    # Only these two settings are the demo's; the rest are the bridge's defaults. The subprocesses run
    # in the temp dir, so a config/provbridge.toml of the current directory does not leak in.
    env = {**os.environ, "PROVBRIDGE_DATA_DIR": str(workdir), "PROVBRIDGE_BROKER__PORT": str(port)}
    env.pop(cli.KEY_ENV, None)
    command = provbridge_command()
    serve_log = workdir / "serve.log"
    serve: subprocess.Popen[bytes] | None = None
    code = cli.EXIT_FAILED
    try:
        key = init_data_dir(command, env, workdir)
        with serve_log.open("wb") as log_file:
            # Own session: a Ctrl-C in the terminal reaches the demo, which then stops the bridge in order.
            serve = subprocess.Popen(
                [*command, "serve"],
                env=env,
                cwd=workdir,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = time.monotonic()
        deadline = started + STARTUP_TIMEOUT_S
        wait_for_port(port, serve, deadline)
        wait_for_bridge(port, serve, deadline)
        ready_s = time.monotonic() - started
        log(f"bridge ready on {HOST}:{port} after {ready_s:.1f}s; provisioning {args.devices} devices")
        sim_args = ["--host", HOST, "--port", str(port), "--key", key]
        sim_args += [
            "--cloud-key",
            str(workdir / "cloud_public.pem"),
            "--state-dir",
            str(workdir / "sim-data"),
        ]
        sim_args += ["--devices", str(args.devices), "--concurrency", str(args.concurrency)]
        sim_args += ["--timeout", str(args.timeout), *(["--json"] if args.json else [])]
        code = cli.main(sim_args)
    except DemoError as exc:
        log(str(exc))
        if serve_log.exists():
            log(f"last lines of {serve_log}:\n{tail(serve_log)}")
    except KeyboardInterrupt:
        log("interrupted")
        code = cli.EXIT_INTERRUPTED
    finally:
        if serve is not None:
            stop(serve)
            log(f"bridge stopped (exit status {serve.returncode})")
        if args.keep or code != cli.EXIT_OK:
            log(f"kept {workdir} (serve.log, data, sim-data)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
