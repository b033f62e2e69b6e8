"""`provbridge serve [--processes N]` as a real subprocess, and whether a process is alive."""

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from bridge.config import Settings
from tests.helpers.cli import config_toml
from tests.helpers.waiting import wait_for

SERVING = "bridge serving claims"
STARTED_RE = re.compile(r"started bridge process (\d+) of \d+ \(pid (\d+)\)")
WORKER_RE = re.compile(r"claim worker running \(pid (\d+)\)")


def terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to `process` (ours, by its own handle); SIGKILL if it is still there after `grace` seconds."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _gone(pid: int) -> bool:
    return not alive(pid)


class ServeProcesses:
    """`provbridge serve --processes COUNT` as a subprocess, with `env` added to the environment: started,
    killed with SIGKILL, restarted. Every pid it reported (claim workers, bridge processes) is gone after `stop`.
    """

    def __init__(self, settings: Settings, count: int = 1, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.count = count
        self.env = {**os.environ, **(env or {})}
        self.log_file = settings.data_dir.parent / "serve.log"
        self.config_file = settings.data_dir.parent / "serve.toml"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it; return once each of its COUNT bridge processes serves claims."""
        config = self.config_file
        config.write_text(config_toml(self.settings))
        before = self.log().count(SERVING)
        argv = [
            sys.executable,
            "-m",
            "bridge.cli.main",
            "--config",
            str(config),
            "--data-dir",
            str(self.settings.data_dir),
        ]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [*argv, "serve", "--processes", str(self.count)], stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        assert wait_for(lambda: self.log().count(SERVING) >= before + self.count, timeout=60), self.log()[-3000:]

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)  # our own child, by its pid
        self.process.wait(30)
        self.process = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def children(self) -> dict[int, int]:
        """Bridge process index -> pid of its latest start."""
        return {int(index): int(pid) for index, pid in STARTED_RE.findall(self.log())}

    def answered_by(self) -> set[int]:
        """The indexes of the bridge processes that answered a claim."""
        return {int(index) for index in re.findall(r"provbridge\.service#(\d+)(?: \[[^]]*\])?: claim on ", self.log())}

    def reported_pids(self) -> set[int]:
        """Every claim worker and bridge process it reported starting."""
        text = self.log()
        return {int(p) for p in WORKER_RE.findall(text)} | {int(pid) for _, pid in STARTED_RE.findall(text)}

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, 60)  # the supervisor: it stops its processes
            self.process = None
        for pid in self.reported_pids():
            if not wait_for(functools.partial(_gone, pid), timeout=30):
                os.kill(pid, signal.SIGKILL)  # only a pid our bridge reported starting
        assert not any(alive(pid) for pid in self.reported_pids())

    def __enter__(self) -> "ServeProcesses":
        try:
            self.start()
        except BaseException:
            self.stop()  # whatever it started before it failed
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def group_alive(group: int) -> bool:
    """Whether a process of process group `group` runs (zombies, which nobody may reap here, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the session `process` leads (it was started with start_new_session), then reap it and wait until
    no process of the group is left: a server's stragglers would hold its ports or shared memory."""
    group = process.pid
    if process.poll() is None or group_alive(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # the session we started it in; its processes only
    process.wait(10)
    assert wait_for(lambda: not group_alive(group), timeout=10), f"processes of group {group} survived SIGKILL"
