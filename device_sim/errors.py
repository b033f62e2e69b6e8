"""What can go wrong for one simulated device. All are ProvbridgeError, the project's one exception root."""

from provwire.errors import ErrorCode, ProvbridgeError, UsageError

__all__ = [
    "BrokerRefused",
    "Cancelled",
    "ClaimRejected",
    "ClaimTimeout",
    "ConnectError",
    "ConnectionLost",
    "DemoError",
    "InvalidAnswer",
    "UsageError",
    "VaultError",
]


class ClaimRejected(ProvbridgeError):
    """The bridge answered the claim with an error answer (`status: "error"`).

    `code` is an ErrorCode, or the raw string of a code this version does not know (then not retryable).
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        retry_after: int | None = None,
        request_id: str | None = None,
        field_errors: tuple[tuple[str, str], ...] = (),
    ) -> None:
        fields = "; ".join(f"{name}: {text}" for name, text in field_errors)
        super().__init__(f"{code}: {message}" + (f" ({fields})" if fields else ""))
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.request_id = request_id
        self.field_errors = field_errors

    @property
    def retryable(self) -> bool:
        return isinstance(self.code, ErrorCode) and self.code.retryable


class InvalidAnswer(ProvbridgeError):
    """A message on the response topic is not a valid v1 answer (bad JSON, fields, or sealed plaintext)."""


class CloudKeyMismatch(InvalidAnswer):
    """An ok answer sealed with a cloud key (kid) other than the one this device holds."""


class StaleAnswer(InvalidAnswer):
    """A valid-looking answer to another request_id: a leftover, ignored while waiting for ours."""


class ClaimTimeout(ProvbridgeError):
    """No usable answer arrived within the attempts allowed."""


class ConnectError(ProvbridgeError):
    """The broker could not be reached, refused the connection, or dropped it before the exchange ended."""


class BrokerRefused(ConnectError):
    """The broker answered and said no (CONNACK or SUBACK failure): retrying the same request is pointless."""


class ConnectionLost(ConnectError):
    """The connection dropped after CONNACK (broker restart, ACL kick, network): worth a retry."""


class Cancelled(ProvbridgeError):
    """The caller asked the device to stop (Ctrl-C of a fleet run)."""


class VaultError(ProvbridgeError):
    """A secret file is missing, unreadable, too widely readable, or fails to decrypt (tampered)."""


class DemoError(ProvbridgeError):
    """A step of `provbridge-sim demo` failed; the message is the one line to show."""
