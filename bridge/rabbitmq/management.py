"""RabbitMQ's management API, for the one thing the bridge needs of it: ending a device's connections.

RabbitMQ's OAuth 2 backend checks the token alone (signature, audience, expiry) and cannot be told that a still-valid
token is revoked; so revoking a device ends its live connections here (`DELETE /api/connections/username/<id>`,
which every node answers for the whole cluster from its connection tracking, not from the statistics database), and
the bridge repeats it while the revocation lasts (`bridge.edges.rabbitmq`). That endpoint needs a user tagged
`administrator` (a `monitoring` user gets a 500): `provbridge rabbitmq-config` tags the bridge's user so.
"""

import base64
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable
from urllib.parse import quote

from bridge.errors import RabbitMQError

log = logging.getLogger("provbridge.rabbitmq")

TIMEOUT_SECONDS = 5.0


class Management:
    """The management API of a cluster, reached through any of `urls` (tried in turn)."""

    def __init__(self, urls: Iterable[str], username: str, password: str, timeout: float = TIMEOUT_SECONDS) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self._authorization = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self.timeout = timeout

    def close_connections(self, username: str) -> None:
        """End every connection of `username` on every node (none: nothing to do). RabbitMQError when no node
        answered."""
        self._call("DELETE", f"/api/connections/username/{quote(username, safe='')}", ok=(200, 204, 404))

    def _call(self, method: str, path: str, ok: tuple[int, ...]) -> None:
        problems: list[str] = []
        for url in self.urls:
            request = urllib.request.Request(url + path, method=method)
            request.add_header("Authorization", self._authorization)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except (OSError, ValueError) as exc:  # unreachable, refused, timed out, a malformed URL
                problems.append(f"{url}: {exc}")
                continue
            if status in ok:
                return
            problems.append(f"{url}: HTTP {status}")
            if status in (401, 403):
                break  # the same users on every node: another will not say otherwise
        raise RabbitMQError(f"RabbitMQ's management API refused {method} {path.split('/')[2]}: " + "; ".join(problems))
