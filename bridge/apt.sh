# Sourced by the install scripts (bridge/mosquitto/install-mosquitto.sh, bridge/api/install-chromium.sh,
# bridge/storage/install-postgresql.sh, bridge/rabbitmq/install-rabbitmq.sh): how they get apt-get run as root.
# Each defines `cannot MESSAGE` (fail under CI, else warn and exit 0) first.

# apt_ready PACKAGES MANUAL: sets SUDO ("" as root, "sudo -n" where sudo asks no password) and exports a
# non-interactive apt-get, or calls `cannot`, naming PACKAGES to install by hand, or MANUAL without apt-get.
apt_ready() {
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        cannot "this user cannot install packages (Debian/Ubuntu: sudo apt-get install $1)"
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        cannot "apt-get is not available: $2"
    fi
    export DEBIAN_FRONTEND=noninteractive
}

# apt_install_quietly PACKAGE...: apt-get update and install them (after apt_ready) without starting any service
# they bring: invoke-rc.d asks /usr/sbin/policy-rc.d whether it may start one, and 101 means "no", so one is put
# in place for the install only, unless the machine already has its own (containers often do). The tests start
# their own servers; nothing may be left listening on the default ports. Calls `cannot` when apt-get fails.
apt_install_quietly() {
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        $SUDO sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $SUDO apt-get update -qq || cannot "apt-get update failed"
    $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null || cannot "apt-get install $* failed"
}
