#!/bin/sh
# Install Debian's chromium when it is missing, for the operator dashboard's browser test
# (tests/test_dashboard.py drives /usr/bin/chromium with Playwright, which downloads no browser of its own).
# When it cannot install, it fails under CI (CI=true) and otherwise only warns: the browser test is then
# skipped (under CI it fails).
set -eu

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    exit 0
fi

cannot() {
    echo "chromium is not installed: $1" >&2
    if [ -n "${CI:-}" ]; then
        exit 1
    fi
    echo "(the dashboard's browser test will be skipped; under CI it fails)" >&2
    exit 0
}

# shellcheck source=../apt.sh
. "$(dirname "$0")/../apt.sh"
apt_ready chromium "install Chromium yourself as $CHROMIUM"
$SUDO apt-get update -qq || cannot "apt-get update failed"
# Without the recommended extras (a desktop's daemons); one font, so that pages lay out text as they would.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null ||
    cannot "apt-get install chromium failed"
if [ ! -x "$CHROMIUM" ]; then
    cannot "the chromium package did not provide $CHROMIUM"
fi
echo "installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
