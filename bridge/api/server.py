"""Running the admin API: uvicorn in a process of its own, off the claim path.

`provbridge api` runs it in the foreground; `provbridge serve` starts it as a child process (`ApiProcess`,
`api.enabled`), which dies with `serve` however `serve` ends (bridge/edges/lifeline.py).
"""

import logging
import os
import pickle
import subprocess
import sys

import uvicorn

from bridge import logs
from bridge.api.app import create_app
from bridge.config import Settings
from bridge.edges import lifeline
from bridge.errors import ConfigError
from bridge.tls.certificates import TlsFiles

log = logging.getLogger("provbridge.api")
STOP_GRACE_SECONDS = 5.0


def server_config(settings: Settings) -> uvicorn.Config:
    api = settings.api
    tls: dict[str, str] = {}
    if api.tls:
        files = TlsFiles.of(settings.data_dir)
        if not (files.server_cert.is_file() and files.server_key.is_file()):
            raise ConfigError("api.tls needs the broker's server certificate: run `provbridge tls init` first")
        tls = {"ssl_certfile": str(files.server_cert), "ssl_keyfile": str(files.server_key)}
    return uvicorn.Config(
        create_app(settings),
        host=api.host,
        port=api.port,
        log_level="warning",
        access_log=False,  # request lines carry no secret, but nobody asked for them on the bridge's log
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=2,  # open event streams (the dashboard's) never end by themselves
        **tls,  # type: ignore[arg-type]
    )


def run_api(settings: Settings) -> None:
    """Serve until interrupted (the foreground `provbridge api`)."""
    log.info("admin API on %s://%s:%d", "https" if settings.api.tls else "http", settings.api.host, settings.api.port)
    uvicorn.Server(server_config(settings)).run()


class ApiProcess:
    """The API as a child of `serve`. Start it from a thread that lives as long as `serve` (its main thread)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bridge.api.server", str(os.getpid())],
            stdin=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches serve, which stops it
        )
        assert self._process.stdin is not None
        self._process.stdin.write(pickle.dumps(self.settings))  # not re-read from the environment there
        self._process.stdin.close()
        api = self.settings.api
        log.info("admin API starting on %s:%d (pid %d)", api.host, api.port, self._process.pid)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str]) -> int:
    lifeline.die_with_parent(int(argv[0]))
    settings: Settings = pickle.loads(sys.stdin.buffer.read())  # from our parent, over a pipe
    logs.configure(settings.log_level, settings.log_format)
    try:
        run_api(settings)
    except ConfigError as exc:
        log.error("admin API not started: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
