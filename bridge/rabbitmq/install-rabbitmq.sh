#!/bin/sh
# Install Debian's RabbitMQ server when it is missing, for the test suite: tests/helpers/rabbitmq.py starts its
# own 3-node cluster on 127.0.0.1 in a temp dir (its own epmd, its own cookie, the MQTT and OAuth 2 plugins), so
# only the package's binaries are needed. Never leaves a system node running: the package creates and may start
# one (rabbitmq-server.service, with an epmd on port 4369).
# When it cannot install, it fails under CI (CI=true) and otherwise only warns: the RabbitMQ tests are then
# skipped.
set -eu

cannot() {
    echo "rabbitmq-server is not installed: $1" >&2
    if [ -n "${CI:-}" ]; then
        exit 1
    fi
    echo "(the RabbitMQ tests will be skipped; under CI they fail)" >&2
    exit 0
}

# Debian's rabbitmq-server in /usr/sbin is a wrapper that switches to the rabbitmq user; the tests run the
# scripts in /usr/lib/rabbitmq/bin themselves.
have_rabbitmq() {
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && [ -x /usr/lib/rabbitmq/bin/rabbitmqctl ]
}
if have_rabbitmq; then
    exit 0
fi

# shellcheck source=../apt.sh
. "$(dirname "$0")/../apt.sh"
apt_ready rabbitmq-server "install RabbitMQ 3.10 or later (with its Erlang) yourself"

apt_install_quietly rabbitmq-server

# Belt and braces, for systemd machines where the unit may be enabled and started anyway.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true
    $SUDO systemctl disable --now epmd.socket epmd.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/rabbitmq-server ]; then
    $SUDO /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true
fi
# A system epmd the package (or the node it started) left behind, on the default port 4369: the tests start
# their own on a port of their own, and nothing else should listen. Only the rabbitmq user's, never another's.
if command -v pkill >/dev/null 2>&1; then
    $SUDO pkill -x -u rabbitmq epmd >/dev/null 2>&1 || true
    $SUDO pkill -x -u epmd epmd >/dev/null 2>&1 || true
fi

if ! have_rabbitmq; then
    cannot "the rabbitmq-server package did not provide /usr/lib/rabbitmq/bin/rabbitmq-server"
fi
echo "installed rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '(version unknown)')"
