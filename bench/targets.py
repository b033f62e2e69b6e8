"""Brokers as pluggable benchmark targets. Each starts two systems on a free loopback port:

    provbridge   what a deployment runs (the bridge, and its broker)
    echo         the same broker with the null responder (bench/echo.py) in the bridge's place: the floor

and names the processes to measure (CPU seconds, peak RSS). A target that cannot run here says why
in `unavailable()`, and the harness skips it with that message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO, Proc, Processes, free_port, probe_answers, venv_bin, wait_port

READY_TIMEOUT_S = 30.0


@dataclass
class DataDir:
    """An initialised provbridge data dir with an unlimited provisioning key for the run."""

    path: Path
    provision_key: str = field(repr=False)
    credential: str = "token"  # what the key issues: "token" or "certificate" (the load generator sends CSRs)
    admin_token: str = field(default="", repr=False)  # read scope: the admin API poller's (bench/apipoll.py)

    @property
    def cloud_key(self) -> Path:
        return self.path / "cloud_public.pem"

    @property
    def database(self) -> Path:
        return self.path / "provbridge.db"


@dataclass
class System:
    kind: str  # "provbridge" or "echo"
    port: int
    processes: dict[str, Proc]  # role -> process, the ones whose CPU and RSS are measured
    data_dir: DataDir
    roles_note: str  # how to read the roles, for the report
    claim_username: str | None = None
    api_port: int | None = None  # the admin API `serve` started (provbridge systems)

    @property
    def pids(self) -> dict[str, int]:
        return {role: proc.pid for role, proc in self.processes.items()}

    def check_alive(self) -> None:
        for role, proc in self.processes.items():
            if not proc.alive():
                raise RuntimeError(f"{role} process exited ({proc.popen.returncode}); log tail:\n{proc.tail()}")


def _env(data_dir: DataDir, port: int, log_level: str, **extra: str) -> dict[str, str]:
    return {
        "PROVBRIDGE_DATA_DIR": str(data_dir.path),
        "PROVBRIDGE_API__PORT": str(free_port()),  # `serve` starts the admin API: never on a shared port
        "PROVBRIDGE_BROKER__HOST": "127.0.0.1",
        "PROVBRIDGE_BROKER__PORT": str(port),
        "PROVBRIDGE_LOG_LEVEL": log_level,
        # Plain MQTT only: a TLS listener would take the fixed tls_port, which parallel runs share.
        "PROVBRIDGE_BROKER__TLS_LISTEN": "off",
        # The load generator multiplexes thousands of devices over 32 client ids (real devices have
        # one each): per-client flood limits would measure the limiter, not the bridge.
        "PROVBRIDGE_CLAIMS__RATE_LIMITS": "false",
        **extra,
    }


def _wait_answering(system: System, processes: Processes) -> System:
    """Ready means a claim gets an answer end to end, not just that a port is open."""
    alive = lambda: all(proc.alive() for proc in system.processes.values())  # noqa: E731
    if not probe_answers("127.0.0.1", system.port, "prov/v1", READY_TIMEOUT_S, system.claim_username, alive):
        tails = "\n".join(f"--- {role}:\n{proc.tail()}" for role, proc in system.processes.items())
        for proc in system.processes.values():
            processes.stop(proc)
        raise RuntimeError(f"{system.kind} on port {system.port} did not answer a probe claim; logs:\n{tails}")
    return system


def _echo(processes: Processes, data_dir: DataDir, port: int, reply_bytes: int, logs: Path) -> Proc:
    argv = [sys.executable, "-m", "bench.echo", "--port", str(port), "--data-dir", str(data_dir.path)]
    argv += ["--reply-bytes", str(reply_bytes)]
    return processes.start("echo", argv, logs / "echo.log")


class Target:
    name = "target"
    description = ""
    credential = "token"  # what the run's provisioning key issues

    def unavailable(self) -> str | None:
        return None

    def start_provbridge(
        self, processes: Processes, data_dir: DataDir, logs: Path, log_level: str, bridge_env: dict[str, str]
    ) -> System:
        raise NotImplementedError

    def start_echo(self, processes: Processes, data_dir: DataDir, logs: Path, reply_bytes: int) -> System:
        raise NotImplementedError


class AmqttTarget(Target):
    """The embedded amqtt broker: `provbridge serve` is broker and bridge in one process."""

    name = "amqtt"
    description = "embedded amqtt 0.12.1 broker"

    def start_provbridge(
        self, processes: Processes, data_dir: DataDir, logs: Path, log_level: str, bridge_env: dict[str, str]
    ) -> System:
        port = free_port()
        env = {**_env(data_dir, port, log_level), **bridge_env}
        serve = processes.start("bridge+broker", [venv_bin("provbridge"), "serve"], logs / "serve.log", env)
        system = System(
            "provbridge",
            port,
            {"bridge+broker": serve},
            data_dir,
            "one process: `provbridge serve` runs the embedded broker and the bridge together",
            api_port=int(env["PROVBRIDGE_API__PORT"]),
        )
        return _wait_answering(system, processes)

    def start_echo(self, processes: Processes, data_dir: DataDir, logs: Path, reply_bytes: int) -> System:
        port = free_port()
        broker = processes.start(
            "broker", [venv_bin("provbridge"), "broker"], logs / "broker.log", _env(data_dir, port, "WARNING")
        )
        if not wait_port("127.0.0.1", port, READY_TIMEOUT_S):
            raise RuntimeError(f"`provbridge broker` did not listen on {port}:\n{broker.tail()}")
        echo = _echo(processes, data_dir, port, reply_bytes, logs)
        system = System(
            "echo",
            port,
            {"broker": broker, "echo": echo},
            data_dir,
            "`provbridge broker` (the same amqtt broker, standalone) + bench/echo.py",
        )
        return _wait_answering(system, processes)


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def _has_subcommand(name: str) -> bool:
    out = subprocess.run(
        [venv_bin("provbridge"), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    return name in out.stdout


class MosquittoTarget(Target):
    """Mosquitto configured by `provbridge mosquitto-config`, the bridge in external-broker mode."""

    name = "mosquitto"
    description = "Mosquitto, configured by `provbridge mosquitto-config`"

    def unavailable(self) -> str | None:
        if _mosquitto_binary() is None:
            return "the mosquitto binary is not installed (`make mosquitto` installs it)"
        if not _has_subcommand("mosquitto-config"):
            return "`provbridge mosquitto-config` does not exist yet in this tree (being added in parallel)"
        return None

    def _start_mosquitto(
        self, processes: Processes, data_dir: DataDir, logs: Path, port: int, bridge_env: dict[str, str] | None = None
    ) -> Proc:
        conf_dir = data_dir.path.parent / f"mosquitto-{port}"
        env = {**_env(data_dir, port, "WARNING"), **(bridge_env or {})}  # the config follows the bridge's settings
        out = subprocess.run(
            [venv_bin("provbridge"), "mosquitto-config", str(conf_dir)],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"provbridge mosquitto-config failed: {out.stderr.strip() or out.stdout.strip()}")
        binary = _mosquitto_binary()
        assert binary is not None
        broker = processes.start("broker", [binary, "-c", str(conf_dir / "mosquitto.conf")], logs / "mosquitto.log")
        if not wait_port("127.0.0.1", port, READY_TIMEOUT_S):
            raise RuntimeError(f"mosquitto did not listen on {port}:\n{broker.tail()}")
        return broker

    def start_provbridge(
        self, processes: Processes, data_dir: DataDir, logs: Path, log_level: str, bridge_env: dict[str, str]
    ) -> System:
        port = free_port()
        broker = self._start_mosquitto(processes, data_dir, logs, port, bridge_env)
        env = {**_env(data_dir, port, log_level, PROVBRIDGE_BROKER__MODE="external"), **bridge_env}
        bridge = processes.start("bridge", [venv_bin("provbridge"), "serve"], logs / "serve.log", env)
        system = System(
            "provbridge",
            port,
            {"broker": broker, "bridge": bridge},
            data_dir,
            "two processes: mosquitto, and `provbridge serve` with broker.mode=external",
            api_port=int(env["PROVBRIDGE_API__PORT"]),
        )
        return _wait_answering(system, processes)

    def start_echo(self, processes: Processes, data_dir: DataDir, logs: Path, reply_bytes: int) -> System:
        port = free_port()
        broker = self._start_mosquitto(processes, data_dir, logs, port)
        echo = _echo(processes, data_dir, port, reply_bytes, logs)
        system = System("echo", port, {"broker": broker, "echo": echo}, data_dir, "mosquitto + bench/echo.py")
        return _wait_answering(system, processes)


class MosquittoCertificateTarget(MosquittoTarget):
    """The Mosquitto target with a key of the certificate credential type: each claim carries a CSR and is
    answered with a signed X.509 certificate instead of a token (PROTOCOL.md section 10.4)."""

    name = "mosquitto-cert"
    description = "Mosquitto, certificate credentials (a CSR in every claim, a certificate in every answer)"
    credential = "certificate"


TARGETS: dict[str, Target] = {t.name: t for t in (AmqttTarget(), MosquittoTarget(), MosquittoCertificateTarget())}
