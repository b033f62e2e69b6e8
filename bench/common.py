"""Helpers shared by the harness, the load generator and the null responder.

Nothing here imports the bridge: the load generator and the echo process must measure provbridge
from the outside, as a device fleet would see it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- numbers -------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_s: Iterable[float]) -> dict[str, float | int | None]:
    """p50/p90/p95/p99/max/mean in milliseconds, and the count."""
    values = sorted(latencies_s)

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000.0, 3)

    return {
        "count": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p90_ms": ms(percentile(values, 90)),
        "p95_ms": ms(percentile(values, 95)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(values[-1] if values else None),
        "mean_ms": ms(sum(values) / len(values) if values else None),
    }


# --- /proc ---------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its closing one.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a supervisor such as `serve --processes N` has children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))  # field 4: ppid
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process tree: utime + stime of `pid` and every live descendant, plus the
    cutime + cstime they hold for descendants already reaped (so a child exiting mid-phase still counts).
    """
    total = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is not None:  # fields 14-17 of proc(5): utime, stime, cutime, cstime
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def status_kb(pid: int, name: str) -> int | None:
    """A `kB` line of /proc/<pid>/status (VmHWM, VmRSS), or None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def tree_kb(pid: int, name: str) -> int | None:
    """A `kB` line of /proc/<pid>/status summed over the process tree (VmHWM: the sum of each one's peak)."""
    values = [status_kb(member, name) for member in process_tree(pid)]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` value 5), so a phase's peak is its own.

    Needs to own the process or be root; when it is refused, VmHWM stays the lifetime peak and the
    results say so.
    """
    try:
        for member in process_tree(pid):
            Path(f"/proc/{member}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """VmRSS of some processes every `interval` seconds on a background thread (bounded by stop())."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.5) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int]]] = {role: [] for role in pids}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            now = round(time.monotonic() - self._t0, 2)
            for role, pid in self.pids.items():
                rss = tree_kb(pid, "VmRSS")
                if rss is not None:
                    self.samples[role].append((now, rss))
            if self._stop.wait(self.interval):
                return


# --- the machine ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit, "dirty": dirty}


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


# --- network -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.1)
    return False


def set_nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    # Without it, small request/answer exchanges stall 40 ms on Nagle + delayed ACK.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def probe_answers(
    host: str,
    port: int,
    prefix: str,
    timeout: float,
    username: str | None = None,
    alive: Callable[[], bool] = lambda: True,
) -> bool:
    """Whether something answers claims: publish a small invalid claim until any answer comes back.

    Works for the bridge (a validation_error answer naming the request_id) and for the echo
    responder alike, on any broker, without needing an extra account. Bounded by `timeout`.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client_id = f"bench-probe-{os.getpid()}"
    got = threading.Event()
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if username:
        client.username_pw_set(username)
    client.on_socket_open = set_nodelay
    client.on_connect = lambda c, _u, _f, rc, _p: (
        None if rc.is_failure else c.subscribe(f"{prefix}/res/{client_id}", qos=1)
    )
    client.on_subscribe = lambda _c, _u, _m, _rc, _p: subscribed.set()
    client.on_message = lambda _c, _u, _m: got.set()
    deadline = time.monotonic() + timeout
    while True:  # the server may still be starting: its port opens when it is ready to listen
        try:
            client.connect(host, port, keepalive=30)
            break
        except OSError:
            if time.monotonic() > deadline or not alive():
                return False
            time.sleep(0.1)
    client.loop_start()
    try:
        if not subscribed.wait(max(0.0, deadline - time.monotonic())):
            return False
        payload = json.dumps({"request_id": "probe-000001"}).encode()
        while time.monotonic() < deadline and alive():
            client.publish(f"{prefix}/claim/{client_id}", payload, qos=1)
            if got.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                return True
        return False
    finally:
        client.disconnect()
        client.loop_stop()


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Proc:
    role: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Every process the harness starts, so each one is stopped on success, failure and Ctrl-C.

    Each child gets its own session (process group), so a Ctrl-C in the terminal reaches only the
    harness, which then stops its children in order: SIGTERM (they shut down cleanly), SIGKILL after
    a grace period. Only processes started here are ever signalled, by their pid.
    """

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def start(
        self, role: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path = REPO
    ) -> Proc:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        full_env = {**os.environ, **(env or {})}
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(role, popen, log_path, log)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 10.0) -> int | None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait(5)
        if proc._log is not None:
            proc._log.close()
            proc._log = None
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_all()


def install_signal_exit() -> None:
    """SIGTERM -> SystemExit and SIGINT -> KeyboardInterrupt, so `finally` blocks stop every child.

    SIGINT is set explicitly: a shell starts background jobs with it ignored, and Python then keeps
    ignoring it.
    """

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def venv_bin(name: str) -> str:
    """A console script of the interpreter's environment (the project venv when run through make)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
