"""Device credentials the brokers must refuse before they expire.

A token or certificate cannot be recalled, so the bridge (bridge/ops/lifecycle.py) lists here, until the
latest moment any of them can expire:

- every credential of a device that was revoked or deleted (`devices`);
- the credentials a device held before it was reinstated or reset (`older_credentials`): tokens whose
  `gen` claim (absent: 0) is below the device's current credential generation, and certificates by
  serial number. Credentials issued after that moment carry the new generation (or a serial not listed)
  and are accepted.

    <data_dir>/denylist.json
    {"devices": {"dev_...": until},
     "older_credentials": {"dev_...": {"generation": 2, "certificates": ["5f0c..."], "until": until}}}

`until` is unix seconds; a certificate serial is lowercase hex without leading zeros (`format(n, "x")`).
`older_credentials` may be absent (files written before it existed). The broker refuses a listed
credential's CONNECT, ends the sessions that hold one, and refuses their PUBLISH, SUBSCRIBE and
deliveries until they are ended.

Written atomically (rename) by the bridge side, read here through a `WatchedFile`, so a change applies
without a broker restart (`ProvbridgeBroker`, broker/server.py, ends live sessions within about a second).
Entries expire by themselves. The Mosquitto plugin (bridge/mosquitto/jwt/provbridge_jwt.c) reads the same
file with the same rules.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.watched import WatchedFile

DENYLIST_FILE_NAME = "denylist.json"


@dataclass(frozen=True)
class OlderCredentials:
    """A device's credentials from before its last reinstatement or reset, refused until `until`."""

    generation: int  # tokens whose `gen` is below it
    certificates: frozenset[str] = frozenset()  # certificate serial numbers
    until: int = 0


@dataclass(frozen=True)
class Credential:
    """What a device session holds: a token (its `gen`) or a certificate (its serial number)."""

    device_id: str
    generation: int = 0
    certificate_serial: str | None = None


@dataclass(frozen=True)
class Entries:
    devices: dict[str, int] = field(default_factory=dict)
    older_credentials: dict[str, OlderCredentials] = field(default_factory=dict)


FORMAT = (
    'expected {"devices": {device id: until}, "older_credentials": {device id: '
    '{"generation": n, "certificates": [serial hex], "until": until}}}'
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _older(value: Any) -> OlderCredentials:
    if not isinstance(value, dict) or set(value) - {"generation", "certificates", "until"}:
        raise ValueError(FORMAT)
    generation: Any = value.get("generation")
    until: Any = value.get("until")
    certificates: Any = value.get("certificates", [])
    if not (_is_int(generation) and generation >= 0 and _is_int(until)):
        raise ValueError(FORMAT)
    if not isinstance(certificates, list) or not all(isinstance(s, str) for s in certificates):
        raise ValueError(FORMAT)
    return OlderCredentials(generation, frozenset(certificates), until)


def parse_denylist(data: bytes) -> Entries:
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError(FORMAT)
    devices = document.get("devices")
    older = document.get("older_credentials", {})
    if not isinstance(devices, dict) or not all(_is_int(until) for until in devices.values()):
        raise ValueError(FORMAT)
    if not isinstance(older, dict):
        raise ValueError(FORMAT)
    return Entries(
        {str(device_id): until for device_id, until in devices.items()},
        {str(device_id): _older(entry) for device_id, entry in older.items()},
    )


def render_denylist(entries: Entries) -> bytes:
    """The file content for `entries`, sorted so rewrites are reproducible."""
    older = {
        device_id: {"generation": o.generation, "certificates": sorted(o.certificates), "until": o.until}
        for device_id, o in sorted(entries.older_credentials.items())
    }
    document: dict[str, Any] = {"devices": dict(sorted(entries.devices.items())), "older_credentials": older}
    return json.dumps(document, indent=2).encode() + b"\n"


def refuses(entries: Entries, credential: Credential, now: float) -> bool:
    """Whether `credential` is refused at `now`."""
    until = entries.devices.get(credential.device_id)
    if until is not None and now < until:
        return True
    older = entries.older_credentials.get(credential.device_id)
    if older is None or now >= older.until:
        return False
    if credential.certificate_serial is not None:
        return credential.certificate_serial in older.certificates
    return credential.generation < older.generation


def listed(entries: Entries, now: float) -> list[str]:
    """Every device with credentials refused at `now`: whose live sessions the broker must look at."""
    devices = {device_id for device_id, until in entries.devices.items() if now < until}
    devices |= {device_id for device_id, older in entries.older_credentials.items() if now < older.until}
    return sorted(devices)


class Denylist:
    """Which credentials are refused right now. A missing file is the normal "nobody revoked" state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: WatchedFile[Entries] = WatchedFile(path, parse_denylist, Entries())

    def refuses(self, credential: Credential, now: float) -> bool:
        return refuses(self._current(), credential, now)

    def listed(self, now: float) -> list[str]:
        return listed(self._current(), now)

    def _current(self) -> Entries:
        if not self.path.exists():  # not an error: WatchedFile would log it as one
            return Entries()
        return self._entries.get()
