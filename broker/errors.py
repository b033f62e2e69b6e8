"""Errors of the broker package, all under the one provbridge root."""

from provwire.errors import ProvbridgeError


class BrokerConfigError(ProvbridgeError, ValueError):
    """A broker setting is unusable: a bad prefix, port or TLS file pair."""


class ConnectRefused(ProvbridgeError):
    """A CONNECT must be refused. `reason` is safe to log: it never holds a password or token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerStartError(ProvbridgeError):
    """The embedded broker could not start: the port is taken, a TLS file is missing..."""
