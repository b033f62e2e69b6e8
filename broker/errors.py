"""Errors of the broker package, all under the one provbridge root."""

from provwire.errors import ProvbridgeError


class BrokerConfigError(ProvbridgeError, ValueError):
    """A broker setting is unusable: a bad prefix, port or TLS file pair."""


# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3) the broker refuses a CONNECT with.
CONNACK_IDENTIFIER_REJECTED = 0x02  # the client id itself is not allowed [MQTT-3.1.3-9]
CONNACK_NOT_AUTHORIZED = 0x05  # everything else: credentials, roles, a revoked device


class ConnectRefused(ProvbridgeError):
    """A CONNECT must be refused. `reason` is safe to log: it never holds a password or token.

    `return_code` is the CONNACK return code the client is sent.
    """

    def __init__(self, reason: str, return_code: int = CONNACK_NOT_AUTHORIZED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.return_code = return_code


class InvalidCertificate(ProvbridgeError):
    """A device certificate the device CA does not vouch for now (wrong issuer or signature, outside its
    validity, not for client authentication), or whose scope extension is malformed (broker/certificates.py,
    bridge/tls/device_ca.py). Defined here so the broker reads certificates without importing the bridge."""


class BrokerStartError(ProvbridgeError):
    """The embedded broker could not start: the port is taken, a TLS file is missing..."""
