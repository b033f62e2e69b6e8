"""Errors of the bridge. All derive from the project's one root, `ProvbridgeError`."""

from provwire.errors import ProvbridgeError

__all__ = [
    "AlreadyExists",
    "ConfigError",
    "InvalidPattern",
    "NotFound",
    "NotInitialised",
    "ProvbridgeError",
    "StorageError",
    "UsageError",
]


class ConfigError(ProvbridgeError):
    """The configuration is invalid or unreadable."""


class NotInitialised(ProvbridgeError):
    """The data directory has not been initialised (`provbridge init`)."""


class NotFound(ProvbridgeError):
    """A tenant, key or device named by the operator does not exist."""


class UsageError(ProvbridgeError):
    """An admin command was given arguments that cannot work: contradictory, out of range, malformed (exit 2)."""


class AlreadyExists(ProvbridgeError):
    """A tenant or ops user of that name exists already."""


class InvalidPattern(UsageError):
    """A hardware-id pattern the linear-time engine (RE2) cannot run (bridge/claims/hardware_pattern.py)."""


class StorageError(ProvbridgeError):
    """The database failed; the operation changed nothing and may be retried."""
