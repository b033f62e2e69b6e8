#!/bin/sh
# Install Debian's PostgreSQL server when it is missing, for the test suite: tests/helpers/postgres.py runs
# initdb and pg_ctl itself, starting a throwaway server on 127.0.0.1 in a temp dir, so only the binaries are
# needed. Never leaves a system cluster running (the package creates and starts one, on port 5432).
# When it cannot install, it fails under CI (CI=true) and otherwise only warns: the PostgreSQL tests are
# then skipped.
set -eu

cannot() {
    echo "postgresql is not installed: $1" >&2
    if [ -n "${CI:-}" ]; then
        exit 1
    fi
    echo "(the PostgreSQL tests will be skipped; under CI they fail)" >&2
    exit 0
}

# Debian keeps initdb out of PATH (/usr/lib/postgresql/<version>/bin), so look there too.
have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    for candidate in /usr/lib/postgresql/*/bin/initdb; do
        if [ -x "$candidate" ]; then return 0; fi
    done
    return 1
}
if have_initdb; then
    exit 0
fi

# shellcheck source=../apt.sh
. "$(dirname "$0")/../apt.sh"
apt_ready postgresql "install the PostgreSQL server (initdb, pg_ctl, postgres) yourself"

apt_install_quietly postgresql

# Belt and braces, for systemd machines where the unit may be enabled and started anyway.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
fi
# The cluster the package created (main, port 5432) must not run: stop any that is online.
if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version cluster _port status _rest; do
        case "$status" in
        online*) $SUDO pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true ;;
        esac
    done
fi

if ! have_initdb; then
    cannot "the postgresql package did not provide initdb"
fi
# Only for the message: the server the package brought (the last version directory, if several).
for postgres in /usr/lib/postgresql/*/bin/postgres; do :; done
echo "installed $("$postgres" --version 2>/dev/null || echo postgresql)"
