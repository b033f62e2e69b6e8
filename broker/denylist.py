"""Revoked devices whose tokens the embedded broker must refuse before those tokens expire.

A device token cannot be recalled, so `provbridge device revoke` (bridge/ops/revocation.py) lists the
device here until the latest moment any token it was given can expire. The broker refuses that
device's CONNECT, ends the sessions it already has, and refuses their PUBLISH, SUBSCRIBE and
deliveries until they are ended.

    <data_dir>/denylist.json   {"devices": {"dev_...": until (unix seconds)}}

Written atomically (rename) by the bridge side, read here through a `WatchedFile`, so a revocation
applies without a broker restart: the broker ends the device's live sessions within about a second
(`ProvbridgeBroker`, broker/server.py) and refuses their packets until then. Entries expire by themselves.
"""

import json
from collections.abc import Mapping
from pathlib import Path

from broker.watched import WatchedFile

DENYLIST_FILE_NAME = "denylist.json"


def parse_denylist(data: bytes) -> dict[str, int]:
    document = json.loads(data)
    devices = document.get("devices") if isinstance(document, dict) else None
    if not isinstance(devices, dict) or not all(
        isinstance(until, int) and not isinstance(until, bool) for until in devices.values()
    ):
        raise ValueError('expected {"devices": {device id: until unix seconds}}')
    return {str(device_id): until for device_id, until in devices.items()}


def render_denylist(entries: Mapping[str, int]) -> bytes:
    """The file content for `entries` (device id -> until), sorted so rewrites are reproducible."""
    return json.dumps({"devices": dict(sorted(entries.items()))}, indent=2).encode() + b"\n"


class Denylist:
    """Which devices are refused right now. A missing file is the normal "nobody revoked" state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: WatchedFile[dict[str, int]] = WatchedFile(path, parse_denylist, {})

    def denies(self, device_id: str, now: float) -> bool:
        until = self._current().get(device_id)
        return until is not None and now < until

    def denied(self, now: float) -> list[str]:
        """Every device refused at `now`: those revoked within the token lifetime cap, usually few."""
        return [device_id for device_id, until in self._current().items() if now < until]

    def _current(self) -> dict[str, int]:
        if not self.path.exists():  # not an error: WatchedFile would log it as one
            return {}
        return self._entries.get()
