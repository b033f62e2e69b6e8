# Sourced by the install scripts (bridge/mosquitto/install-mosquitto.sh, bridge/api/install-chromium.sh): how
# they get apt-get run as root. Each defines `cannot MESSAGE` (fail under CI, else warn and exit 0) first.

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
