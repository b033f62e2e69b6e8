"""Telling a broker that cannot verify JWTs about each token the bridge mints.

The embedded broker verifies tokens itself (`NoMirror`). Mosquitto cannot, so the bridge mirrors
each token into its dynamic-security plugin. The mirror is called inside the claim's database
transaction: if the broker does not confirm, the claim rolls back and the device retries, so no
device ever holds a token its broker does not know.
"""

from typing import Protocol

from bridge.tokens import TokenGrant


class TokenMirror(Protocol):
    def grant(self, device_id: str, grant: TokenGrant) -> None:
        """Let `device_id` connect with `grant.token` and use exactly its scope. Blocks until confirmed."""

    def revoke(self, device_id: str) -> None:
        """Refuse the device from now on and end its live session, if any."""


class NoMirror:
    """For brokers that verify tokens themselves (the embedded broker, EMQX, HiveMQ with JWKS)."""

    def grant(self, device_id: str, grant: TokenGrant) -> None:
        return None

    def revoke(self, device_id: str) -> None:
        return None
