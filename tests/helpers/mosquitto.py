"""The one Mosquitto launcher: a real Mosquitto started from `provbridge mosquitto-config` output as is,
and the bridge in external mode against it; `require_plugin` for the provbridge_jwt plugin.

Mosquitto tests are skipped only when the binary (or the plugin) is missing and CI is not set; under CI
(where `make test` installs it) a missing Mosquitto fails them.
"""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.mosquitto import jwt as mosquitto_jwt
from bridge.storage import keyfiles
from bridge.storage.store import Store
from broker.errors import BrokerConfigError
from tests.helpers.bridge import Bridge, serving
from tests.helpers.cli import run_cli
from tests.helpers.network import accepts_connections, free_port
from tests.helpers.processes import terminate
from tests.helpers.waiting import wait_for

SBIN_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((path for path in SBIN_CANDIDATES if os.access(path, os.X_OK)), None)


def require_mosquitto() -> str:
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Mosquitto is not installed but CI is set: `make test` (make mosquitto) installs it")
        pytest.skip("Mosquitto is not installed (`make mosquitto`); under CI this fails instead")
    return binary


def require_plugin() -> None:
    """The provbridge_jwt plugin, built if need be (skipped when it cannot be, except under CI)."""
    try:
        mosquitto_jwt.find_or_build_plugin()
    except BrokerConfigError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the provbridge_jwt plugin cannot be built but CI is set: {exc}")
        pytest.skip(f"the provbridge_jwt plugin cannot be built here: {exc}")


def external_settings(settings: Settings, **broker: object) -> Settings:
    """`settings` pointed at an external Mosquitto on its free port, with a fast janitor."""
    update: dict[str, object] = {
        "mode": "external",
        "dynsec": True,
        "tls_port": free_port(),
        "tls_listen": "off",
        "dynsec_janitor_seconds": 0.5,
        **broker,
    }
    settings = settings.model_copy(update={"broker": settings.broker.model_copy(update=update)})
    if settings.broker.mosquitto_auth == "jwt":  # the default: Mosquitto verifies tokens with our plugin
        require_plugin()
    return settings


# --- the provbridge_jwt plugin's sanitizer build (PROVBRIDGE_JWT_PLUGIN_SANITIZED=1: `make test-jwt-sanitized`) ---
#
# Debian's mosquitto is not built with AddressSanitizer, so the ASan runtime is preloaded into it for the
# plugin's ASan+UBSan build (bridge/mosquitto/jwt `make asan`). Reports go to files beside mosquitto.log, and
# stopping Mosquitto fails the test when there is one: the plugin was built with -fno-sanitize-recover and
# ASan halts on its first error, so a report also means Mosquitto died, which the test may not notice itself.
# LeakSanitizer is on: a leak report at exit is the plugin's (a session, key or token bucket it lost), except
# the broker-only leaks suppressed by the broker function that allocates (tests/fixtures/lsan-mosquitto.supp:
# Mosquitto 2.0.11 loses a little on a session takeover), never by module: every stack passes through
# mosquitto's own frames, the plugin's too.

SANITIZER_REPORTS = "sanitizer-report"
LSAN_SUPPRESSIONS = Path(__file__).resolve().parents[1] / "fixtures" / "lsan-mosquitto.supp"


def sanitizer_env(report_dir: Path) -> dict[str, str]:
    """What Mosquitto's environment needs for the sanitizer build of the plugin; {} when it is not wanted."""
    if not mosquitto_jwt.sanitized():
        return {}
    libasan = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.fail(f"PROVBRIDGE_JWT_PLUGIN_SANITIZED is set but gcc names no libasan.so ({libasan!r})")
    reports = report_dir / SANITIZER_REPORTS
    return {
        "LD_PRELOAD": os.path.realpath(libasan),
        "ASAN_OPTIONS": f"log_path={reports}:detect_leaks=1:halt_on_error=1:abort_on_error=0",
        "LSAN_OPTIONS": f"suppressions={LSAN_SUPPRESSIONS}:print_suppressions=0",
        "UBSAN_OPTIONS": f"log_path={reports}:halt_on_error=1:print_stacktrace=1",
    }


def fail_on_sanitizer_reports(report_dir: Path) -> None:
    """Fails the test when a sanitizer wrote a report (`<report_dir>/sanitizer-report.<pid>`)."""
    reports = sorted(report_dir.glob(f"{SANITIZER_REPORTS}.*"))
    if reports:
        text = "\n".join(f"--- {r.name}\n{r.read_text(errors='replace')}" for r in reports)
        pytest.fail(f"the sanitizers reported errors in Mosquitto with the provbridge_jwt plugin:\n{text}")


class RunningMosquitto:
    """Mosquitto from the config in `conf_dir`, listening on `port`; `start` and `stop` as often as wanted."""

    def __init__(self, binary: str, conf_dir: Path, port: int) -> None:
        self.binary = binary
        self.conf_dir = conf_dir
        self.port = port
        self.log_file = conf_dir.parent / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.conf_dir / "mosquitto.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **sanitizer_env(self.conf_dir.parent)},  # {} unless the sanitizer build
            )
        if not wait_for(self._listening, timeout=15):
            self.stop()
            raise AssertionError(f"Mosquitto did not start:\n{self.log()}")

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            fail_on_sanitizer_reports(self.conf_dir.parent)  # the cause, when a sanitizer ended it
            raise AssertionError(f"Mosquitto exited with {self.process.returncode}:\n{self.log()}")
        return accepts_connections(self.port)

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process, 10)
        self.process = None
        fail_on_sanitizer_reports(self.conf_dir.parent)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@contextmanager
def running_mosquitto(conf_dir: Path, port: int) -> Iterator[RunningMosquitto]:
    """Mosquitto started from the config already in `conf_dir`; stopped when the block ends."""
    broker = RunningMosquitto(require_mosquitto(), conf_dir, port)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def mosquitto_for(settings: Settings) -> Iterator[RunningMosquitto]:
    """`provbridge mosquitto-config` into a temp dir, then Mosquitto started from it as is."""
    require_mosquitto()
    conf_dir = settings.data_dir.parent / "mosquitto"
    assert run_cli(settings, "mosquitto-config", str(conf_dir)) == 0
    with running_mosquitto(conf_dir, settings.broker.port) as broker:
        yield broker


@dataclass
class MosquittoBridge(Bridge):
    mosquitto: RunningMosquitto


@contextmanager
def mosquitto_bridge(settings: Settings, first_key: str, **broker: object) -> Iterator[MosquittoBridge]:
    """Mosquitto from the generated config, and the bridge in external mode against it."""
    settings = external_settings(settings, **broker)
    with mosquitto_for(settings) as running, serving(settings):
        store = Store(settings.database)
        try:
            yield MosquittoBridge(settings, store, keyfiles.load_keys(settings.data_dir), first_key, running)
        finally:
            store.close()
