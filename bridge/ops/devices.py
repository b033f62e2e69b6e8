"""What operators do with provisioned devices besides their credentials' life cycle (`lifecycle`): list them a
page at a time, change what an operator owns (name, labels, groups, profile), check and rotate their API keys.

Each change is one transaction with its event (`Store.change_device`), decided by a pure function over the
device as stored; a refused change (UsageError) changes nothing.
"""

import re
from dataclasses import dataclass, field, replace
from typing import Any

from bridge.claims import identifiers
from bridge.config import Settings
from bridge.errors import UsageError
from bridge.ops.admin import CLI_ACTOR, LabelChanges, changed_columns, check_profile, labels_and_groups
from bridge.storage.records import Device
from bridge.storage.store import DeviceFilter, PageCursor, Store
from provwire.models import Event, rfc3339

MAX_PAGE = 1000  # devices per page
MAX_NAME_CHARS = 128  # as a claim's `device_name`
_API_KEY_RE = re.compile(r"dk_[A-Za-z0-9_-]{43}")  # `identifiers.new_api_key`: 256 bits, base64url


@dataclass(frozen=True)
class DevicePage:
    devices: list[Device]
    next_cursor: str | None  # None: this was the last page


PRESENCE = {"online": True, "offline": False}
MAX_SEARCH_CHARS = 256


def device_filter(
    tenant_id: str | None = None,
    status: str | None = None,
    hardware_id: str | None = None,
    search: str | None = None,
    label: str | None = None,
    presence: str | None = None,
) -> DeviceFilter:
    """The filter a list request names. `search`: a device id (`dev_...`) exactly, else a hardware-id prefix;
    `label`: `NAME=VALUE`; `presence`: `online` or `offline` (seen, and not connected now; a device never seen
    connected is in neither). A search by prefix alone lists in hardware-id order, every other list newest first."""
    if status not in (None, "active", "revoked"):
        raise UsageError("status must be 'active' or 'revoked'")
    if presence not in (None, *PRESENCE):
        raise UsageError("presence must be 'online' or 'offline'")
    labelled = None
    if label is not None:
        name, equals, value = label.partition("=")
        if not equals or not name:
            raise UsageError(f"a label filter is NAME=VALUE, not {label!r}")
        labelled = (name, value)
    device_id = prefix = None
    if search:
        if len(search) > MAX_SEARCH_CHARS or not search.isprintable():
            raise UsageError(f"a search is 1-{MAX_SEARCH_CHARS} printable characters")
        if search.startswith("dev_"):
            device_id = search
        else:
            prefix = search
    return DeviceFilter(
        tenant_id=tenant_id,
        status=status,
        hardware_id=hardware_id,
        hardware_id_prefix=prefix,
        label=labelled,
        online=None if presence is None else PRESENCE[presence],
        device_id=device_id,
    )


def list_devices(store: Store, where: DeviceFilter, after: str | None, limit: int) -> DevicePage:
    """One page of devices, newest first; `after` is the `next_cursor` of the page before."""
    if not 1 <= limit <= MAX_PAGE:
        raise UsageError(f"a page holds 1 to {MAX_PAGE} devices")
    if where.status not in (None, "active", "revoked"):
        raise UsageError("status must be 'active' or 'revoked'")
    cursor = None if after is None else PageCursor.decode(after)
    found = store.devices_page(where, cursor, limit + 1)  # one more: is there a next page?
    page = found[:limit]
    more = len(found) > limit
    last = page[-1] if page else None
    next_cursor = None
    if more and last:
        hardware_id = last.hardware_id if where.by_hardware_id else None
        next_cursor = PageCursor(last.created_at, last.id, hardware_id).encode()
    return DevicePage(page, next_cursor)


@dataclass(frozen=True)
class DeviceUpdate:
    """What `device update` changes; what is left at its default stays as it is."""

    name: str | None = None
    clear_name: bool = False
    profile: str | None = None
    labels: LabelChanges = field(default_factory=LabelChanges)

    def is_empty(self) -> bool:
        return self == DeviceUpdate()


def update_device(
    store: Store, settings: Settings, device_id: str, update: DeviceUpdate, now: int, actor: str = CLI_ACTOR
) -> tuple[Device, list[str]]:
    """Change a device as `update` says, with a `device.updated` event naming the fields that changed, in one
    transaction; the device as it now is, and those fields. A new profile scopes the tokens it gets from then on
    (its next refresh or re-claim); the tokens it holds keep the scope they were minted with until they expire."""
    if update.is_empty():
        raise UsageError("nothing to change: give at least one option (see --help)")
    if update.clear_name and update.name is not None:
        raise UsageError("give --name or --clear-name, not both")
    device, event = store.change_device(device_id, lambda d: device_update(d, update, settings, now, actor))
    return device, event.changes or []


def device_update(
    device: Device, update: DeviceUpdate, settings: Settings, now: int, actor: str
) -> tuple[dict[str, Any], Event]:
    """The columns `update` sets on `device`, and the event saying which fields changed (pure)."""
    labels, groups = labels_and_groups("device", device.labels, device.groups, update.labels)
    after: dict[str, Any] = {  # in the order `changes` lists them
        "name": None if update.clear_name else (update.name if update.name is not None else device.name),
        "profile": update.profile if update.profile is not None else device.profile,
        "labels": labels,
        "groups": groups,
    }
    name = after["name"]
    if name is not None and (not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable()):
        raise UsageError(f"a device name must be 1-{MAX_NAME_CHARS} printable characters")
    check_profile(settings, after["profile"])
    before = {"name": device.name, "profile": device.profile, "labels": device.labels, "groups": device.groups}
    columns, changed = changed_columns(before, after)
    return columns, device_event("device.updated", replace(device, name=after["name"]), now, actor, changes=changed)


def rotate_api_key(store: Store, device_id: str, now: int, actor: str = CLI_ACTOR) -> tuple[Device, str]:
    """A new `dk_` API key for the device, returned to be shown once; the old one stops verifying at once."""
    raw = identifiers.new_api_key()

    def change(device: Device) -> tuple[dict[str, Any], Event]:
        return {"api_key_hash": identifiers.digest(raw)}, device_event("device.api_key_rotated", device, now, actor)

    return store.change_device(device_id, change)[0], raw


def verify_api_key(store: Store, api_key: str) -> Device | None:
    """The device a `dk_` API key belongs to, when it is valid: the device exists and is not revoked."""
    if _API_KEY_RE.fullmatch(api_key) is None:
        return None  # not even shaped like one: nothing to look up
    device = store.device_by_api_key(identifiers.digest(api_key))
    return device if device is not None and device.status == "active" else None


def device_event(name: str, device: Device, now: int, actor: str, **fields: Any) -> Event:
    return Event(
        event=name,
        time=rfc3339(now),
        tenant=device.tenant_name,
        device_id=device.id,
        hardware_id=device.hardware_id,
        actor=actor,
        **fields,
    )
