#!/bin/sh
# Install Mosquitto from the distribution's packages when it is missing, for the test suite and
# the benchmarks, with what building the provbridge_jwt plugin (bridge/mosquitto/jwt) needs: a C
# compiler, the Mosquitto plugin headers, cJSON and OpenSSL headers. Never leaves a system Mosquitto running: `make run` needs 127.0.0.1:1883 for
# the embedded broker, and the tests start their own Mosquitto from `provbridge mosquitto-config`.
# When it cannot install, it fails under CI (CI=true) and otherwise only warns: the Mosquitto tests
# are then skipped.
set -eu

cannot() {
    echo "mosquitto or the plugin build tools are not installed ($PACKAGES): $1" >&2
    if [ -n "${CI:-}" ]; then
        exit 1
    fi
    echo "(the Mosquitto tests will be skipped; under CI they fail)" >&2
    exit 0
}

PACKAGES=""
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    PACKAGES="mosquitto"
fi
need() {  # need FILE PACKAGE: the package, when the file it provides is missing
    if [ ! -e "$1" ]; then PACKAGES="$PACKAGES $2"; fi
}
need /usr/include/mosquitto_broker.h mosquitto-dev
need /usr/include/mosquitto.h libmosquitto-dev
need /usr/include/cjson/cJSON.h libcjson-dev
need /usr/include/openssl/evp.h libssl-dev
# gcc itself, not any cc: the plugin's sanitizer build needs gcc's libasan and libubsan.
if ! command -v gcc >/dev/null 2>&1; then PACKAGES="$PACKAGES gcc libc6-dev"; fi
if [ -z "$PACKAGES" ]; then
    exit 0
fi

# shellcheck source=../apt.sh
. "$(dirname "$0")/../apt.sh"
apt_ready "$PACKAGES" "install Mosquitto 2.x yourself"

# shellcheck disable=SC2086 # a list of package names
apt_install_quietly $PACKAGES

# Belt and braces, for systemd machines where the unit may be enabled and started anyway.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
elif [ -x /etc/init.d/mosquitto ]; then
    $SUDO /etc/init.d/mosquitto stop >/dev/null 2>&1 || true
fi
echo "installed $(/usr/sbin/mosquitto -h 2>/dev/null | head -n 1 || echo mosquitto)"
