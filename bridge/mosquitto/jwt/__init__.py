"""The provbridge_jwt Mosquitto plugin (provbridge_jwt.c): where its `.so` is, building it when needed.

With `broker.mosquitto_auth = "jwt"`, Mosquitto verifies device tokens itself through this plugin
instead of the bridge mirroring each token into dynamic security. `provbridge mosquitto-config`
calls `find_or_build_plugin`: the `.so` built in this checkout (`build/mosquitto_jwt/`, rebuilt
when the source is newer), else one installed system-wide, else it is built here with `make`.

With PROVBRIDGE_JWT_PLUGIN_SANITIZED=1 (tests only: `make test-jwt-sanitized`) it is the build with
AddressSanitizer and UBSan (`build/mosquitto_jwt_asan/`, `make -C bridge/mosquitto/jwt asan`), which
Mosquitto can load only with libasan preloaded: tests/helpers/mosquitto.py starts it so.
"""

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from broker.errors import BrokerConfigError

SOURCE_DIR = Path(__file__).resolve().parent
SOURCE = SOURCE_DIR / "provbridge_jwt.c"
PLUGIN_NAME = "provbridge_jwt.so"
# The usernames the plugin takes for devices (bridge/claims/identifiers.py `new_device_id`); it defers all others.
DEVICE_ID_RE = re.compile(r"dev_[a-z2-7]{26}")
BUILD_OUTPUT = SOURCE_DIR.parents[2] / "build" / "mosquitto_jwt" / PLUGIN_NAME
SANITIZED_ENV = "PROVBRIDGE_JWT_PLUGIN_SANITIZED"
SANITIZED_OUTPUT = SOURCE_DIR.parents[2] / "build" / "mosquitto_jwt_asan" / PLUGIN_NAME
INSTALLED_GLOBS = (
    f"/usr/local/lib/{PLUGIN_NAME}",
    f"/usr/local/lib/*/{PLUGIN_NAME}",
    f"/usr/lib/*/{PLUGIN_NAME}",
    f"/usr/lib/{PLUGIN_NAME}",
)
BUILD_HINT = (
    "install gcc, make, mosquitto-dev, libmosquitto-dev, libcjson-dev and libssl-dev "
    "(`make mosquitto` does on Debian/Ubuntu), or build it elsewhere and install it as /usr/local/lib/"
    f"{PLUGIN_NAME}"
)


def is_device_id(username: str) -> bool:
    return DEVICE_ID_RE.fullmatch(username) is not None


def sanitized() -> bool:
    """Whether this process wants the sanitizer build of the plugin (PROVBRIDGE_JWT_PLUGIN_SANITIZED=1)."""
    return os.environ.get(SANITIZED_ENV, "") not in ("", "0")


def _fresh(path: Path) -> bool:
    sources = [SOURCE, SOURCE_DIR / "Makefile"]
    if not path.is_file():
        return False
    if not all(s.exists() for s in sources):
        return True  # an installed copy without its sources
    return path.stat().st_mtime >= max(s.stat().st_mtime for s in sources)


def build_plugin(out: Path = BUILD_OUTPUT, *, with_sanitizers: bool = False) -> Path:
    """Compile the plugin into `out` with make (-Wall -Wextra -Werror), with AddressSanitizer and UBSan
    when asked (`make asan`); BrokerConfigError if it cannot."""
    make = shutil.which("make")
    if make is None:
        raise BrokerConfigError(f"cannot build the provbridge_jwt Mosquitto plugin: no `make`; {BUILD_HINT}")
    target = ["asan", f"ASAN_OUT={out}"] if with_sanitizers else [f"OUT={out}"]
    done = subprocess.run([make, "-s", "-C", str(SOURCE_DIR), *target], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BrokerConfigError(
            f"cannot build the provbridge_jwt Mosquitto plugin ({' / '.join(detail) or 'make failed'}); {BUILD_HINT}"
        )
    return out


def find_installed() -> Path | None:
    for pattern in INSTALLED_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0])
    return None


def find_or_build_plugin() -> Path:
    """The plugin's `.so`: this checkout's fresh build, else an installed one, else built now.
    The sanitizer build when `sanitized()`: this checkout's, built now unless fresh, never an installed one."""
    if sanitized():
        return SANITIZED_OUTPUT if _fresh(SANITIZED_OUTPUT) else build_plugin(SANITIZED_OUTPUT, with_sanitizers=True)
    if _fresh(BUILD_OUTPUT):
        return BUILD_OUTPUT
    installed = find_installed()
    if installed is not None and not SOURCE.exists():
        return installed
    try:
        return build_plugin()
    except BrokerConfigError:
        if installed is not None:
            return installed
        raise
