"""The one exception root of provbridge, and the error codes a device can receive."""

from enum import StrEnum


class ProvbridgeError(Exception):
    """Root of every error provbridge raises on purpose."""


class UsageError(ProvbridgeError):
    """A command was given arguments that cannot work: contradictory, out of range, malformed (exit 2)."""


class InvalidPublicKey(ProvbridgeError, ValueError):
    """A public key is not an uncompressed P-256 point on the curve."""


class InvalidCsr(ProvbridgeError, ValueError):
    """A device's certificate signing request cannot be signed: not PKCS#10, too large, not a P-256 key, or its
    self-signature (the proof that the device holds the key) does not verify."""


class SealError(ProvbridgeError):
    """A sealed box could not be opened: wrong key, wrong request_id or tampered bytes."""


class ErrorCode(StrEnum):
    """`code` of an error answer. Retryable codes carry `retry_after` seconds."""

    VALIDATION_ERROR = "validation_error"
    PERMISSION_DENIED = "permission_denied"
    DEVICE_EXISTS = "device_exists"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"

    @property
    def retryable(self) -> bool:
        return self in (ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL_ERROR)
