"""The one RabbitMQ launcher: a throwaway cluster of `nodes` RabbitMQ nodes on 127.0.0.1, in a temp dir of its own,
with the MQTT plugin (MQTT 3.1.1) and, given a signing key, the OAuth 2 backend verifying ES256 JWTs (issue 13).

Everything is local to the cluster: each node's data, logs, config and enabled-plugins file; one Erlang cookie (a
HOME of the cluster's own); an epmd of its own on a free port (no system epmd is started or used); each node's
Erlang distribution on a free port of 127.0.0.1. Every process is our own child, in a session of its own, stopped
and reaped by us (a container's init may never reap an orphan).

Node `i` (0-based) is `rabbit-<i+1>@localhost`. MQTT clients authenticate with a JWT as the password (any user
name); its `scope` claim gives the permissions, each scope prefixed with `resource_server_id` (not `rabbitmq.`
unless that is the id): `provbridge.write:*/*/devices.dev1.*`, `provbridge.read:*/*/devices.dev1.*`,
`provbridge.configure:*/*/*` (vhost/resource/routing key patterns, MQTT's `/` being `.` in routing keys).
The internal backend holds one admin user (`admin_user`/`admin_password`), for AMQP or the
management API; the CLI (`ctl`) needs none.

RabbitMQ tests are skipped only when the server is missing and CI is not set; under CI (where `make rabbitmq`,
bridge/rabbitmq/install-rabbitmq.sh, is to install it) a missing RabbitMQ fails them.
"""

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers.network import accepts_connections, free_ports
from tests.helpers.processes import kill_group
from tests.helpers.waiting import wait_for

# Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user; these scripts run as whoever starts them.
BINDIR = Path("/usr/lib/rabbitmq/bin")
EPMD_CANDIDATES = ("/usr/bin/epmd", "/usr/lib/erlang/bin/epmd")
RESOURCE_SERVER_ID = "provbridge"
KEY_ID = "provbridge"
LOOPBACK_ERL = "{127,0,0,1}"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


def epmd_binary() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    return next((path for path in EPMD_CANDIDATES if os.access(path, os.X_OK)), None)


def rabbitmq_available() -> bool:
    return all(os.access(BINDIR / name, os.X_OK) for name in ("rabbitmq-server", "rabbitmqctl")) and bool(epmd_binary())


def require_rabbitmq() -> None:
    if rabbitmq_available():
        return
    problem = f"RabbitMQ is not installed ({BINDIR}/rabbitmq-server, epmd)"
    if os.environ.get("CI"):
        pytest.fail(f"{problem} but CI is set: `make test` (make rabbitmq) installs it")
    pytest.skip(f"{problem} (`make rabbitmq`); under CI this fails instead")


class RabbitCluster:
    """`nodes` clustered RabbitMQ nodes on 127.0.0.1; node `i`'s MQTT port is `mqtt_ports[i]`. Data, cookie and
    config live in a temp dir of its own (removed by `stop`); the logs in `<root>/rabbit-<n>/log/` (kept).

    With `signing_key_pem` (a public key's PEM file), MQTT logins are JWTs signed by its private key (ES256, `aud`
    `resource_server_id`, header `kid` = `key_id`), checked by the OAuth 2 backend. Without it, only the internal
    backend (the admin user) is there. `management=True` adds the management plugin (`management_ports`)."""

    def __init__(
        self,
        root: Path,
        nodes: int = 3,
        signing_key_pem: Path | None = None,
        *,
        key_id: str = KEY_ID,
        resource_server_id: str = RESOURCE_SERVER_ID,
        management: bool = False,
        provbridge_conf: str | None = None,
    ) -> None:
        require_rabbitmq()
        assert nodes >= 1
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.count = nodes
        self.signing_key_pem = signing_key_pem
        self.key_id = key_id
        self.resource_server_id = resource_server_id
        self.management = management
        self.provbridge_conf = provbridge_conf
        self.enabled_plugins: str | None = None  # an enabled_plugins file's content, instead of the list below
        self.names = [f"rabbit-{i + 1}@localhost" for i in range(nodes)]
        ports = free_ports(4 * nodes + 1)
        self.epmd_port = ports[0]
        self.amqp_ports = ports[1 : 1 + nodes]
        self.mqtt_ports = ports[1 + nodes : 1 + 2 * nodes]
        self.dist_ports = ports[1 + 2 * nodes : 1 + 3 * nodes]
        self.management_ports = ports[1 + 3 * nodes : 1 + 4 * nodes] if management else []
        self.admin_user = "provbridge-admin"
        self.admin_password = secrets.token_urlsafe(24)
        self.dir: Path | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * nodes

    # --- the cluster ---

    def start(self) -> None:
        """Start every node; return once all accept MQTT and AMQP connections. The first node boots alone, the
        others then in parallel, joining it (classic_config peer discovery): no race over who forms the cluster."""
        try:
            if self.dir is None:
                self._prepare()
            self._start_epmd()
            self._spawn(0)
            self._await(0)
            for i in range(1, self.count):
                self._spawn(i)
            for i in range(1, self.count):
                self._await(i)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node (SIGTERM, a clean shutdown; SIGKILL if it hangs), then our epmd; the temp dir goes.
        Always safe to call."""
        try:
            for i in reversed(range(self.count)):
                self._shutdown(i)
            self._stop_epmd()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def stop_node(self, i: int) -> None:
        """A clean shutdown of node `i` alone; the others go on, it stays a cluster member (`start_node` rejoins)."""
        self._shutdown(i)

    def kill_node(self, i: int) -> None:
        """SIGKILL for node `i`'s processes, as in a crash."""
        self._kill_group(i)

    def start_node(self, i: int) -> None:
        """Start node `i` again (after `stop_node` or `kill_node`), on its old ports and data."""
        assert self.dir is not None, "start the cluster first"
        self._spawn(i)
        self._await(i)

    def running(self, i: int) -> bool:
        process = self.processes[i]
        return process is not None and process.poll() is None

    def __enter__(self) -> "RabbitCluster":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- the CLI ---

    def ctl(self, i: int, *args: str, timeout: float = 60.0, check: bool = True) -> "subprocess.CompletedProcess[str]":
        """`rabbitmqctl -n <node i> ARGS` (also through a node that is down, for `forget_cluster_node` say)."""
        return self.tool("rabbitmqctl", i, *args, timeout=timeout, check=check)

    def tool(
        self, program: str, i: int, *args: str, timeout: float = 60.0, check: bool = True
    ) -> "subprocess.CompletedProcess[str]":
        """Any of RabbitMQ's CLI tools (rabbitmqctl, rabbitmq-diagnostics, rabbitmq-plugins...) against node `i`."""
        assert self.dir is not None, "start the cluster first"
        env = self._env(i)
        # The CLI is an Erlang node too: hidden, its distribution on loopback, on a free port of its own (the
        # default is a range of 10 shared by every CLI call of the machine).
        [ctl_port] = free_ports(1, taken=(self.epmd_port, *self.dist_ports))
        env["RABBITMQ_CTL_DIST_PORT_MIN"] = env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(ctl_port)
        env["RABBITMQ_CTL_ERL_ARGS"] = f"-start_epmd false -kernel inet_dist_use_interface {LOOPBACK_ERL}"
        done = subprocess.run(
            [str(BINDIR / program), "-n", self.names[i], *args],
            env=env,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{program} {' '.join(args)} failed with {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    def cluster_members(self, i: int = 0) -> tuple[set[str], set[str]]:
        """(the disc nodes of the cluster, the running ones), as node `i` sees them."""
        import json

        status = json.loads(self.ctl(i, "cluster_status", "--formatter", "json").stdout)
        return set(status.get("disk_nodes", [])) | set(status.get("ram_nodes", [])), set(status["running_nodes"])

    def log(self, i: int) -> str:
        path = self._log_dir(i) / f"{self.names[i]}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- setup ---

    def _node_dir(self, i: int) -> Path:
        assert self.dir is not None
        return self.dir / f"rabbit-{i + 1}"

    def _log_dir(self, i: int) -> Path:
        return self.root / f"rabbit-{i + 1}" / "log"

    def _prepare(self) -> None:
        # Not under the test's tmp dir: short paths (Erlang's unix sockets, inet_gethost) and nothing kept.
        self.dir = Path(tempfile.mkdtemp(prefix="provbridge-rabbit-"))
        home = self.dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)  # Erlang refuses a cookie others may read
        (self.dir / "rabbitmq-env.conf").write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf
        plugins = ["rabbitmq_mqtt"]
        if self.signing_key_pem is not None or self.provbridge_conf is not None:
            plugins.append("rabbitmq_auth_backend_oauth2")
        if self.management:
            plugins.append("rabbitmq_management")
        for i in range(self.count):
            node = self._node_dir(i)
            (node / "mnesia").mkdir(parents=True)
            self._log_dir(i).mkdir(parents=True, exist_ok=True)
            (node / "enabled_plugins").write_text(self.enabled_plugins or f"[{','.join(plugins)}].\n")
            (node / "rabbitmq.conf").write_text(self._config(i))

    def _config(self, i: int) -> str:
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_ports[i]}",
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.mqtt_ports[i]}",
            "mqtt.allow_anonymous = false",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            f"default_user = {self.admin_user}",
            f"default_pass = {self.admin_password}",
            "default_user_tags.administrator = true",
            "loopback_users = none",
            "auth_backends.1 = internal",
            "cluster_formation.peer_discovery_backend = classic_config",
            *(f"cluster_formation.classic_config.nodes.{n + 1} = {name}" for n, name in enumerate(self.names)),
            "cluster_name = provbridge-test",
            "disk_free_limit.absolute = 10MB",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.signing_key_pem is not None:
            lines[lines.index("auth_backends.1 = internal")] = "auth_backends.1 = rabbit_auth_backend_oauth2"
            lines += [
                "auth_backends.2 = internal",
                f"auth_oauth2.resource_server_id = {self.resource_server_id}",
                f"auth_oauth2.signing_keys.{self.key_id} = {self.signing_key_pem.resolve()}",
                "auth_oauth2.algorithms.1 = ES256",
            ]
        if self.provbridge_conf is not None:  # its own users, MQTT and auth settings, definitions
            mine = ("mqtt.", "default_user", "default_pass", "auth_backends.", "loopback_users")
            lines = [line for line in lines if not line.startswith(mine) or line.startswith("mqtt.listeners.")]
            lines.append(self.provbridge_conf)
        if self.management:
            lines += ["management.tcp.ip = 127.0.0.1", f"management.tcp.port = {self.management_ports[i]}"]
        return "\n".join(lines) + "\n"

    def _env(self, i: int) -> dict[str, str]:
        assert self.dir is not None
        node = self._node_dir(i)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_")) and key not in {"HOME", "NOTIFY_SOCKET"}
        }
        env.update(
            HOME=str(self.dir / "home"),  # the cookie, shared by the nodes and the CLI
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.names[i],
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_MNESIA_BASE=str(node / "mnesia"),
            RABBITMQ_LOG_BASE=str(self._log_dir(i)),
            RABBITMQ_CONFIG_FILE=str(node / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node / "enabled_plugins"),
            RABBITMQ_DIST_PORT=str(self.dist_ports[i]),
            RABBITMQ_SCHEDULER_BUSY_WAIT_THRESHOLD="none",  # three nodes on a small machine: no spinning
        )
        return env

    # --- the processes ---

    def _start_epmd(self) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            return
        binary = epmd_binary()
        assert binary is not None and self.dir is not None
        with open(self.root / "epmd.log", "ab") as log:
            self.epmd = subprocess.Popen(
                [binary, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                start_new_session=True,
            )
        if not wait_for(lambda: accepts_connections(self.epmd_port), timeout=10):
            raise AssertionError(f"epmd did not start on {self.epmd_port}")

    def _stop_epmd(self) -> None:
        if self.epmd is None:
            return
        _kill_session(self.epmd, signal.SIGTERM, 5)
        self.epmd = None

    def _spawn(self, i: int) -> None:
        assert self.dir is not None and self.processes[i] is None
        env = self._env(i)
        # Distribution on loopback only; no epmd of Erlang's own (ours runs).
        env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = f"-start_epmd false -kernel inet_dist_use_interface {LOOPBACK_ERL}"
        with open(self._log_dir(i) / "stdout.log", "ab") as log:
            # The script stays as the VM's parent and turns our SIGTERM into a clean shutdown; its own session, so
            # that a kill reaches the VM and its helpers (erl_child_setup, inet_gethost) and a ^C to pytest does not.
            self.processes[i] = subprocess.Popen(
                [str(BINDIR / "rabbitmq-server")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                start_new_session=True,
            )

    def _await(self, i: int) -> None:
        def ready() -> bool:
            process = self.processes[i]
            assert process is not None
            if process.poll() is not None:
                raise AssertionError(f"{self.names[i]} exited with {process.returncode}:\n{self._tail(i)}")
            ports = [self.amqp_ports[i], self.mqtt_ports[i]]
            if self.management:
                ports.append(self.management_ports[i])
            return all(accepts_connections(port) for port in ports)

        if not wait_for(ready, timeout=START_TIMEOUT, interval=0.1):
            raise AssertionError(f"{self.names[i]} did not start:\n{self._tail(i)}")

    def _tail(self, i: int) -> str:
        stdout = self._log_dir(i) / "stdout.log"
        text = stdout.read_text(errors="replace") if stdout.exists() else ""
        return (text + self.log(i))[-4000:]

    def _shutdown(self, i: int) -> None:
        process = self.processes[i]
        if process is None:
            return
        _kill_session(process, signal.SIGTERM, STOP_TIMEOUT)
        self.processes[i] = None

    def _kill_group(self, i: int) -> None:
        process = self.processes[i]
        if process is None:
            return
        _kill_session(process, signal.SIGKILL, 10)
        self.processes[i] = None


def _kill_session(process: "subprocess.Popen[bytes]", first: signal.Signals, timeout: float) -> None:
    """`first` to the process, then SIGKILL to its whole session once it exits or `timeout` passes; reaped."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    kill_group(process)
