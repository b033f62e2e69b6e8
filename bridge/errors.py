"""Errors of the bridge. All derive from the project's one root, `ProvbridgeError`; `UsageError` is shared
with the device simulator and `InvalidCsr` with the wire models (provwire/errors.py), `InvalidCertificate` with
the broker, which reads device certificates (broker/errors.py)."""

from broker.errors import InvalidCertificate
from provwire.errors import InvalidCsr, ProvbridgeError, UsageError

__all__ = [
    "AlreadyExists",
    "ApiError",
    "BodyTooLarge",
    "CheckFailed",
    "CheckWarning",
    "ConfigError",
    "DoctorFailed",
    "InvalidCertificate",
    "InvalidCsr",
    "InvalidImport",
    "InvalidPattern",
    "MirrorError",
    "NotFound",
    "NotInitialised",
    "PatternNotFollowed",
    "ProvbridgeError",
    "StorageError",
    "TooManyStreams",
    "UsageError",
    "WorkerError",
]


class ConfigError(ProvbridgeError):
    """The configuration is invalid or unreadable."""


class UnscopableFilter(ConfigError):
    """A topic filter that RabbitMQ's token scopes cannot express exactly (bridge/rabbitmq_scopes.py)."""


class NotInitialised(ProvbridgeError):
    """The data directory has not been initialised (`provbridge init`)."""


class NotFound(ProvbridgeError):
    """A tenant, key or device named by the operator does not exist."""


class AlreadyExists(ProvbridgeError):
    """A tenant or ops user of that name exists already."""


class InvalidPattern(UsageError):
    """A hardware-id pattern the linear-time engine (RE2) cannot run (bridge/claims/hardware_pattern.py)."""


class InvalidImport(UsageError):
    """A file to import with problems: nothing was imported. `problems` are (line number, what is wrong)."""

    SHOWN = 100  # problems listed; the count says how many more

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        shown = "\n".join(f"  line {line}: {what}" for line, what in problems[: self.SHOWN])
        more = len(problems) - self.SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(problems)} problem(s) in the file, nothing was imported:\n{shown}{tail}")


class ApiError(ProvbridgeError):
    """An admin API answer other than 2xx, in its one error shape (bridge/api/app.py lists the codes)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class TooManyStreams(ProvbridgeError):
    """An admin token asked for one more live-event stream than it may hold open (bridge/api/live.py)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this admin token has {limit} live-event streams open already; close one first")
        self.limit = limit


class BodyTooLarge(ProvbridgeError):
    """An admin API request body over its route's limit (bridge/api/app.py)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")
        self.limit = limit


class StorageError(ProvbridgeError):
    """The database failed; the operation changed nothing and may be retried."""


class BrokersNotTold(ProvbridgeError):
    """A change is in the database, but the denylist the brokers read could not be written: they accept what the
    change refused until it is. Running the same change again (or `provbridge denylist publish`) tells them."""


class MirrorError(ProvbridgeError):
    """The broker did not confirm a mirrored token or revocation; the caller may retry."""


class RabbitMQError(ProvbridgeError):
    """RabbitMQ's management API did not do what the bridge asked (bridge/rabbitmq/management.py)."""


class WorkerError(ProvbridgeError):
    """The claim-worker process could not be started."""


class CheckFailed(ProvbridgeError):
    """What is wrong and what to do: the FAIL line of the doctor check that raised it."""


class CheckWarning(ProvbridgeError):
    """What will hurt without being wrong yet: the WARN line of the doctor check that raised it."""


class DoctorFailed(ProvbridgeError):
    """At least one doctor check failed (the CLI exits 1)."""


class PatternNotFollowed(ProvbridgeError):
    """A construct of Python's pattern syntax that the doctor's probe builder does not follow (RE2 refuses
    nearly all of them anyway): bridge/claims/hardware_pattern.py."""
